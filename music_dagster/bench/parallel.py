"""`music bench parallel`: wall time of the data graph for 4 shards run one after another vs all at once.

Each shard is one run of `data_job` as Dagster launches it: its own process (as the default run launcher does),
the job's own executor (in-process: see `music bench orchestration` for range runs), on a temporary on-disk instance configured by the project's
`.dagster_home/dagster.yaml`, whose pool limit caps the model-heavy (`gpu` pool) steps running at once across runs.
Both modes run the same 4 shard keys of the configured profile into separate temporary datasets folders, after an
untimed warm-up shard (one-off costs such as compile caches). Prints figures; asserts nothing.
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import yaml

SHARDS = 4


def data_job():
    """`data_job` with resources from the config of this process (MUSIC_PARAMS): what each step process rebuilds."""
    import dagster as dg

    from music_dagster.assets.data import DATA_ASSETS
    from music_dagster.assets.data import data_job as job
    from music_dagster.resources import ProjectConfig, build_resources

    return dg.Definitions(assets=DATA_ASSETS, jobs=[job],
                          resources=build_resources(ProjectConfig.from_environment())).resolve_job_def("data_job")


def execute_data_job(dagster_home: str, params: str, label: str, tags: dict) -> tuple[str, float]:
    """One run of `data_job` with the config file `params` and the run `tags`, in this worker process, its output (and
    its step processes') going to `<dagster_home>/logs/<label>.log`: (run id, seconds of the run's execution). A
    failed run raises with the log's last lines."""
    os.environ["MUSIC_PARAMS"] = params  # inherited by the step processes
    log = Path(dagster_home) / "logs" / f"{label}.log"
    log.parent.mkdir(exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    import dagster as dg

    instance = dg.DagsterInstance.from_config(dagster_home)
    start = time.perf_counter()
    result = dg.execute_job(dg.reconstructable(data_job), instance=instance, tags=tags)
    if not result.success:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"data_job failed for {label} (run {result.run_id}):\n{tail}")
    return result.run_id, time.perf_counter() - start


def run_shard(key: str, dagster_home: str, params: str) -> tuple[str, float]:
    """One run of `data_job` for shard `key` (`execute_data_job`): (run id, seconds)."""
    return execute_data_job(dagster_home, params, key, {"dagster/partition": key})


def run_shards(keys: list[str], at_once: int, dagster_home: str, params: str) -> tuple[float, list[str], list[float]]:
    """Every shard of `keys` in its own process, `at_once` runs at a time: (wall seconds, run ids, run seconds)."""
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=at_once, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:  # a fresh process per run, as Dagster starts one
        results = list(pool.map(run_shard, keys, [dagster_home] * len(keys), [params] * len(keys)))
    return time.perf_counter() - start, [r for r, _ in results], [s for _, s in results]


def params_file(folder: Path, name: str, **data) -> str:
    """A copy of this process's config writing datasets to `folder/name`, with `data` overrides: its path."""
    from music_dagster.config import PARAMS_FILE, default_config

    config = default_config()
    raw = yaml.safe_load(Path(os.environ.get("MUSIC_PARAMS") or PARAMS_FILE).read_text())
    raw["profile"] = config.profile_name
    raw["paths"]["objects365"] = str(config.paths.resolve("objects365"))
    raw["paths"]["datasets"] = str(folder / name)
    raw["profiles"][config.profile_name]["data"].update(data)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def instance_home(folder: Path, **pools) -> Path:
    """A Dagster instance home under `folder` with the project's dagster.yaml (`pools` overrides its pool settings)."""
    from music_dagster.config import PROJECT_ROOT

    home = folder / "dagster_home"
    home.mkdir()
    config = yaml.safe_load((PROJECT_ROOT / ".dagster_home" / "dagster.yaml").read_text()) or {}
    config.setdefault("concurrency", {}).setdefault("pools", {}).update(pools)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


@contextmanager
def data_bench(name: str, shards: int):
    """Where a data benchmark runs: a temporary folder holding a Dagster instance home (`instance_home`) with
    `shards` shards declared, for the configured profile, its data roles checked first. Yields (config, folder,
    instance home, instance, shard keys); everything is removed after."""
    import dagster as dg

    from music_dagster.assets.data import ensure_shards
    from music_dagster.config import default_config

    config = default_config()
    config.check_models(("llm", "vlm", "t2i", "i2i", "detector", "segmenter", "clip"))
    with tempfile.TemporaryDirectory(prefix=f"music-bench-{name}-") as tmp:
        home = instance_home(Path(tmp))
        instance = dg.DagsterInstance.from_config(str(home))
        yield config, Path(tmp), home, instance, ensure_shards(instance, shards)


def main() -> None:
    with data_bench("parallel", SHARDS + 1) as (config, tmp, home, instance, keys):
        pools = instance.get_concurrency_config().pool_config
        warmup, keys = keys[0], keys[1:]
        print(f"data graph, {SHARDS} shards of {config.profile.data.shard_size} samples, profile "
              f"{config.profile_name}; {len(os.sched_getaffinity(0))} CPU cores; pool limit per step "
              f"{pools.default_pool_limit} (enforced: {instance.event_log_storage.supports_global_concurrency_limits})",
              flush=True)
        run_shards([warmup], 1, str(home), params_file(tmp, "warmup"))
        seq_wall, _, seq_runs = run_shards(keys, 1, str(home), params_file(tmp, "sequential"))
        par_wall, _, par_runs = run_shards(keys, SHARDS, str(home), params_file(tmp, "parallel"))

    rows = [("mode", "runs at once", "wall s", "s per shard", "longest run s"),
            ("sequential", "1", f"{seq_wall:.1f}", f"{seq_wall / SHARDS:.1f}", f"{max(seq_runs):.1f}"),
            ("parallel", str(SHARDS), f"{par_wall:.1f}", f"{par_wall / SHARDS:.1f}", f"{max(par_runs):.1f}")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print(f"speedup: {seq_wall / par_wall:.2f}x")
