"""MLflow helpers on a throwaway SQLite store: params, per-step metrics, tags, artifacts, nesting, `music runs`."""
import dataclasses
import re
import time

import pytest

from music_dagster.config import load_config
from music_dagster.tracking import runs as tracking


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
        run.set_tags({tracking.TAG_DVC_HASH: "abc"})
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
            run.set_tags({tracking.TAG_DVC_HASH: f"{lr}-hash-long-enough"})
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


# ---------------------------------------------------------------------------------------------------------------
# A damaged or read-only store: one line naming it and the fix, before any run opens.
def _own_store(root):
    return tracking.Store(tracking_uri=f"sqlite:///{root / 'mlruns.db'}", artifact_root=(root / "art").as_uri())


def _damage(db):
    data = bytearray(db.read_bytes())
    data[:100] = bytes(100)  # the SQLite header
    db.write_bytes(bytes(data))


def test_the_write_probe_changes_nothing(tmp_path):
    store = _own_store(tmp_path)
    with tracking.start_run(store, "r"):
        pass
    db = tmp_path / "mlruns.db"
    before = db.read_bytes()
    tracking.check_store(store)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns.db"]  # no journal left


def test_a_damaged_store_is_one_line_for_writing_and_reading(tmp_path):
    store = _own_store(tmp_path)
    tracking.client(store)
    db = tmp_path / "mlruns.db"
    _damage(db)
    expected = (f"{db}: the MLflow store is damaged (file is not a database); move it aside (mv {db} "
                f"{db}.damaged) and run again to start a new store, or set paths.mlflow_tracking_uri in params.yaml")
    for call in (lambda: tracking.start_run(store, "r").__enter__(), lambda: tracking.list_runs(store)):
        with pytest.raises(tracking.TrackingError) as info:
            call()
        assert str(info.value) == expected


def test_a_read_only_store_is_refused_for_writing_but_still_read(tmp_path):
    import subprocess
    import sys

    from faults.helpers import as_user, read_only, writable

    store = _own_store(tmp_path)
    with tracking.start_training_run(store, load_config(), "train"):
        pass
    db = tmp_path / "mlruns.db"
    read_only(db)
    code = ("import sys\nfrom music_dagster.tracking import runs as tracking\n"
            "from music_dagster.errors import UserError\n"
            f"store = tracking.Store({store.tracking_uri!r}, {store.artifact_root!r})\n"
            "print(len(tracking.list_runs(store)))\n"
            "try:\n    tracking.start_run(store, 'r').__enter__()\nexcept UserError as e:\n    print(e)")
    try:
        proc = subprocess.run(as_user(sys.executable, "-c", code), capture_output=True, text=True)
    finally:
        writable(db)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "1", f"{db}: the MLflow store is read-only; make it writable (chmod u+w {db}), or set "
             f"paths.mlflow_tracking_uri in params.yaml to a writable store"]


def test_a_read_only_artifact_folder_is_refused_before_a_run_opens(tmp_path):
    import subprocess
    import sys

    from faults.helpers import as_user, read_only, writable

    store = _own_store(tmp_path)
    tracking.client(store)
    (tmp_path / "art" / "music").mkdir(parents=True)
    read_only(tmp_path / "art")
    code = ("from music_dagster.tracking import runs as tracking\n"
            f"tracking.check_store(tracking.Store({store.tracking_uri!r}, {store.artifact_root!r}))")
    try:
        proc = subprocess.run(as_user(sys.executable, "-c", code), capture_output=True, text=True)
    finally:
        writable(tmp_path / "art")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"music_dagster.storage.WriteError: {tmp_path / 'art' / 'music'}: read-only; make it writable (chmod u+w "
        f"{tmp_path / 'art' / 'music'}), or set paths.mlflow_artifacts in params.yaml to a writable folder")


def test_a_store_failing_after_the_checkpoint_is_published_says_where_it_is_kept(tmp_path):
    store = _own_store(tmp_path)
    with pytest.raises(tracking.TrackingError) as info:
        with tracking.start_run(store, "train") as run:
            run.keep(tmp_path / "models" / "lora", "music stage train")
            _damage(tmp_path / "mlruns.db")
            run.set_tags({tracking.TAG_DVC_HASH: "abc"})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'models' / 'lora'}: trained and kept, but logging it to MLflow failed (")
    assert message.endswith("); fix the store, then `music stage train` logs it again (training resumes at its "
                            "last step: nothing is retrained)")


def test_a_store_failing_before_the_checkpoint_is_published_keeps_its_own_error(tmp_path):
    store = _own_store(tmp_path)
    with pytest.raises(Exception) as info:
        with tracking.start_run(store, "train") as run:
            _damage(tmp_path / "mlruns.db")
            run.set_tags({"a": "b"})
    assert not isinstance(info.value, tracking.TrackingError)


def test_listing_a_store_without_the_experiment_creates_nothing(tmp_path):
    store = _own_store(tmp_path)
    assert tracking.list_runs(store) == []
    assert tracking.client(store, write=False).get_experiment_by_name(tracking.EXPERIMENT) is None
