"""Scheduled regeneration: off by default, each tick adds the next shards and requests their data runs; the runs
it requests produce complete shards that training picks up."""
import dagster as dg
import pytest

from music_dagster.assets import data
from music_dagster.assets.schedules import REGENERATION_INTERVAL_S, next_shard_keys, shard_regeneration
from music_dagster.resources import ProjectConfig


@pytest.fixture
def shards_per_tick(tmp_path, make_project):
    """`shards_per_tick(n)`: params.yaml with `data.num_shards: n`, 2 samples a shard and datasets under tmp_path:
    its `project` resource."""
    return lambda n: make_project(tmp_path, paths={"datasets": tmp_path / "datasets"},
                                  data={"num_shards": n, "shard_size": 2})


@pytest.fixture
def one_shard_per_tick(shards_per_tick) -> ProjectConfig:
    return shards_per_tick(1)


def tick(instance: dg.DagsterInstance, project: ProjectConfig, cursor=None) -> dg.SensorResult:
    return shard_regeneration(dg.build_sensor_context(instance=instance, cursor=cursor,
                                                      resources={"project": project}))


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
    first = tick(instance, one_shard_per_tick)
    assert [(r.partitions_def_name, list(r.partition_keys)) for r in first.dynamic_partitions_requests] == [
        ("shards", ["shard-00002"])]
    assert ranges(first) == [(None, "shard-00002...shard-00002", "shard-00002", "shard-00002")]
    assert first.cursor == "shard-00002"
    # Before the daemon applies a tick nothing changes; after it, the next tick moves on.
    assert instance.get_dynamic_partitions("shards") == ["shard-00000", "shard-00001"]
    apply(instance, first)
    second = tick(instance, one_shard_per_tick, first.cursor)
    assert ranges(second) == [(None, "shard-00003...shard-00003", "shard-00003", "shard-00003")]


def test_a_tick_of_several_shards_is_one_run_over_their_range(shards_per_tick):
    instance = dg.DagsterInstance.ephemeral()
    data.ensure_shards(instance, 1)
    result = tick(instance, shards_per_tick(3))
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [
        ["shard-00001", "shard-00002", "shard-00003"]]
    assert ranges(result) == [(None, "shard-00001...shard-00003", "shard-00001", "shard-00003")]


@pytest.mark.slow
def test_requested_runs_make_complete_shards_that_training_picks_up(one_shard_per_tick, tiny_zoo):
    from music_dagster.assets.training import SAMPLES_ASSET, select_sources
    from music_dagster.resources import build_resources

    project = one_shard_per_tick
    config = project.get()
    instance = dg.DagsterInstance.ephemeral()
    # The data graph with resources of this test's config (the code location's are built when it is imported).
    job = dg.Definitions(assets=data.DATA_ASSETS, jobs=[data.data_job],
                         resources=build_resources(project)).resolve_job_def("data_job")
    done = []
    for _ in range(2):  # two ticks: shard-00000 (an MSIC hold-out with this seed), then shard-00001 (training)
        result = tick(instance, project)
        for tags in apply(instance, result):
            assert job.execute_in_process(tags=tags, instance=instance).success
            done.append(tags["dagster/asset_partition_range_start"])
    assert done == ["shard-00000", "shard-00001"]
    _, keys, version = select_sources(config, config.paths.resolve("datasets") / SAMPLES_ASSET)
    assert keys == done
    assert version
