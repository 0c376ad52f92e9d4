"""The main job: the whole pipeline on the project's Dagster instance, as the UI would run it.

`music pipeline` builds the tiny model zoo when a configured folder is missing, registers the profile's shards,
materializes the data graph over the shards that are not up to date (`stale_shards`: missing, failed last time, or
made with other settings; `--force`: every shard), one run per contiguous range of them (a partition range), then
training and evaluation. Every run lands in the instance under `DAGSTER_HOME` (default `.dagster_home/`), so
`make ui` shows the runs, lineage and metadata afterwards. DVC's stages (`music stage ...`, `run_stage`: dvc.yaml's
entry points live here, in the application layer, not in `tracking/dvc.py`) run the same jobs through `run_job` and
`materialize_shards`.

What `run_job` adds to Dagster's in-process execution, so that a killed or stuck run never blocks the next one:
- each run is tagged with its host and process; before a run starts, runs whose process is gone are marked failed
  and their pool slots freed (`doctor.release_stale_runs`);
- a step waiting for a pool slot says so on the console every 30 s, naming the runs that hold the slots, and gives
  up after the profile's `pool_wait_s`;
- Ctrl-C or SIGTERM ends the run, waiting or computing, as CANCELED with its slots freed;
- a `UserError` raised in a step reaches the console as its one line plus the run id; the run's events in the
  instance keep Dagster's full error dump.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.executor import in_process
from dagster._core.execution.plan.execute_plan import inner_plan_execution_iterator
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._utils.interrupts import check_captured_interrupt, pop_captured_interrupt

from music_dagster.config import PROJECT_ROOT, ConfigError, default_config
from music_dagster.errors import UserError
from music_dagster.zoo import devices

# The console shows what a person follows (stage progress, kept/dropped counts); the UI keeps every event.
_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

# Run tags naming the process that executes a run: a later command tells a killed run from a live one by them.
TAG_HOST = "music/host"
TAG_PID = "music/pid"
TAG_PROCESS_START = "music/process_start"  # the process's start time: a reused pid is another process

WAIT_REPORT_EVERY_S = 30.0  # how often a step waiting for a pool slot says so again
_WAIT_POLL_S = 1.0  # how often the waiting loop wakes to notice an interrupt or the end of pool_wait_s


class PoolWaitError(UserError):
    """A step waited longer than the profile's `pool_wait_s` for a slot of its pool."""


class RunError(UserError):
    """A user error raised inside a step: its one line, and the run whose events hold the details."""


def project_instance():
    """The Dagster instance under DAGSTER_HOME, the project's `.dagster_home/` unless set."""
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home"))
    return dg.DagsterInstance.get()


def process_tags() -> dict[str, str]:
    """The tags that tie a run to this process."""
    import psutil

    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
            TAG_PROCESS_START: f"{psutil.Process().create_time():.3f}"}


def short(run_id: str) -> str:
    """A run id as the Dagster UI lists it."""
    return run_id[:8]


