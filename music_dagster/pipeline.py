"""The main job: the whole pipeline on the project's Dagster instance, as the UI would run it.

`music pipeline` builds the tiny model zoo when a configured folder is missing, registers the profile's shards,
materializes the data graph shard by shard, then training and evaluation. Every run lands in the instance under
`DAGSTER_HOME` (default `.dagster_home/`), so `make ui` shows the runs, lineage and metadata afterwards. DVC's stages
(`music stage ...`) run the same jobs through `run_job` and `materialize_shards`.
"""
from __future__ import annotations

import os
import time

from music_dagster.config import PROJECT_ROOT, ConfigError, default_config

# The console shows what a person follows (stage progress, kept/dropped counts); the UI keeps every event.
_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def project_instance():
    """The Dagster instance under DAGSTER_HOME, the project's `.dagster_home/` unless set."""
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home"))
    import dagster as dg

    return dg.DagsterInstance.get()


def run_job(job_name: str, instance, partition_key: str | None = None, assets: list[str] | None = None) -> None:
    """Execute one of the code location's jobs in this process (optionally a partition, or a subset of its assets)."""
    import dagster as dg

    from music_dagster.definitions import defs

    label = job_name + (f"[{partition_key}]" if partition_key else "") + (f" {assets}" if assets else "")
    start = time.perf_counter()
    print(f"music pipeline: {label} ...", flush=True)
    result = defs.resolve_job_def(job_name).execute_in_process(
        run_config=_RUN_CONFIG, instance=instance, partition_key=partition_key,
        asset_selection=[dg.AssetKey(a) for a in assets] if assets else None,
    )
    print(f"music pipeline: {label} succeeded in {time.perf_counter() - start:.1f} s (run {result.run_id})", flush=True)


def materialize_shards(instance, num_shards: int | None = None) -> None:
    """Register the first `num_shards` shard keys (default: `data.num_shards`) and run the data graph for each."""
    from music_dagster.assets.data import ensure_shards

    for key in ensure_shards(instance, num_shards or default_config().profile.data.num_shards):
        run_job("data_job", instance, partition_key=key)


def run_pipeline(num_shards: int | None = None) -> None:
    """Materialize every asset on the configured profile, `num_shards` data shards (default: the profile's)."""
    config = default_config()
    instance = project_instance()
    try:
        config.check_models()
    except ConfigError:
        run_job("zoo_job", instance)
        config.check_models()
    materialize_shards(instance, num_shards)
    run_job("training_job", instance)
    run_job("evaluation_job", instance)
