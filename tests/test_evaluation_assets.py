"""`dreambench_scores` and `msic_scores` materialize on the tiny profile: metrics files, plots, Dagster metadata and
checks, MLflow runs nested under the training run, the same bytes on a re-run."""
import json

import dagster as dg
import pytest
import yaml

from checkpoints import QUICK_TRAINING, train_checkpoint
from music_dagster.resources import ProjectConfig, build_resources

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_zoo, make_project):
    """A tiny trained checkpoint with its MLflow training run, and MSIC hold-out shards (plus a training shard);
    every output under the test's folder, a short plan (a random tiny LLM rambles otherwise)."""
    from music_dagster.model.procedural import WorldSettings, write_procedural_shard
    from music_dagster.model.runtime import lora_dir
    from music_dagster.storage import read_shard
    from music_dagster.tracking import runs as tracking

    root = tmp_path_factory.mktemp("evaluation")
    project = make_project(root, outputs=True, **QUICK_TRAINING)
    config = project.get()
    train_checkpoint(config, root)
    store = tracking.store_from_config(config)
    with tracking.start_training_run(store, config, "lora_checkpoint") as run:
        tracking.write_run_ref(lora_dir(config), run)
    shards = root / "datasets" / "training_samples"
    write_procedural_shard(shards / "s0", 6, seed=1, world=WorldSettings(min_subjects=1, max_subjects=3), split="msic")
    write_procedural_shard(shards / "s1", 2, seed=2, split="train")
    counts = {str(len(r["subjects"])) for r in read_shard(shards / "s0").records}
    return {"root": root, "project": project, "training_run": run.run_id, "msic_counts": counts}


@pytest.fixture()
def materialize(project):
    def run(**resources):
        from music_dagster.assets import evaluation

        return dg.materialize([evaluation.dreambench_scores, evaluation.msic_scores,
                               evaluation.dreambench_scores_in_range, evaluation.msic_scores_in_range],
                              resources={**build_resources(project["project"]), **resources})
    return run