class _ConsoleFormatter(logging.Formatter):
    """Dagster's console format; an error event (a failed step or run) shows its first line only: the rest is
    Dagster's error dump (~90 lines), which the run's events in the instance keep for the UI."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.split("\n", 1)[0] if record.levelno >= logging.ERROR else text


@dg.logger({"log_level": dg.Field(str, is_required=False, default_value="INFO")},
           description="Dagster's console lines on stdout, an error event cut to its first line")
def console_logger(init_context) -> logging.Logger:
    logger = logging.Logger("dagster", level=init_context.logger_config["log_level"].upper())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_ConsoleFormatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s",
                                           "%Y-%m-%d %H:%M:%S %z"))
    logger.addHandler(handler)
    return logger


class _PoolWait(InstanceConcurrencyContext):
    """Dagster's slot bookkeeping for an in-process run (one per run), with the waiting made visible and bounded.

    Dagster's in-process executor loops over `claim()` while a step waits for a slot of its pool. Here that wait
    logs an INFO line naming the runs that hold the slots (at once, then every 30 s), gives up after `wait_s`
    with a PoolWaitError, and ends on Ctrl-C or SIGTERM: Dagster only holds those until a step's own code runs,
    and a waiting step runs none. An interrupted run is marked CANCELING before Dagster ends it, so it ends
    CANCELED (not FAILURE); leaving this context frees the run's pending claims.
    """

    def __init__(self, job_context, wait_s: float):
        super().__init__(job_context.instance, job_context.dagster_run)
        self._job_context = job_context
        self._wait_s = wait_s
        self._waiting: dict[str, list[float]] = {}  # step key -> [first refused at, last reported at]

    def claim(self, concurrency_key: str, step_key: str, step_priority: int = 0) -> bool:
        if check_captured_interrupt():
            pop_captured_interrupt()
            raise DagsterExecutionInterruptedError(f"interrupted while {step_key} waited for a slot")
        if super().claim(concurrency_key, step_key, step_priority):
            self._waiting.pop(step_key, None)
            return True
        now = time.monotonic()
        waiting = self._waiting.setdefault(step_key, [now, -WAIT_REPORT_EVERY_S])
        if now - waiting[0] > self._wait_s:
            raise PoolWaitError(f"step {step_key} waited {self._wait_s:g} s for a slot of pool {concurrency_key}, "
                                f"held by {self._holders(concurrency_key)}; `music doctor` tells whether they are stale "
                                f"(pool_wait_s in params.yaml sets the wait)")
        if now - waiting[1] >= WAIT_REPORT_EVERY_S:
            waiting[1] = now
            self._job_context.log.info(
                f"{step_key} is waiting for a slot of pool {concurrency_key}, held by "
                f"{self._holders(concurrency_key)}; waited {now - waiting[0]:.0f} s of {self._wait_s:g} s (pool_wait_s)")
        return False

    def _holders(self, pool: str) -> str:
        info = self._instance.event_log_storage.get_concurrency_info(pool)
        holders = [f"run {short(s.run_id)} ({s.step_key})" for s in info.claimed_slots]
        # Slots just handed to other waiting steps count as theirs.
        holders += [f"run {short(p.run_id)} ({p.step_key})" for p in info.pending_steps
                    if p.assigned_timestamp and p.run_id != self._run_id and
                    not any(s.run_id == p.run_id and s.step_key == p.step_key for s in info.claimed_slots)]
        return f"{', '.join(holders) or 'no run'} ({len(info.claimed_slots)} of {info.slot_count} slots taken)"

    def interval_to_next_pending_claim_check(self) -> float:
        # Dagster 1.13 returns min(0, <seconds to the next check>) here: never positive, so the in-process loop
        # (ActiveExecution.sleep_til_ready) never sleeps and a step waiting for a slot spins a core at 100%.
        # Sleep until the next check instead, waking at least every second to notice an interrupt or the end of
        # pool_wait_s.
        if not self._pending_claims:
            return 0.0
        now = time.time()
        return max(0.0, min([_WAIT_POLL_S, *(due - now for due in self._pending_timeouts.values())]))

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, DagsterExecutionInterruptedError)):
            self._instance.report_run_canceling(self._job_context.dagster_run, "music: interrupted (Ctrl-C or SIGTERM)")
        super().__exit__(exc_type, exc_value, traceback)


@contextlib.contextmanager
def _bounded_pool_wait(wait_s: float):
    """Run in-process executions with `_PoolWait` in place of Dagster's own slot bookkeeping.

    The in-process executor builds its InstanceConcurrencyContext inside `inprocess_execution_iterator` and offers
    no way to pass another, so this swaps that function (the same three lines, with `_PoolWait`) for the
    duration of one run.
    """

    def iterator(job_context, execution_plan, instance_concurrency_context=None):
        with _PoolWait(job_context, wait_s) as pool_wait:
            yield from inner_plan_execution_iterator(job_context, execution_plan, pool_wait)

    original = in_process.inprocess_execution_iterator
    in_process.inprocess_execution_iterator = iterator
    try:
        yield
    finally:
        in_process.inprocess_execution_iterator = original


def run_job(job_name: str, instance, partition_key: str | None = None, assets: list[str] | None = None,
            partition_range: tuple[str, str] | None = None) -> str:
    """Execute one of the code location's jobs in this process (optionally a partition or a range of partitions
    (first, last), or a subset of its assets), after releasing runs whose process is gone; the run's id."""
    from dagster._core.utils import make_new_run_id

    from music_dagster.definitions import defs
    from music_dagster.doctor import release_stale_runs

    for line in release_stale_runs(instance):
        print(f"music pipeline: {line}", flush=True)
    devices.prepare_instance(instance, default_config().profile.devices)  # the `gpu` pool: one slot per device
    job = defs.resolve_job_def(job_name).with_logger_defs({"console": console_logger})
    run_id = make_new_run_id()
    from music_dagster.assets.data import partition_range as range_tags

    label = job_name + (f"[{partition_key}]" if partition_key else "") + (f" {assets}" if assets else "")
    label += f"[{partition_range[0]}...{partition_range[1]}]" if partition_range else ""
    tags = {**process_tags(), **(range_tags(*partition_range) if partition_range else {})}
    start = time.perf_counter()
    print(f"music pipeline: {label} ... (run {run_id})", flush=True)
    try:
        # While the run executes, whatever it prints (Dagster's console, MLflow, progress bars, warnings) goes to
        # stdout: stderr is left for the command's one-line outcome.
        with _bounded_pool_wait(default_config().profile.pool_wait_s), contextlib.redirect_stderr(sys.stdout):
            job.execute_in_process(
                run_config=_RUN_CONFIG, instance=instance, partition_key=partition_key, run_id=run_id,
                asset_selection=[dg.AssetKey(a) for a in assets] if assets else None, tags=tags,
            )
    except UserError as e:
        raise RunError(f"{e} (Dagster run {run_id}: its events in `make ui` have the details)") from e
    except (KeyboardInterrupt, DagsterExecutionInterruptedError):
        raise KeyboardInterrupt(f"run {run_id} canceled") from None
    finally:
        # A step interrupted mid-way may not have handed its slot back; no-op when it did.
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    print(f"music pipeline: {label} succeeded in {time.perf_counter() - start:.1f} s (run {run_id})", flush=True)
    return run_id


