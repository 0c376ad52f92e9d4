"""MLflow helpers on a throwaway SQLite store: params, per-step metrics, tags, artifacts, nesting, `music runs`."""
import dataclasses
import json
import re
import time

import pytest

from music_dagster import tracking
from music_dagster.config import load_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return tracking.Store(tracking_uri=f"sqlite:///{root / 'mlruns.db'}", artifact_root=(root / "art").as_uri(),
                          system_metrics_interval_s=0.2)


@pytest.fixture(scope="module")
def config():
    return load_config()


def test_flatten_nested_config():
    flat = tracking.flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2], "f": "x"})
    assert flat == {"a.b": "1", "a.c.d": "", "e": "[1, 2]", "f": "x"}


def test_store_from_config_is_anchored_at_project_root(config):
    store = tracking.store_from_config(config)
    assert store.tracking_uri == f"sqlite:///{tracking.PROJECT_ROOT / 'mlruns.db'}"
    assert store.artifact_root == (tracking.PROJECT_ROOT / "mlartifacts").as_uri()


def test_training_run_holds_config_metrics_tags_artifacts(store, config, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "weights.bin").write_bytes(b"\x00\x01")
    with tracking.start_training_run(store, config, "train", {tracking.TAG_DAGSTER_RUN: "dg-1"}) as run:
        for step in range(3):
            run.log_step(step, {"L1": 3.0 - step, "L2": 1.0, "loss": 2.0, "lr": 1e-4})
        run.log_artifacts(tmp_path / "adapter", "adapter")
        run.set_tags({tracking.TAG_CHECKPOINT_HASH: "abc"})
        time.sleep(0.7)  # a few system-metric samples
    mlf = tracking.client(store)
    got = mlf.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == tracking.config_params(config)
    assert got.data.params["profile.data.grid"] == "8"
    assert [m.value for m in mlf.get_metric_history(run.run_id, "L1")] == [3.0, 2.0, 1.0]
    assert [m.step for m in mlf.get_metric_history(run.run_id, "lr")] == [0, 1, 2]
    assert any(k.startswith("system/cpu") for k in got.data.metrics)
    assert got.data.tags[tracking.TAG_DAGSTER_RUN] == "dg-1"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", got.data.tags[tracking.TAG_GIT_COMMIT])  # others commit meanwhile
    assert got.data.tags[tracking.TAG_KIND] == "training"
    assert [a.path for a in mlf.list_artifacts(run.run_id, "adapter")] == ["adapter/weights.bin"]


def test_failed_body_marks_run_failed(store):
    with pytest.raises(RuntimeError):
        with tracking.start_run(store, "boom") as run:
            raise RuntimeError("x")
    assert tracking.client(store).get_run(run.run_id).info.status == "FAILED"


def test_nested_run_under_finished_parent_and_run_ref(store, tmp_path):
    with tracking.start_run(store, "parent", {tracking.TAG_KIND: "training"}) as parent:
        pass
    tracking.write_run_ref(tmp_path, parent)
    ref = tracking.read_run_ref(tmp_path)
    assert ref["run_id"] == parent.run_id and ref["url"].endswith(f"/runs/{parent.run_id}")
    with tracking.start_nested_run(store, ref["run_id"], "msic") as child:
        child.log_metrics({"clip_t": 0.25})
    got = tracking.client(store).get_run(child.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.run_id
    assert got.data.tags[tracking.TAG_KIND] == "evaluation"
    assert got.info.experiment_id == parent.experiment_id


def test_unknown_parent_and_missing_ref_are_user_errors(store, tmp_path):
    with pytest.raises(tracking.TrackingError, match="not found"):
        with tracking.start_nested_run(store, "0" * 32, "x"):
            pass
    with pytest.raises(tracking.TrackingError, match="mlflow_run.json"):
        tracking.read_run_ref(tmp_path)


def test_data_version_is_order_free_and_content_sensitive(tmp_path):
    a, b = tmp_path / "s0" / "manifest.jsonl", tmp_path / "s1" / "manifest.jsonl"
    for p, text in ((a, "x\n"), (b, "y\n")):
        p.parent.mkdir()
        p.write_text(text)
    v = tracking.data_version([a, b], root=tmp_path)
    assert v == tracking.data_version([b, a], root=tmp_path)
    assert tracking.data_version([a, b], root=tmp_path, extra=["procedural:0:512"]) != v
    b.write_text("z\n")
    assert tracking.data_version([a, b], root=tmp_path) != v


def test_folder_hash_ignores_run_ref(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"1")
    h = tracking.folder_hash(tmp_path)
    (tmp_path / tracking.RUN_REF).write_text(json.dumps({"run_id": "r"}))
    assert tracking.folder_hash(tmp_path) == h
    (tmp_path / "w.safetensors").write_bytes(b"2")
    assert tracking.folder_hash(tmp_path) != h


def test_print_runs_lists_params_losses_scores_checkpoint(store, capsys):
    store = dataclasses.replace(store, experiment="runs-listing")  # same database, a fresh experiment
    tracking.print_runs(5, store=store)
    assert "no training runs yet" in capsys.readouterr().out
    ids = []
    for lr in ("0.001", "0.0001"):
        with tracking.start_run(store, f"lr{lr}", {tracking.TAG_KIND: "training"}) as run:
            run.log_params({"profile.train.lr": lr, "seed": 0, "unrelated": 1})
            run.log_step(0, {"loss": 2.0, "L1": 3.0, "L2": 1.0})
            run.log_step(1, {"loss": 1.5, "L1": 2.0, "L2": 1.0})
            run.set_tags({tracking.TAG_CHECKPOINT_HASH: f"{lr}-hash-long-enough"})
        ids.append(run.run_id)
    with tracking.start_nested_run(store, ids[0], "msic") as child:
        child.log_metrics({"music/clip_t": 0.3, "music/failures": 0})
        child.log_step(2, {"music/by_subject_count/clip_t": 0.1})
    rows = tracking.list_runs(store, limit=5)
    assert [r["run_id"] for r in rows] == ids[::-1]  # newest first, nested evaluation runs not listed
    assert rows[1]["params"] == {"seed": "0", "lr": "0.001"}
    assert rows[1]["losses"] == {"loss": 1.5, "L1": 2.0, "L2": 1.0}
    assert rows[1]["scores"] == {"msic/music/clip_t": 0.3}  # overall scores, not counts or per-subject-count rows
    assert len(tracking.list_runs(store, limit=1)) == 1
    tracking.print_runs(5, store=store)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "name", "status"]
    assert ids[0][:8] in out[2] and "msic/music/clip_t=0.3" in out[2] and "0.001-hash-l" in out[2]
    with pytest.raises(tracking.TrackingError, match="limit"):
        tracking.list_runs(store, limit=0)
