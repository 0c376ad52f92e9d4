"""`music doctor`: what would stop or mislead the next run, one line per finding, and what `--fix` does about it.

    music doctor          # one line per finding on stderr; exit 0 when healthy, 1 otherwise
    music doctor --fix    # also applies each finding's fix (releasing stale runs); exit 0 when none is left

A check is a function `check_x(config, instance) -> list[Finding]`, listed in CHECKS: add a check by writing one
function and appending it there. A check reads and never writes; a finding that can be repaired carries the repair
as `fix`, which only `--fix` runs.

Stale runs: each run a `music` command starts is tagged with its host, pid and the process's start time
(`pipeline.process_tags`). A run still STARTING or STARTED whose process is gone on this host was killed: it is
marked failed with the reason, and its pool slots and pending-step rows are freed with Dagster's own API. `music`
commands that launch runs do this first (`release_stale_runs`); runs launched by `make ui` are watched by the
Dagster daemon's run monitoring instead (`.dagster_home/dagster.yaml`).
"""
from __future__ import annotations

import socket
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterInstance, DagsterRun, RunsFilter
from dagster._core.storage.dagster_run import FINISHED_STATUSES, NOT_FINISHED_STATUSES

from music_dagster.config import Config, default_config
from music_dagster.pipeline import TAG_HOST, TAG_PID, TAG_PROCESS_START, project_instance, short


@dataclass(frozen=True)
class Finding:
    """One problem: `message` is one line naming it; `fix`, when set, repairs it and returns one line saying how."""

    message: str
    fix: Callable[[], str] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Runs and pool slots

def process_gone(run: DagsterRun) -> str | None:
    """Why the run's process cannot be running any more ("process 4121 on host h ended without finishing"), or
    None when it may be: alive, on another host, or not started by `music` (no pid tag)."""
    import psutil

    host, pid = run.tags.get(TAG_HOST), run.tags.get(TAG_PID)
    if pid is None or host != socket.gethostname():
        return None
    gone = f"process {pid} on host {host} ended without finishing"
    try:
        process = psutil.Process(int(pid))
        started = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:
            return gone
    except psutil.NoSuchProcess:
        return gone
    recorded = run.tags.get(TAG_PROCESS_START)
    if recorded is not None and abs(started - float(recorded)) > 1.0:
        return f"{gone} (pid {pid} now belongs to another process)"
    return None


def stale_runs(instance: DagsterInstance) -> list[tuple[DagsterRun, str]]:
    """Unfinished runs whose process is gone, with the reason."""
    runs = instance.get_runs(filters=RunsFilter(statuses=NOT_FINISHED_STATUSES))
    return [(run, reason) for run in runs if (reason := process_gone(run))]