class ShardsFailedError(UserError):
    """Shards of a range run that failed alone: the others were published."""


def materialize_shards(instance, num_shards: int | None = None, force: bool = False) -> list[str]:
    """Register the first `num_shards` shard keys (default: `data.num_shards`) and run the data graph over those
    that are not up to date (`stale_shards`; every key with `force`), one run per contiguous range of them (one
    model load per stage for every shard of a range), after one line saying how many were skipped. Nothing stale:
    no run, and one line says so. Shards that failed alone are named afterwards, in one line, with their reasons;
    the others are published. Returns every key."""
    from music_dagster.assets.data import SHARDS, ensure_shards

    keys = ensure_shards(instance, num_shards or default_config().profile.data.num_shards)
    stale = {k: "forced" for k in keys} if force else stale_shards(instance, default_config(), keys)
    if not stale:
        print(f"music pipeline: data: all {len(keys)} shards up to date ({keys[0]}..{keys[-1]}: published, same "
              f"settings), no data run (`music pipeline --force` re-runs them)", flush=True)
        return keys
    ranges = contiguous_ranges(instance.get_dynamic_partitions(SHARDS.name), list(stale))
    skipped = "none skipped (forced)" if force else f"{len(keys) - len(stale)} of {len(keys)} up to date, skipped"
    why = "" if force else f" ({', '.join(sorted(set(stale.values())))})"
    print(f"music pipeline: data: {skipped}; running {len(stale)} of {len(keys)} shards{why} in {len(ranges)} "
          f"run{'s' if len(ranges) > 1 else ''}: " + ", ".join(r[0] if len(r) == 1 else f"{r[0]}..{r[-1]}"
                                                            for r in ranges), flush=True)
    reasons: dict[str, str] = {}
    for run_keys in ranges:
        try:
            run_id = run_job("data_job", instance, partition_range=(run_keys[0], run_keys[-1]))
        except RunError as e:
            if len(ranges) == 1:
                raise
            # Every shard of a step failed in this range (its step failed): the other ranges still run.
            reasons.update({k: str(e) for k in run_keys})
            continue
        # This run's records decide, not the folders: a shard that failed may still hold an older published copy.
        reasons.update(failed_shard_reasons(instance, run_keys, run_id))
    if reasons:
        raise ShardsFailedError(f"{len(reasons)} of {len(keys)} shards failed, the others were published: "
                                + "; ".join(f"{k}: {reasons[k]}" for k in keys if k in reasons))
    return keys


