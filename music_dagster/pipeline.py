"""The main job: the whole pipeline on the project's Dagster instance, as the UI would run it.

`music pipeline` builds the tiny model zoo when a configured folder is missing, registers the profile's shards,
materializes the data graph shard by shard, then training and evaluation. Every run lands in the instance under
`DAGSTER_HOME` (default `.dagster_home/`), so `make ui` shows the runs, lineage and metadata afterwards.
"""
from __future__ import annotations

import os
import time

from music_dagster.config import PROJECT_ROOT, ConfigError, default_config


def _instance():
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home"))
    import dagster as dg

    return dg.DagsterInstance.get()


# The console shows what a person follows (stage progress, kept/dropped counts); the UI keeps every event.
_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def _run(defs, job_name: str, instance, partition_key: str | None = None) -> None:
    label = job_name if partition_key is None else f"{job_name}[{partition_key}]"
    start = time.perf_counter()
    print(f"music pipeline: {label} ...", flush=True)
    result = defs.resolve_job_def(job_name).execute_in_process(
        run_config=_RUN_CONFIG, instance=instance, partition_key=partition_key
    )
    print(f"music pipeline: {label} succeeded in {time.perf_counter() - start:.1f} s (run {result.run_id})", flush=True)


def run_pipeline(num_shards: int | None = None) -> None:
    """Materialize every asset on the configured profile, `num_shards` data shards (default: the profile's)."""
    from music_dagster.assets.data import ensure_shards
    from music_dagster.definitions import defs

    config = default_config()
    instance = _instance()
    try:
        config.check_models()
    except ConfigError:
        _run(defs, "zoo_job", instance)
        config.check_models()
    for key in ensure_shards(instance, num_shards or config.profile.data.num_shards):
        _run(defs, "data_job", instance, partition_key=key)
    _run(defs, "training_job", instance)
    _run(defs, "evaluation_job", instance)