def test_both_score_assets_materialize(project, materialize):
    from mlflow.tracking import MlflowClient

    result = materialize()
    assert result.success
    root = project["root"]
    metrics = {name: json.loads((root / "metrics" / f"{name}.json").read_text()) for name in ("dreambench", "msic")}
    expected_encoders = {"dino_model": "models/tiny/dino", "clip_variant": "models/tiny/eval_clip"}
    db, msic = metrics["dreambench"], metrics["msic"]
    assert db["encoders"] == msic["encoders"] == expected_encoders and db["branches"] == msic["branches"] == 2
    assert db["music"]["n"] == db["music_star"]["n"] == db["music_star_eval_clip"]["n"] == 2 * 2  # 2 x 2 prompts
    assert db["real_vs_real"]["n"] > 0 and db["real_vs_real"]["clip_t"] is None
    selected_by = {"music_star": "models/tiny/select_clip", "music_star_eval_clip": "models/tiny/eval_clip"}
    assert db["selected_by"] == msic["selected_by"] == selected_by
    # MUSIC* chosen by the CLIP that scores CLIP-T, among the same branches: never a lower CLIP-T
    assert db["music_star_eval_clip"]["clip_t"] >= db["music_star"]["clip_t"]
    assert msic["music_star_eval_clip"]["overall"]["clip_t"] >= msic["music_star"]["overall"]["clip_t"]
    for method in ("music", "music_star", "music_star_eval_clip"):
        assert db[method]["failures"] == 0 and msic[method]["overall"]["failures"] == 0
        for m in ("dino", "clip_i", "clip_t"):
            assert -1 <= db[method][m] <= 1 and -1 <= msic[method]["overall"][m] <= 1
        assert set(msic[method]["by_subject_count"]) == project["msic_counts"]
        assert msic[method]["overall"]["n"] == 4 and 0 <= msic[method]["overall"]["found_rate"] <= 1
    records = json.loads((root / "datasets" / "msic_scores" / "scores.json").read_text())
    sample = records["methods"]["music_star"]["samples"][0]
    assert sample["clip_variant"] == "models/tiny/eval_clip" and "[" not in sample["text"]
    for name in ("dreambench_scores", "msic_scores"):
        methods = json.loads((root / "datasets" / name / "scores.json").read_text())["methods"]
        rows = "images" if name == "dreambench_scores" else "samples"
        for kept, best in zip(methods["music_star"][rows], methods["music_star_eval_clip"][rows]):
            assert kept["key"] == best["key"] and best["clip_t"] >= kept["clip_t"] and 0 <= best["branch"] < 2
    assert sorted(p.name for p in (root / "datasets" / "dreambench_scores").iterdir()) == \
        ["music", "music_star", "scores.json"]  # no temporary folder left
    # MUSIC*'s branches, generated once for both of its rows
    assert len(list((root / "datasets" / "dreambench_scores" / "music_star" / "branches").iterdir())) == 2 * 4
    for name in ("dreambench", "msic"):
        assert (root / "metrics" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for asset in ("dreambench_scores", "msic_scores"):
        (mat,) = [m for m in result.asset_materializations_for_node(asset)]
        meta = mat.metadata
        assert "| subjects |" in meta["scores_by_subject_count"].value
        assert meta["plot"].value.startswith("![") and "base64," in meta["plot"].value
        assert meta["clip_variant"].value == "models/tiny/eval_clip"
        assert meta["select_clip"].value == "models/tiny/select_clip"
        assert meta["music_star_eval_clip/clip_t"].value >= meta["music_star/clip_t"].value
        assert (meta["device"].value, meta["device_slot"].value) == ("cpu", 0)  # the device it held: auto, [cpu]
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 2 and all(c.passed for c in checks)

    client = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    children = client.search_runs(
        [client.get_run(project["training_run"]).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{project['training_run']}'")
    assert sorted(r.info.run_name for r in children) == ["dreambench", "msic"]
    for run in children:
        assert run.data.tags["eval.dino_model"] == "models/tiny/dino"
        assert run.data.tags["eval.clip_variant"] == "models/tiny/eval_clip"
        assert {"music/dino", "music_star/clip_t", "music_star_eval_clip/clip_t"} <= set(run.data.metrics)
        assert run.data.params["select_clip"] == "models/tiny/select_clip"
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {f"{run.info.run_name}.json", f"{run.info.run_name}.png", "scores.json"} <= names
    msic_run = next(r for r in children if r.info.run_name == "msic")
    steps = client.get_metric_history(msic_run.info.run_id, "music/by_subject_count/dino")
    assert sorted(str(m.step) for m in steps) == sorted(project["msic_counts"])

    first = {p: (root / "metrics" / p).read_bytes() for p in ("dreambench.json", "msic.json", "msic.png")}
    assert materialize().success
    assert first == {p: (root / "metrics" / p).read_bytes() for p in first}  # same config + seed -> same bytes


def test_missing_dreambench_is_one_line(project, tmp_path):
    raw = yaml.safe_load(open(project["project"].params).read())
    raw["profiles"]["tiny"]["eval"]["dreambench"] = str(tmp_path / "no-dreambench")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    from music_dagster.assets import evaluation
    from music_dagster.evaluation.common import BenchmarkError

    def written():
        folders = (project["root"] / "metrics", project["root"] / "datasets" / "dreambench_scores")
        return {p: p.read_bytes() for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()}

    before = written()
    with pytest.raises(BenchmarkError, match="no-dreambench does not exist") as e:
        dg.materialize([evaluation.dreambench_scores],
                       resources=build_resources(ProjectConfig(params=str(params), profile="tiny")))
    assert "\n" not in str(e.value)
    assert written() == before  # nothing written, nothing overwritten