def orphan_claims(instance: DagsterInstance) -> dict[str, list[str]]:
    """Runs that are finished (or unknown to the instance) yet hold pool slots or pending-step rows:
    run id -> the pools concerned. A dead pending row is handed the next free slot and blocks every live run."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    claims: dict[str, set[str]] = {}
    for pool, info in storage.get_concurrency_infos(sorted(storage.get_concurrency_keys())).items():
        for run_id in {s.run_id for s in info.claimed_slots} | {p.run_id for p in info.pending_steps}:
            claims.setdefault(run_id, set()).add(pool)
    if not claims:
        return {}
    live = {run.run_id for run in instance.get_runs(filters=RunsFilter(run_ids=list(claims)))
            if run.status not in FINISHED_STATUSES}
    return {run_id: sorted(pools) for run_id, pools in claims.items() if run_id not in live}


def release_run(instance: DagsterInstance, run: DagsterRun, reason: str) -> str:
    """Mark a run whose process is gone as failed, with the reason, and free its pool slots and pending steps."""
    instance.report_run_failed(run, f"{reason}; marked failed by music")
    instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    return f"run {short(run.run_id)} ({run.job_name}) marked failed: {reason}; its pool slots are free"


def free_claims(instance: DagsterInstance, run_id: str, pools: list[str]) -> str:
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return f"freed the {', '.join(pools)} pool slots and queued steps of finished run {short(run_id)}"


def release_stale_runs(instance: DagsterInstance) -> list[str]:
    """Release every stale run, then free the slots and pending steps that finished runs still hold; one line per
    repair. Freeing every dead claim before any live run claims again keeps freed slots from going to dead rows."""
    done = [release_run(instance, run, reason) for run, reason in stale_runs(instance)]
    return done + [free_claims(instance, run_id, pools) for run_id, pools in orphan_claims(instance).items()]


def check_runs(config: Config, instance: DagsterInstance) -> list[Finding]:
    """Runs left STARTED by a killed process, and pool slots held by finished runs."""
    stale = stale_runs(instance)
    findings = [Finding(f"run {short(run.run_id)} ({run.job_name}) is {run.status.value}, but {reason} "
                        f"(--fix marks it failed and frees its pool slots)",
                        lambda run=run, reason=reason: release_run(instance, run, reason))
                for run, reason in stale]
    released = {run.run_id for run, _ in stale}  # their slots are freed with them
    findings += [Finding(f"finished run {short(run_id)} still holds slots or queued steps of pool {', '.join(pools)} "
                         f"(--fix frees them)", lambda run_id=run_id, pools=pools: free_claims(instance, run_id, pools))
                 for run_id, pools in orphan_claims(instance).items() if run_id not in released]
    return findings


# ---------------------------------------------------------------------------------------------------------------
# The MLflow store

def check_mlflow(config: Config, instance: DagsterInstance) -> list[Finding]:
    """The tracking store opens and its schema is the one this MLflow writes. Read-only: a SQLite store is opened
    with sqlite3 in read-only mode (MLflow's own client would create or migrate it)."""
    from music_dagster.tracking.runs import store_from_config

    uri = store_from_config(config).tracking_uri
    if not uri.startswith("sqlite:///"):
        return _check_mlflow_server(uri)
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.exists():
        return []  # created by the first training run
    try:
        with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
            integrity = db.execute("PRAGMA quick_check").fetchone()[0]
            if integrity != "ok":
                return [Finding(f"MLflow store {path} is damaged (sqlite: {integrity}); restore it from a backup "
                                f"or move it aside to start a new one")]
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error as e:
        return [Finding(f"MLflow store {path} does not open as an MLflow database (sqlite: {e}); restore it from "
                        f"a backup or move it aside to start a new one")]
    from mlflow.store.db.utils import _get_latest_schema_revision

    expected = _get_latest_schema_revision()
    if row is None or row[0] != expected:
        return [Finding(f"MLflow store {path} has schema {row[0] if row else 'none'}, this MLflow expects "
                        f"{expected}: back it up, then `mlflow db upgrade {uri}`")]
    return []


def _check_mlflow_server(uri: str) -> list[Finding]:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # whatever the store raises, the finding is that it does not answer
        return [Finding(f"MLflow store {uri} does not answer: {str(e).splitlines()[0] if str(e) else type(e).__name__}")]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and stored paths

def check_checkpoints(config: Config, instance: DagsterInstance) -> list[Finding]:
    """The published MUSIC checkpoint and de-tokenizer pass the checks loading makes first (every file there,
    configs of their schema, complete safetensors files with the sha256 their config records). A folder that is
    not there yet is no finding."""
    from music_dagster.errors import UserError
    from music_dagster.model import detokenizer
    from music_dagster.model import music as model
    from music_dagster.model.runtime import detokenizer_dir, lora_dir

    findings = []
    for folder, check, stage in ((lora_dir(config), model.check_checkpoint, "train"),
                                 (detokenizer_dir(config), detokenizer.check_checkpoint, "detokenizer")):
        if folder.exists():
            try:
                check(folder)
            except UserError as e:
                findings.append(Finding(f"{e} (restore {folder} with `dvc pull`, or retrain it: music stage {stage})"))
    return findings


def check_stored_paths(config: Config, instance: DagsterInstance) -> list[Finding]:
    """Manifest rows whose image paths leave the datasets root (`..`, absolute, a symlink leading out), which
    training, evaluation and the data stages refuse; one finding per manifest. An image path is a stored string
    ending in `.png` (every image a shard stores is a PNG)."""
    from music_dagster.errors import UserError
    from music_dagster.storage import MANIFEST, complete_shards, first_lines, read_shard, resolve_stored

    root = config.paths.resolve("datasets")
    findings = []
    for asset in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for key in complete_shards(asset):
            manifest = asset / key / MANIFEST
            try:
                for ref, line in first_lines(read_shard(asset / key).records).items():
                    if ref.endswith(".png"):
                        resolve_stored(root, ref, f"{manifest}: line {line}")
            except UserError as e:  # its first bad row, or a manifest that does not read
                findings.append(Finding(f"{e} (materialize data_job for {key} again: music stage data)"))
    return findings


# ---------------------------------------------------------------------------------------------------------------

Check = Callable[[Config, DagsterInstance], list[Finding]]
CHECKS: list[Check] = [check_runs, check_mlflow, check_checkpoints, check_stored_paths]


def run_doctor(fix: bool = False, checks: list[Check] | None = None) -> int:
    """Print each finding (stderr) and, with `fix`, what its repair did (stdout); the exit code: 0 when healthy
    (or every finding was repaired), 1 otherwise."""
    config = default_config()
    instance = project_instance()
    left = 0
    for check in checks or CHECKS:
        for finding in check(config, instance):
            if fix and finding.fix is not None:
                print(f"music doctor: fixed: {finding.fix()}", flush=True)
            else:
                print(f"music doctor: {finding.message}", file=sys.stderr, flush=True)
                left += 1
    if not left:
        print("music doctor: healthy", flush=True)
    return 1 if left else 0
