"""`music bench orchestration`: how much of a data run's wall time is model and stage work, and what 2 runs at once
gain over one after another.

Each run is `data_job` over a range of shard keys as Dagster launches it: a fresh process (as the default run
launcher starts one), the job's own executor, a temporary on-disk instance whose `gpu` pool has one slot per device
(`devices: [cpu, cpu]` here: one per core). S is the sum of the run's step durations (model loads, stage work,
writes and checks: what a step's own code does), W the run's wall time from its process's start (Python, Dagster and
torch imports, run set-up, events) to the run's end (`execute_job` returned, after RUN_SUCCESS). The process's exit
after that (1.5-3 s of interpreter teardown once torch and the model libraries are loaded) is not counted: Dagster
counts a run finished at RUN_SUCCESS, and its queue starts the next run then. E = S / W for 4 shards as one range
run; P = the wall time of 2 range runs of 2 shards one after another (the sum of their W) divided by the same 2 runs
at once (the first process's start to the last run's end). Prints figures; asserts nothing.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SHARDS = 4
DEVICES = ["cpu", "cpu"]


def run_range(first: str, last: str, dagster_home: str, params: str) -> tuple[str, float, float]:
    """One run of `data_job` over shards `first` .. `last` in this (fresh) worker process (`execute_data_job`): (run
    id, the process's start time, the run's end time)."""
    import psutil

    from music_dagster.assets.data import partition_range
    from music_dagster.bench.parallel import execute_data_job

    started = psutil.Process().create_time()
    run_id, _ = execute_data_job(dagster_home, params, f"{first}...{last}", partition_range(first, last))
    return run_id, started, time.time()


def run_ranges(ranges: list[tuple[str, str]], at_once: int, home: str, params: str) -> tuple[float, list[str]]:
    """Each range in its own fresh process, `at_once` at a time: (wall seconds, run ids). The wall is the first
    process's start to the last run's end when the runs overlap, the sum of each run's own wall when one runs
    after another (`at_once` 1: not the gaps between them, where a process exits and the next one is spawned)."""
    with ProcessPoolExecutor(max_workers=at_once, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:  # a fresh process per run, as Dagster starts one
        futures = [pool.submit(run_range, first, last, home, params) for first, last in ranges]
        runs = [f.result() for f in futures]
    if at_once == 1:
        wall = sum(end - start for _, start, end in runs)
    else:
        wall = max(end for *_, end in runs) - min(start for _, start, _ in runs)
    return wall, [run_id for run_id, *_ in runs]


def step_seconds(instance, run_id: str) -> float:
    """The sum of a run's step durations (start to success)."""
    import dagster as dg

    starts, total = {}, 0.0
    for record in instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START,
                                                      dg.DagsterEventType.STEP_SUCCESS}):
        event = record.dagster_event
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[event.step_key] = record.timestamp
        else:
            total += record.timestamp - starts[event.step_key]
    return total


def _params(folder: Path, name: str) -> str:
    """This process's config, datasets in `folder/name`, model-heavy steps on `DEVICES`: its path."""
    import yaml

    from music_dagster.bench.parallel import params_file
    from music_dagster.config import default_config

    path = Path(params_file(folder, name))
    raw = yaml.safe_load(path.read_text())
    raw["profiles"][default_config().profile_name]["devices"] = DEVICES
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def main() -> None:
    from music_dagster.bench.parallel import data_bench
    from music_dagster.zoo import devices

    with data_bench("orchestration", SHARDS) as (config, tmp, home, instance, keys):
        devices.prepare_instance(instance, DEVICES)
        print(f"data graph, shards of {config.profile.data.shard_size} samples, profile {config.profile_name}; "
              f"{len(os.sched_getaffinity(0))} CPU cores; devices {DEVICES}; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

        wall, (run_id,) = run_ranges([(keys[0], keys[-1])], 1, str(home), _params(tmp, "one"))
        work = step_seconds(instance, run_id)
        print(f"{SHARDS} shards as one range run: wall {wall:.1f} s, steps {work:.1f} s", flush=True)

        halves = [(keys[0], keys[1]), (keys[2], keys[3])]
        seq_wall, _ = run_ranges(halves, 1, str(home), _params(tmp, "sequential"))
        par_wall, _ = run_ranges(halves, 2, str(home), _params(tmp, "parallel"))
        print(f"2 range runs of 2 shards: one after another {seq_wall:.1f} s, at once {par_wall:.1f} s", flush=True)
    print(f"orchestration efficiency {work / wall:.2f} (model and stage seconds {work:.1f} of wall {wall:.1f}), "
          f"2 at once {seq_wall / par_wall:.2f} x")
