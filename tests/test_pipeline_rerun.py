"""A re-run of the data graph picks up only what is missing (`pipeline.materialize_shards`, what `music pipeline`
runs): every shard up to date is no run at all and leaves every file as it was (bytes and mtimes); a deleted shard,
or one that failed last time, is the only one run again, with the first run's bytes; a changed `data` setting runs
every shard again, as `force` does. Tiny profile, 3 shards of 2 samples, on a copy of one first complete run."""
import hashlib
import shutil
from pathlib import Path

import dagster as dg
import pytest

from music_dagster.assets import data
from music_dagster.config import default_config
from music_dagster.synthesis.stages import STAGE_NAMES

DATA = {"num_shards": 3, "shard_size": 2}
KEYS = ["shard-00000", "shard-00001", "shard-00002"]


def _open(root: Path, make_project, monkeypatch, **data_overrides):
    """The project under `root` (outputs under it, `DATA` and `data_overrides` in its `data` section) made the
    process's config, the code location's `data_job` running on it, and its Dagster instance under `root/home`."""
    from music_dagster import definitions
    from music_dagster.resources.models import model_resources
    from music_dagster.resources.storage import DatasetStore

    from music_dagster.resources.project import _load

    project = make_project(root, outputs=True, data={**DATA, **data_overrides})
    _load.cache_clear()  # a params file rewritten within one mtime tick is read again all the same
    for key, value in project.environment().items():
        monkeypatch.setenv(key, value)
    default_config.cache_clear()
    config = project.get()
    monkeypatch.setattr(definitions, "defs", dg.Definitions(
        assets=data.DATA_ASSETS, jobs=[data.data_job],
        resources={"project": project, "store": DatasetStore.from_config(config), **model_resources(config)}))
    (root / "home").mkdir(exist_ok=True)
    return dg.DagsterInstance.local_temp(str(root / "home"))


def _files(root: Path, key: str = "*") -> dict[str, tuple[str, int]]:
    """Every file of the shards `key` under `root/datasets`: its sha256 and mtime (ns)."""
    datasets = root / "datasets"
    return {p.relative_to(datasets).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(datasets.glob(f"*/{key}/**/*")) if p.is_file()}


def _bytes(files: dict[str, tuple[str, int]]) -> dict[str, str]:
    return {name: digest for name, (digest, _) in files.items()}


def _new_ranges(instance, before: set[str]) -> list[tuple[str, str]]:
    """The partition ranges of the runs started since the runs `before`, oldest first."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    runs = [r for r in reversed(instance.get_runs()) if r.run_id not in before]
    return [(r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG]) for r in runs]


def _run_ids(instance) -> set[str]:
    return {r.run_id for r in instance.get_runs()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, make_project, tiny_zoo):
    """A project whose 3 shards were all materialized by one `materialize_shards`: its root, and its files."""
    from music_dagster.pipeline import materialize_shards

    root = tmp_path_factory.mktemp("rerun") / "p"
    with pytest.MonkeyPatch.context() as monkeypatch:
        instance = _open(root, make_project, monkeypatch)
        assert materialize_shards(instance) == KEYS
        assert _new_ranges(instance, set()) == [(KEYS[0], KEYS[-1])]
        instance.dispose()
    default_config.cache_clear()
    files = _files(root)
    assert {name.split("/")[0] for name in files} == set(STAGE_NAMES) and len(files) > 60
    return root, files


@pytest.fixture
def project(first_run, tmp_path, make_project, monkeypatch):
    """A copy of the first run's project (files with their mtimes, instance included): its root and instance."""
    root = tmp_path / "p"
    shutil.copytree(first_run[0], root, symlinks=True)
    instance = _open(root, make_project, monkeypatch)
    assert _files(root) == first_run[1]
    yield root, instance
    instance.dispose()
    default_config.cache_clear()


@pytest.mark.slow
def test_a_second_run_with_every_shard_up_to_date_runs_nothing(project, capsys):
    from music_dagster.pipeline import materialize_shards, stale_shards

    root, instance = project
    before = _files(root)
    runs = _run_ids(instance)
    assert stale_shards(instance, default_config(), KEYS) == {}
    assert materialize_shards(instance) == KEYS
    assert _run_ids(instance) == runs  # no run at all
    assert _files(root) == before  # every file: same bytes, same mtime
    out = capsys.readouterr().out
    assert "music pipeline: data: all 3 shards up to date" in out and "no data run" in out