def stale_shards(instance, config, keys: list[str]) -> dict[str, str]:
    """The shards of `keys` that a data run must make again, each with why: `missing` (a data asset's shard is not
    complete in the store: never made, deleted, or its run killed), `failed` (the latest `shard_published` verdict
    of one of its data assets failed: it failed last time), `changed settings` (the `data_fingerprint` its latest
    materializations record differs from the current config's, or is absent: made before fingerprints).

    The fingerprint (`synthesis.stages.data_fingerprint`) covers the config's seed, the `data` section (but
    `num_shards`), the data roles' model specs, `dtype`, `torch_threads` and the Objects365 file's bytes. It does
    not cover the code, the installed libraries, the weights behind an unchanged model spec, or a shard edited by
    hand (its bytes are not hashed again): after a code change, `music pipeline --force` re-runs every shard."""
    from music_dagster.assets.data import DATA_ASSET_NAMES, published_verdict
    from music_dagster.resources.storage import DatasetStore
    from music_dagster.synthesis.stages import data_fingerprint

    store = DatasetStore.from_config(config)
    fingerprint = data_fingerprint(config)
    stale: dict[str, str] = {}
    for key in keys:
        if not all(store.exists(name, key) for name in DATA_ASSET_NAMES):
            stale[key] = "missing"
            continue
        for name in DATA_ASSET_NAMES:
            verdict = published_verdict(instance, name, key)
            if verdict is not None and not verdict.evaluation.passed:
                stale[key] = "failed"
                break
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[key]), limit=1).records
            metadata = records[0].asset_materialization.metadata if records else {}
            recorded = metadata.get("data_fingerprint")
            if recorded is None or recorded.value != fingerprint:
                stale[key] = "changed settings"
                break
    return stale


def contiguous_ranges(order: list[str], keys: list[str]) -> list[list[str]]:
    """`keys` split into runs of neighbours in `order` (the shards' registration order, which a partition range
    follows), in that order: a range run over each touches no key outside `keys`."""
    position = {k: i for i, k in enumerate(order)}
    ranges: list[list[str]] = []
    for key in sorted(keys, key=position.__getitem__):
        if ranges and position[ranges[-1][-1]] == position[key] - 1:
            ranges[-1].append(key)
        else:
            ranges.append([key])
    return ranges


# Stage entry points: what `dvc repro` runs (`music stage <name>`, dvc.yaml's `cmd`s). Each materializes the stage's
# assets on the project's Dagster instance (DAGSTER_HOME, default `.dagster_home/`), so the runs also show in the UI.
STAGE_ASSETS = {
    "detokenizer": ("training_job", ["detokenizer"]),
    "train": ("training_job", ["lora_checkpoint"]),
    "evaluate": ("evaluation_job", None),
}
STAGES = ("data", *STAGE_ASSETS)


def run_stage(name: str) -> None:
    """Materialize the assets of the DVC stage `name`: `data` runs `data_job` over every one of the profile's shards,
    up to date or not: DVC runs the stage when one of its dependencies changed, code included, which the shards'
    fingerprints do not cover (`stale_shards`), and then records what the stage made."""
    from music_dagster.tracking.dvc import DvcError

    if name not in STAGES:
        raise DvcError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
    if name == "data":
        materialize_shards(project_instance(), force=True)
        return
    job_name, assets = STAGE_ASSETS[name]
    run_job(job_name, project_instance(), assets=assets)


