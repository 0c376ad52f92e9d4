"""Scheduled regeneration: off by default, each tick adds the next shards and requests their data runs; the runs
it requests produce complete shards that training picks up."""
import os

import dagster as dg
import pytest
import yaml

from music_dagster.assets import data
from music_dagster.assets.schedules import REGENERATION_INTERVAL_S, next_shard_keys, shard_regeneration
from music_dagster.config import PARAMS_FILE, default_config, load_config


@pytest.fixture
def one_shard_per_tick(tmp_path, monkeypatch):
    """params.yaml with `data.num_shards: 1`, 2 samples a shard and datasets under tmp_path (this test only)."""
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["profile"] = "tiny"
    raw["paths"]["objects365"] = str(load_config(profile="tiny").paths.resolve("objects365"))
    raw["paths"]["datasets"] = str(tmp_path / "datasets")
    raw["profiles"]["tiny"]["data"].update(num_shards=1, shard_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MUSIC_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.delenv("MUSIC_PROFILE", raising=False)
    default_config.cache_clear()
    yield default_config()
    default_config.cache_clear()


def tick(instance: dg.DagsterInstance, cursor=None) -> dg.SensorResult:
    return shard_regeneration(dg.build_sensor_context(instance=instance, cursor=cursor))


def apply(instance: dg.DagsterInstance, result: dg.SensorResult) -> list[dict]:
    """What the sensor daemon does with a tick before it launches the runs: add the requested partitions. Returns
    each requested run's tags (which name its partition range)."""
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return [dict(r.tags) for r in result.run_requests]


def ranges(result: dg.SensorResult) -> list[tuple]:
    return [(r.partition_key, r.run_key, r.tags.get("dagster/asset_partition_range_start"),
             r.tags.get("dagster/asset_partition_range_end")) for r in result.run_requests]


def test_regeneration_is_in_the_code_location_stopped_and_targets_the_data_graph():
    from music_dagster.definitions import defs

    sensor = defs.resolve_sensor_def("shard_regeneration")
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.job_name == "data_job"
    assert sensor.minimum_interval_seconds == REGENERATION_INTERVAL_S


def test_new_keys_follow_the_highest_numbered_shard():
    assert next_shard_keys([], 2) == ["shard-00000", "shard-00001"]
    assert next_shard_keys(["shard-00000", "shard-00007", "shard-00003"], 1) == ["shard-00008"]
    assert next_shard_keys(["shard-00002", "my-extra-shard"], 2) == ["shard-00003", "shard-00004"]


def test_each_tick_adds_the_next_shards_and_requests_one_data_run_over_their_range(one_shard_per_tick):
    instance = dg.DagsterInstance.ephemeral()
    data.ensure_shards(instance, 2)
    first = tick(instance)
    assert [(r.partitions_def_name, list(r.partition_keys)) for r in first.dynamic_partitions_requests] == [
        ("shards", ["shard-00002"])]
    assert ranges(first) == [(None, "shard-00002...shard-00002", "shard-00002", "shard-00002")]
    assert first.cursor == "shard-00002"
    # Before the daemon applies a tick nothing changes; after it, the next tick moves on.
    assert instance.get_dynamic_partitions("shards") == ["shard-00000", "shard-00001"]
    apply(instance, first)
    second = tick(instance, first.cursor)
    assert ranges(second) == [(None, "shard-00003...shard-00003", "shard-00003", "shard-00003")]


def test_a_tick_of_several_shards_is_one_run_over_their_range(one_shard_per_tick):
    instance = dg.DagsterInstance.ephemeral()
    data.ensure_shards(instance, 1)
    raw = yaml.safe_load(open(os.environ["MUSIC_PARAMS"]))
    raw["profiles"]["tiny"]["data"]["num_shards"] = 3
    with open(os.environ["MUSIC_PARAMS"], "w") as f:
        yaml.safe_dump(raw, f)
    default_config.cache_clear()
    result = tick(instance)
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [
        ["shard-00001", "shard-00002", "shard-00003"]]
    assert ranges(result) == [(None, "shard-00001...shard-00003", "shard-00001", "shard-00003")]


@pytest.mark.slow
def test_requested_runs_make_complete_shards_that_training_picks_up(one_shard_per_tick, tiny_zoo):
    from music_dagster.assets.training import SAMPLES_ASSET, select_sources
    from music_dagster.resources import ProjectConfig, build_resources

    config = one_shard_per_tick
    instance = dg.DagsterInstance.ephemeral()
    # The data graph with resources of this test's config (the code location's are built when it is imported).
    job = dg.Definitions(assets=data.DATA_ASSETS, jobs=[data.data_job],
                         resources=build_resources(ProjectConfig.from_environment())).resolve_job_def("data_job")
    done = []
    for _ in range(2):  # two ticks: shard-00000 (an MSIC hold-out with this seed), then shard-00001 (training)
        result = tick(instance)
        for tags in apply(instance, result):
            assert job.execute_in_process(tags=tags, instance=instance).success
            done.append(tags["dagster/asset_partition_range_start"])
    assert done == ["shard-00000", "shard-00001"]
    _, keys, version = select_sources(config, config.paths.resolve("datasets") / SAMPLES_ASSET)
    assert keys == done
    assert version
