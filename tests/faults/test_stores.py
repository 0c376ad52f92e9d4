"""Stores and folders: a damaged or read-only MLflow store, and read-only datasets, shard, checkpoint, artifact,
scores and metrics folders, are each one line naming the path and the fix, before any model runs, and leave the data,
the models and the MLflow store byte-identical with no temporary or old copy behind.

Root ignores file permissions, so every command runs with CAP_DAC_OVERRIDE dropped (`music_as_user`)."""
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    assert_one_line_error, copy_project, music_as_user, read_only, snapshot, writable,
)
from projects import project_env

pytestmark = pytest.mark.slow


@pytest.fixture()
def project(trained, tmp_path):
    """(a copy of the trained project with its own MLflow artifact folder, its HOME); write permission is given
    back afterwards so the copy can be deleted."""
    root = copy_project(trained, tmp_path / "p")
    home = tmp_path / "home"
    home.mkdir()
    yield root, home
    writable(root)


def _leftovers(root: Path) -> list[str]:
    """Writers' temporary or renamed-away copies anywhere in the stores."""
    return sorted(str(p.relative_to(root)) for name in ("datasets", "models", "mlartifacts", "metrics")
                  for p in (root / name).rglob(".*") if ".tmp." in p.name or ".old." in p.name)


def _refused(root: Path, home: Path, args: tuple[str, ...], *fragments: str) -> str:
    """`music <args>` exits 2 with one line holding `fragments`, and leaves the stores as they were."""
    before = snapshot(root)
    line = assert_one_line_error(music_as_user(root, home, *args), 2, *fragments)
    assert snapshot(root) == before
    assert _leftovers(root) == []
    return line


def _damage(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:100] = bytes(100)  # the SQLite header: "file is not a database"
    db.write_bytes(bytes(data))


def test_a_read_only_store_is_refused_before_training(project):
    root, home = project
    db = root / "mlruns.db"
    read_only(db)
    _refused(root, home, ("stage", "train"), f"{db}: the MLflow store is read-only; make it writable "
                                             f"(chmod u+w {db}), or set paths.mlflow_tracking_uri in params.yaml")


def test_a_read_only_store_is_still_listed(project):
    root, home = project
    read_only(root / "mlruns.db")
    proc = music_as_user(root, home, "runs")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert len(proc.stdout.splitlines()) == 3  # the header, the de-tokenizer's run and the LoRA's


@pytest.mark.parametrize("command", [("stage", "train"), ("runs",)])
def test_a_damaged_store_is_one_line(project, command):
    root, home = project
    db = root / "mlruns.db"
    _damage(db)
    line = _refused(root, home, command, f"{db}: the MLflow store is damaged (file is not a database); "
                                         f"move it aside (mv {db} {db}.damaged)")
    assert line.startswith("music: error: ")


def test_a_read_only_store_folder_is_refused(project):
    """SQLite writes a journal beside the store: its folder must take new files."""
    root, home = project
    store = root / "store"
    store.mkdir()
    os.replace(root / "mlruns.db", store / "mlruns.db")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("sqlite:///mlruns.db", "sqlite:///store/mlruns.db"))
    store.chmod(0o555)  # the folder only: the store itself stays writable
    _refused(root, home, ("stage", "train"),
             f"{store}: read-only, so {store / 'mlruns.db'} cannot be written; make it writable "
             f"(chmod u+w {store}), or set paths.mlflow_tracking_uri in params.yaml")


def test_a_read_only_artifact_folder_is_refused_before_training(project):
    root, home = project
    read_only(root / "mlartifacts")
    folder = root / "mlartifacts" / "music"
    _refused(root, home, ("stage", "train"),
             f"{folder}: read-only; make it writable (chmod u+w {folder}), or set paths.mlflow_artifacts")


def test_a_read_only_checkpoint_is_not_replaced(project):
    root, home = project
    lora = root / "models" / "lora"
    read_only(lora)
    _refused(root, home, ("stage", "train"),
             f"{lora}: read-only, so it is not replaced; make it writable (chmod -R u+w {lora}) to write it again")


def test_a_read_only_datasets_folder_is_refused_before_the_llm_runs(project):
    root, home = project
    read_only(root / "datasets")
    asset = root / "datasets" / "category_combos"
    line = _refused(root, home, ("stage", "data"),
                    f"{asset}: read-only, so {asset / 'shard-00000'} cannot be written; make it writable "
                    f"(chmod u+w {asset}), or set paths.datasets in params.yaml")
    assert ".tmp." not in line  # names the shard, not a temporary folder


def test_a_read_only_empty_datasets_root_is_refused(project):
    root, home = project
    datasets = root / "datasets"
    shutil.rmtree(datasets)  # as a clone before its first data stage
    datasets.mkdir()
    read_only(datasets)
    _refused(root, home, ("stage", "data"),
             f"{datasets}: read-only, so {datasets / 'category_combos' / 'shard-00000'} cannot be written; "
             f"make it writable (chmod u+w {datasets}), or set paths.datasets in params.yaml")
    assert list(datasets.iterdir()) == []


def test_a_read_only_shard_in_a_writable_folder_is_not_replaced(project):
    root, home = project
    shard = root / "datasets" / "category_combos" / "shard-00000"
    read_only(shard)
    _refused(root, home, ("stage", "data"),
             f"{shard}: read-only, so it is not replaced; make it writable (chmod -R u+w {shard}) to write it again")


def test_a_read_only_scores_folder_is_refused_before_evaluating(project):
    root, home = project
    scores = root / "datasets" / "dreambench_scores"
    read_only(scores)
    _refused(root, home, ("stage", "evaluate"), f"{scores}: read-only, so it is not replaced")


def test_a_read_only_metrics_folder_is_refused_before_evaluating(project):
    root, home = project
    metrics = root / "metrics"
    before = {p.name: p.read_bytes() for p in metrics.iterdir()}
    read_only(metrics)
    _refused(root, home, ("stage", "evaluate"),
             f"{metrics}: read-only; make it writable (chmod u+w {metrics}), or set paths.metrics")
    assert {p.name: p.read_bytes() for p in metrics.iterdir()} == before


def test_the_write_probe_leaves_a_healthy_store_as_it_was(project):
    """What `music runs` and a training run probe is rolled back: a healthy store keeps every byte."""
    root, _ = project
    db = root / "mlruns.db"
    before = db.read_bytes()
    code = ("from music_dagster.tracking import runs as tracking; from music_dagster.config import default_config\n"
            "tracking.check_store(tracking.store_from_config(default_config()))")
    env = project_env(root / "params.yaml", PYTHONPATH=str(root))
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True)
    assert db.read_bytes() == before
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'music_write_probe'").fetchone() == (0,)


def test_the_pipeline_checks_every_output_before_its_first_job(project):
    """`music pipeline` with a read-only metrics folder: refused before the data stage, not after training."""
    root, home = project
    metrics = root / "metrics"
    read_only(metrics)
    before = snapshot(root)
    proc = music_as_user(root, home, "pipeline")
    assert_one_line_error(proc, 2, f"{metrics}: read-only; make it writable (chmod u+w {metrics})")
    assert "data_job" not in proc.stdout and "training_job" not in proc.stdout  # no job started
    assert snapshot(root) == before and _leftovers(root) == []