@pytest.mark.slow
def test_a_deleted_shard_is_the_only_one_run_again_with_the_same_bytes(project, first_run, capsys):
    from music_dagster.pipeline import materialize_shards, stale_shards

    root, instance = project
    shutil.rmtree(root / "datasets" / "training_samples" / "shard-00001")
    assert stale_shards(instance, default_config(), KEYS) == {"shard-00001": "missing"}
    others = {k: _files(root, k) for k in ("shard-00000", "shard-00002")}
    runs = _run_ids(instance)
    materialize_shards(instance)
    assert _new_ranges(instance, runs) == [("shard-00001", "shard-00001")]
    assert "data: 2 of 3 up to date, skipped; running 1 of 3 shards (missing) in 1 run: shard-00001" in (
        capsys.readouterr().out)
    assert _bytes(_files(root, "shard-00001")) == _bytes({n: v for n, v in first_run[1].items()
                                                          if n.split("/")[1] == "shard-00001"})
    assert {k: _files(root, k) for k in others} == others  # untouched: bytes and mtimes
    assert stale_shards(instance, default_config(), KEYS) == {}


@pytest.mark.slow
def test_a_shard_that_failed_last_time_is_the_only_one_run_again(project, first_run, fail_captions):
    from music_dagster.pipeline import materialize_shards, run_job, stale_shards

    root, instance = project
    fail_captions("shard-00001")
    run_job("data_job", instance, partition_range=("shard-00001", "shard-00002"))  # shard-00001 fails alone
    fail_captions(None)
    # Its folders still hold the first run's copies: its latest records say it failed.
    assert all((root / "datasets" / name / "shard-00001" / "manifest.jsonl").is_file() for name in STAGE_NAMES)
    assert stale_shards(instance, default_config(), KEYS) == {"shard-00001": "failed"}
    others = {k: _files(root, k) for k in ("shard-00000", "shard-00002")}
    runs = _run_ids(instance)
    materialize_shards(instance)
    assert _new_ranges(instance, runs) == [("shard-00001", "shard-00001")]
    assert {k: _files(root, k) for k in others} == others
    assert _bytes(_files(root)) == _bytes(first_run[1])
    assert stale_shards(instance, default_config(), KEYS) == {}


@pytest.mark.slow
def test_a_changed_data_setting_runs_every_shard_again(project, make_project, monkeypatch):
    from music_dagster.pipeline import materialize_shards, stale_shards

    root, instance = project
    before = _files(root, "*")
    _open(root, make_project, monkeypatch, shard_size=3).dispose()  # the same project, with 3 samples a shard
    assert stale_shards(instance, default_config(), KEYS) == {k: "changed settings" for k in KEYS}
    runs = _run_ids(instance)
    materialize_shards(instance)
    assert _new_ranges(instance, runs) == [(KEYS[0], KEYS[-1])]
    after = _files(root)
    assert all(after[name][1] != before[name][1] for name in before if name in after)  # every file written again
    assert stale_shards(instance, default_config(), KEYS) == {}


@pytest.mark.slow
def test_force_runs_every_shard_again_with_the_same_bytes(project, first_run, capsys):
    from music_dagster.pipeline import materialize_shards

    root, instance = project
    runs = _run_ids(instance)
    materialize_shards(instance, force=True)
    assert _new_ranges(instance, runs) == [(KEYS[0], KEYS[-1])]
    assert "data: none skipped (forced); running 3 of 3 shards in 1 run: shard-00000..shard-00002" in (
        capsys.readouterr().out)
    after = _files(root)
    assert _bytes(after) == _bytes(first_run[1])
    assert all(after[name][1] != mtime for name, (_, mtime) in first_run[1].items())


def test_stale_keys_run_as_contiguous_ranges_in_registration_order():
    from music_dagster.pipeline import contiguous_ranges

    order = [f"shard-{i:05d}" for i in range(8)]
    assert contiguous_ranges(order, ["shard-00005", "shard-00001", "shard-00002", "shard-00007"]) == [
        ["shard-00001", "shard-00002"], ["shard-00005"], ["shard-00007"]]
    assert contiguous_ranges(order, order) == [order]
    assert contiguous_ranges(order, []) == []
