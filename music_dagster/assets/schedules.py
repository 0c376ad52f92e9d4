"""Scheduled regeneration of the dataset: new shards on a fixed cadence, off until someone turns it on in the UI.

Each tick registers the next shard keys (`shard-<n>` after the highest existing one) as partitions of `shards` and
requests one `data_job` run over their key range (each step loads its models once for all of them; a shard
that fails inside the run fails alone). It is a sensor with a minimum interval, not a cron schedule: in Dagster a
schedule cannot add dynamic partitions, while a sensor's `SensorResult` adds them before its runs launch. Training
needs no trigger of its own: `lora_checkpoint` and `detokenizer` train on every complete `training_samples` shard
at the time they run (MSIC hold-out shards are never trained on). The number of shards a tick adds is the config's
`data.num_shards`, read through the `project` resource.
"""
import dagster as dg

from music_dagster.assets.data import SHARDS, data_job, partition_range
from music_dagster.resources.project import ProjectConfig
from music_dagster.synthesis.common import shard_index, shard_key

REGENERATION_INTERVAL_S = 24 * 60 * 60


def next_shard_keys(existing, n: int) -> list[str]:
    """`n` new keys numbered after the highest existing `shard-<i>` (other key names do not count)."""
    indexes = [i for i in map(shard_index, existing) if i is not None]
    start = max(indexes, default=-1) + 1
    return [shard_key(i) for i in range(start, start + n)]


# The job by name: the Kubernetes code location (`music_dagster.k8s`) has its own `data_job`, with another executor.
@dg.sensor(job_name=data_job.name, minimum_interval_seconds=REGENERATION_INTERVAL_S,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Daily: add `data.num_shards` new shards and materialize the data graph over them in one run")
def shard_regeneration(context: dg.SensorEvaluationContext, project: ProjectConfig) -> dg.SensorResult:
    keys = next_shard_keys(context.instance.get_dynamic_partitions(SHARDS.name),
                           project.get().profile.data.num_shards)
    context.log.info(f"adding shards {keys[0]} .. {keys[-1]}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"{keys[0]}...{keys[-1]}", tags=partition_range(keys[0], keys[-1]))],
        dynamic_partitions_requests=[SHARDS.build_add_request(keys)],
        cursor=keys[-1],
    )


defs = dg.Definitions(sensors=[shard_regeneration])
