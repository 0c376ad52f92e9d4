"""The procedural experiment: every row runs end to end and is reported; the assets write the table, nest the MLflow
runs and show the table and image grid; and (slow) the method measurably works on held-out prompts."""
import json
from pathlib import Path

import pytest
import yaml

from music_dagster.config import PARAMS_FILE, default_config, load_config
from music_dagster.experiment import procedural as ex
from music_dagster.experiment.metrics import METRICS


def _tiny(**train):
    """The tiny profile cut to a few steps (a wiring check: the numbers mean nothing)."""
    from music_dagster.training import _with

    config = load_config(profile="tiny")
    config = _with(config, "train", max_steps=3, procedural_samples=12, max_plan_tokens=24, **train)
    return _with(config, "detokenizer", max_steps=3, decode_steps=2)


def test_every_row_runs_and_is_reported(tiny_zoo, tmp_path):
    import torch

    torch.set_num_threads(1)
    config = _tiny()
    results = ex.run_experiment(config, list(ex.ROWS), tmp_path / "work", held_out=4, log=lambda _: None)
    assert list(results) == list(ex.ROWS)
    files = ex.write_outputs(config, results, tmp_path / "metrics")
    report = json.loads(files["results"].read_text())
    assert set(report["rows"]) == set(ex.ROWS) and report["held_out_prompts"] == 4
    subjects = len(results["full"].rows)
    for name, row in report["rows"].items():
        metrics = row["metrics"]
        writes = {"no_cot": {"layout_cells"}, "no_layout": {"cot_colour", "cot_shape"}, "neither": set(),
                  "gt_tokens": set()}.get(name, {"cot_colour", "cot_shape", "layout_cells"})
        assert set(metrics) == {"placement", "identity", "hallucination"} | writes, name
        for summary in metrics.values():
            overall = summary["overall"]
            assert overall["n"] == subjects and overall["lo"] <= overall["mean"] <= overall["hi"]
            assert sum(v["n"] for v in summary["by_count"].values()) == subjects
    assert "full-untrained/placement" in report["gaps"] and "full-no_layout/placement" in report["gaps"]
    assert files["plot"].read_bytes()[:4] == b"\x89PNG" and files["figure"].read_bytes()[:4] == b"\x89PNG"
    assert "| full |" in files["table"].read_text()

    saved = ex.load_row(ex.save_row(results["full"], tmp_path / "rows" / "full"))
    assert saved.rows == results["full"].rows and saved.summary == results["full"].summary
    assert (tmp_path / "rows" / "full" / ex.ROW_FIGURE).is_file()
    # Trained models are found again, not retrained: the same rows give the same scores.
    again = ex.run_experiment(config, ["full", "no_cot"], tmp_path / "work", held_out=4, log=lambda _: None)
    assert again["full"].rows == results["full"].rows and again["no_cot"].rows == results["no_cot"].rows


def test_unknown_row_and_no_prompts_are_one_line():
    with pytest.raises(ex.ExperimentError, match="unknown experiment row 'nope' \\(rows: untrained, full"):
        ex.check_rows(["full", "nope"])
    with pytest.raises(ex.ExperimentError, match="at least one held-out prompt"):
        ex.held_out_prompts(load_config(profile="tiny"), 0)


def _params(root: Path) -> Path:
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["profile"] = "tiny"
    raw["paths"].update(datasets=str(root / "datasets"), metrics=str(root / "metrics"), models=str(root / "models"),
                        mlflow_tracking_uri=f"sqlite:///{root / 'mlruns.db'}", mlflow_artifacts=str(root / "mlart"))
    tiny = raw["profiles"]["tiny"]
    tiny["train"].update(max_steps=3, procedural_samples=12, max_plan_tokens=24)
    tiny["detokenizer"].update(max_steps=3, decode_steps=2)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_assets_write_the_table_and_nest_the_row_runs(tiny_zoo, tmp_path, monkeypatch):
    import dagster as dg
    from mlflow.tracking import MlflowClient

    from music_dagster import tracking
    from music_dagster.assets import experiment
    from music_dagster.resources import ProjectConfig, build_resources

    monkeypatch.setenv("MUSIC_PARAMS", str(_params(tmp_path)))
    monkeypatch.delenv("MUSIC_PROFILE", raising=False)
    default_config.cache_clear()
    try:
        config = default_config()
        resources = build_resources(ProjectConfig.from_environment())
        run_config = {"ops": {"procedural_row": {"config": {"held_out": 3, "work_dir": str(tmp_path / "work")}}}}
        for row in ("full", "untrained"):
            result = dg.materialize([experiment.procedural_row], partition_key=row, resources=resources,
                                    run_config=run_config)
            meta = result.asset_materializations_for_node("procedural_row")[0].metadata
            assert f"| {row} |" in meta["scores"].value and "placement" in meta
        assert "data:image/png;base64," in meta["examples"].value
        result = dg.materialize([experiment.procedural_report], resources=resources,
                                selection=[experiment.procedural_report])
        meta = result.asset_materializations_for_node("procedural_report")[0].metadata
        assert "| full |" in meta["table"].value and "| untrained |" in meta["table"].value
        assert "data:image/png;base64," in meta["image_grid"].value and meta["rows"].value == 2
        report = json.loads((tmp_path / "metrics" / ex.RESULTS_FILE).read_text())
        assert set(report["rows"]) == {"full", "untrained"}

        store = tracking.store_from_config(config)
        client = MlflowClient(store.tracking_uri)
        experiment_id = client.get_experiment_by_name(store.experiment).experiment_id
        parent = client.search_runs([experiment_id], filter_string="attributes.run_name = 'procedural experiment'")[0]
        children = client.search_runs([experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert {c.data.tags["row"] for c in children} == {"full", "untrained"}
        assert "full/placement" in parent.data.metrics and "gap/full-untrained/placement" in parent.data.metrics
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {ex.RESULTS_FILE, ex.PLOT_FILE, ex.FIGURE_FILE, ex.TABLE_FILE} <= artifacts
    finally:
        default_config.cache_clear()