def failed_shard_reasons(instance, keys: list[str], run_id: str | None = None) -> dict[str, str]:
    """Why each shard of `keys` failed: the reason of the first data asset whose latest `shard_published` verdict
    on it failed (given by run `run_id`, when named)."""
    from music_dagster.assets.data import DATA_ASSET_NAMES, published_verdict

    reasons: dict[str, str] = {}
    for name in DATA_ASSET_NAMES:  # graph order: the first stage that failed holds the cause
        for key in (k for k in keys if k not in reasons):
            verdict = published_verdict(instance, name, key)
            if verdict is not None and not verdict.evaluation.passed and run_id in (None, verdict.run_id):
                reasons[key] = f"{name}: {verdict.evaluation.metadata['reason'].value}"
    return reasons


def check_outputs(config) -> None:
    """Before `music pipeline` starts: the folders and the MLflow store it writes accept writes, so a locked one is
    one line now, not after the data and the training have run (each asset checks its own outputs again)."""
    from music_dagster.storage import check_writable
    from music_dagster.tracking.runs import check_store, store_from_config

    for name in ("datasets", "models", "metrics"):
        check_writable(config.paths.resolve(name), f"paths.{name}")
    check_store(store_from_config(config))


def run_pipeline(num_shards: int | None = None, force: bool = False) -> None:
    """Materialize every asset on the configured profile, `num_shards` data shards (default: the profile's): the
    data shards that are not up to date (`stale_shards`), every one with `force`, then training and evaluation."""
    config = default_config()
    check_outputs(config)
    instance = project_instance()
    try:
        config.check_models()
    except ConfigError:
        run_job("zoo_job", instance)
        config.check_models()
    start = time.perf_counter()
    keys = materialize_shards(instance, num_shards, force=force)
    run_job("training_job", instance)
    run_job("evaluation_job", instance)
    print(f"music pipeline: done in {time.perf_counter() - start:.0f} s", flush=True)
    for line in summary(instance, keys):
        print(f"  {line}", flush=True)


def summary(instance, keys: list[str]) -> list[str]:
    """What the main job made, from its latest materializations: shards and samples kept and dropped, training
    losses, scores, and where each output is."""
    from music_dagster.assets.data import DATA_ASSET_NAMES
    from music_dagster.evaluation.common import METHODS
    from music_dagster.evaluation.report import LABELS, METRIC_LABELS

    def latest(asset: str, partition: str | None = None) -> dict:
        records = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None), limit=1).records
        return {k: v.value for k, v in records[0].asset_materialization.metadata.items()} if records else {}

    def where(meta: dict, key: str = "path") -> str:
        return os.path.relpath(meta[key], PROJECT_ROOT) if key in meta else "?"

    last = DATA_ASSET_NAMES[-1]
    shards = [latest(last, k) for k in keys]
    dropped = sum(latest(name, k).get("dropped", 0) for name in DATA_ASSET_NAMES for k in keys)
    lines = [f"data: {len(keys)} shards ({keys[0]}..{keys[-1]}), {sum(m.get('kept', 0) for m in shards)} samples "
             f"kept, {dropped} dropped on the way -> {os.path.dirname(os.path.dirname(where(shards[0])))}/"]
    for asset, label, losses in (("detokenizer", "de-tokenizer", ("loss",)), ("lora_checkpoint", "MUSIC",
                                                                            ("L1", "L2", "loss"))):
        meta = latest(asset)
        figures = ", ".join(f"{n} {meta[f'final_{n}']:.4f}" for n in losses if f"final_{n}" in meta)
        lines.append(f"{label}: {meta.get('steps', '?')} steps, final {figures} -> {where(meta)}")
    for asset, label in (("dreambench_scores", "DreamBench"), ("msic_scores", "MSIC")):
        meta = latest(asset)
        methods = "; ".join(LABELS[m] + " " + " ".join(f"{METRIC_LABELS[k]} {meta[f'{m}/{k}']:.3f}"
                                                       for k in METRIC_LABELS if f"{m}/{k}" in meta)
                            for m in METHODS)
        lines.append(f"{label}: {methods} -> {where(meta, 'metrics_file')}")
    lines.append("runs: `make ui` (Dagster), `make mlflow-ui` or `music runs` (MLflow), `dvc status` (DVC)")
    return lines
