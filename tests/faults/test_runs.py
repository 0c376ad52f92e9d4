"""Runs on the project's Dagster instance: a killed run never blocks later runs, a step waiting for a `gpu` pool slot
says so and gives up after `pool_wait_s`, SIGTERM cancels a run (waiting or computing) and frees its slots,
`music doctor` reports and releases stale runs, and a user error inside a step is one line with the run id."""
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from helpers import assert_one_line_error, build_project, music, snapshot
from projects import clone_env, copy_zoo, project_copy

# A live run holding a slot of the `gpu` pool: a one-op job tagged as `music` tags its runs, sleeping until killed.
HOLDER = """
import sys, time
from pathlib import Path
import dagster as dg
from music_dagster.pipeline import process_tags, project_instance

@dg.op(pool="gpu")
def hold_gpu_slot():
    Path(sys.argv[1]).touch()
    time.sleep(3600)

@dg.job
def holder():
    hold_gpu_slot()

holder.execute_in_process(instance=project_instance(), tags=process_tags())
"""


@pytest.fixture(scope="module")
def bare_project(tmp_path_factory):
    """A project copy with the tiny zoo and nothing materialized: enough for a step to wait for a slot."""
    root = project_copy(tmp_path_factory.mktemp("bare") / "p")
    copy_zoo(root)
    return root


@pytest.fixture(scope="module")
def data_project(tmp_path_factory):
    """A project copy with the data stage materialized (no MLflow run yet: see build_project)."""
    return build_project(tmp_path_factory.mktemp("data") / "p", "data")


def copy_of(project: Path, tmp_path: Path, pool_limit: int | None = None, **profile) -> tuple[Path, Path]:
    """A copy of `project` with the tiny profile's keys in `profile` set (`train_*` keys go to its train section)
    and the instance's pool limit changed; the copy and its HOME."""
    root = tmp_path / "p"
    shutil.copytree(project, root, symlinks=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    tiny = params["profiles"]["tiny"]
    for key, value in profile.items():
        section, _, name = key.partition("_") if key.startswith("train_") else ("", "", key)
        (tiny[section] if section else tiny)[name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if pool_limit is not None:
        home_yaml = root / ".dagster_home" / "dagster.yaml"
        config = yaml.safe_load(home_yaml.read_text())
        config["concurrency"]["pools"]["default_limit"] = pool_limit
        home_yaml.write_text(yaml.safe_dump(config))
    home = tmp_path / "home"
    home.mkdir()
    return root, home


def instance_of(root: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(root / ".dagster_home"))


def gpu_slots(instance: dg.DagsterInstance) -> tuple[set[str], set[str]]:
    """Run ids holding a `gpu` slot, and run ids with a queued (pending) `gpu` step."""
    info = instance.event_log_storage.get_concurrency_info("gpu")
    return {s.run_id for s in info.claimed_slots}, {p.run_id for p in info.pending_steps}


def wait_for(condition, what: str, process: subprocess.Popen, timeout_s: float = 600):
    """Poll `condition` until it is true, failing if `process` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert process.poll() is None, f"the command exited ({process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.2)
    return value


def start(root: Path, home: Path, *cmd: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(list(cmd), cwd=root, env=clone_env(root, home), stdout=out, stderr=subprocess.STDOUT)


def start_holder(root: Path, home: Path) -> tuple[subprocess.Popen, str]:
    """A live run holding one `gpu` slot; the process and its run id."""
    ready = root.parent / "holder.ready"
    holder = start(root, home, sys.executable, "-c", HOLDER, str(ready))
    wait_for(ready.exists, "the holder's slot", holder)
    run = instance_of(root).get_runs(filters=dg.RunsFilter(job_name="holder"), limit=1)[0]
    return holder, run.run_id


def failure_message(instance: dg.DagsterInstance, run_id: str) -> str:
    return instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[-1].dagster_event.message


@pytest.mark.slow
def test_two_runs_killed_mid_step_do_not_block_the_next(data_project, tmp_path):
    root, home = copy_of(data_project, tmp_path)
    instance = instance_of(root)
    killed = []
    for _ in range(2):
        train = start(root, home, "music", "stage", "train")
        try:
            run_id = wait_for(lambda: next(iter(gpu_slots(instance)[0] - set(killed)), None),
                              "a gpu slot held by the training run", train)
        finally:
            train.kill()  # SIGKILL: no handler of the command runs
            train.wait()
        killed.append(run_id)

    proc = music(root, home, "stage", "train")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run_id in killed:
        run = instance.get_run_by_id(run_id)
        assert run.status == dg.DagsterRunStatus.FAILURE
        assert "ended without finishing" in failure_message(instance, run_id)
    assert gpu_slots(instance) == (set(), set())
    assert (root / "models" / "lora").is_dir()
    doctor = music(root, home, "doctor")  # nothing stale, and the MLflow store the training wrote is sound
    assert (doctor.returncode, doctor.stderr) == (0, ""), doctor.stdout + doctor.stderr


@pytest.mark.slow
def test_a_run_killed_while_waiting_for_a_slot_leaves_no_queued_step_behind(data_project, tmp_path):
    """Freeing only a dead holder's slot would hand it to the dead waiter's queued step, blocking the next run."""
    root, home = copy_of(data_project, tmp_path, pool_limit=1)
    instance = instance_of(root)
    holder, holder_run = start_holder(root, home)
    try:
        waiter = start(root, home, "music", "stage", "train")
        try:
            waiting = wait_for(lambda: gpu_slots(instance)[1] - {holder_run}, "a queued gpu step", waiter)
        finally:
            waiter.kill()
            waiter.wait()
    finally:
        holder.kill()
        holder.wait()
    assert gpu_slots(instance) == ({holder_run}, {holder_run, *waiting})  # both dead, both in the pool's tables

    proc = music(root, home, "stage", "train")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {instance.get_run_by_id(r).status for r in {holder_run, *waiting}} == {dg.DagsterRunStatus.FAILURE}
    assert gpu_slots(instance) == (set(), set())


@pytest.mark.slow
def test_a_blocked_step_says_who_holds_the_slot_and_gives_up_after_pool_wait_s(bare_project, tmp_path):
    root, home = copy_of(bare_project, tmp_path, pool_limit=1, pool_wait_s=5)
    holder, holder_run = start_holder(root, home)
    try:
        before = snapshot(root)
        proc = music(root, home, "stage", "train")
        after = snapshot(root)
    finally:
        holder.kill()
        holder.wait()
    line = assert_one_line_error(proc, 2, "waited 5 s for a slot of pool gpu", f"run {holder_run[:8]}", "pool_wait_s")
    waiting = [ln for ln in proc.stdout.splitlines() if "is waiting for a slot of pool gpu" in ln]
    assert waiting and f"held by run {holder_run[:8]} (hold_gpu_slot)" in waiting[0] and " INFO " in waiting[0]
    run_id = line.split("Dagster run ")[1].split(":")[0]
    instance = instance_of(root)
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert gpu_slots(instance) == ({holder_run}, {holder_run})  # the holder's own, nothing left by the refused run
    assert after == before


@pytest.mark.slow
@pytest.mark.parametrize("state", ["waiting", "computing"])
def test_sigterm_cancels_the_run_and_frees_its_slots(bare_project, data_project, tmp_path, state):
    if state == "waiting":
        root, home = copy_of(bare_project, tmp_path, pool_limit=1)
        holder, holder_run = start_holder(root, home)
    else:  # a training that only ends when stopped
        root, home = copy_of(data_project, tmp_path, train_max_steps=10**6, train_epochs=10**6)
        holder, holder_run = None, None
    instance = instance_of(root)
    log = tmp_path / "train.log"
    train = start(root, home, "music", "stage", "train", log=log)
    try:
        if state == "waiting":
            wait_for(lambda: "is waiting for a slot of pool gpu" in log.read_text(), "the waiting message", train)
            # Waiting does not spin a core: a second of waiting costs a small part of a second of CPU.
            cpu = psutil.Process(train.pid)
            used, since = sum(cpu.cpu_times()[:2]), time.monotonic()
            time.sleep(5)
            assert sum(cpu.cpu_times()[:2]) - used < 0.25 * (time.monotonic() - since)
        else:
            wait_for(lambda: "LoRA" in log.read_text() or gpu_slots(instance)[0], "the training step", train)
            time.sleep(2)  # inside the step's computation
        train.send_signal(signal.SIGTERM)
        train.wait(timeout=60)
    finally:
        train.kill()
        if holder:
            holder.kill()
            holder.wait()
    assert train.returncode == 130, log.read_text()[-3000:]
    run = instance.get_runs(filters=dg.RunsFilter(job_name="training_job"), limit=1)[0]
    assert run.status == dg.DagsterRunStatus.CANCELED
    claimed, queued = gpu_slots(instance)
    assert run.run_id not in claimed | queued


def test_doctor_reports_a_stale_run_and_fix_releases_it(bare_project, tmp_path):
    root, home = copy_of(bare_project, tmp_path)
    proc = music(root, home, "doctor")
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout + proc.stderr

    holder, holder_run = start_holder(root, home)
    holder.kill()
    holder.wait()
    before = snapshot(root)
    line = assert_one_line_error(music(root, home, "doctor"), 1, f"run {holder_run[:8]} (holder) is STARTED",
                                 f"process {holder.pid} on host", "ended without finishing")
    assert line.startswith("music doctor: ")
    fixed = music(root, home, "doctor", "--fix")
    assert (fixed.returncode, fixed.stderr) == (0, ""), fixed.stdout + fixed.stderr
    assert f"run {holder_run[:8]} (holder) marked failed" in fixed.stdout
    assert (music(root, home, "doctor").returncode, snapshot(root)) == (0, before)
    instance = instance_of(root)
    assert instance.get_run_by_id(holder_run).status == dg.DagsterRunStatus.FAILURE
    assert gpu_slots(instance) == (set(), set())


def test_doctor_reports_a_damaged_mlflow_store(bare_project, tmp_path):
    root, home = copy_of(bare_project, tmp_path)
    (root / "mlruns.db").write_bytes(b"not a database, " * 512)
    before = snapshot(root)
    assert_one_line_error(music(root, home, "doctor"), 1, "MLflow store", "mlruns.db", "does not open")
    assert snapshot(root) == before


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["no data", "manifest line not JSON"])
def test_a_user_error_in_a_step_is_one_line_with_the_run_id(bare_project, data_project, tmp_path, fault):
    if fault == "no data":
        root, home = copy_of(bare_project, tmp_path)
        expected = "training samples"
    else:
        root, home = copy_of(data_project, tmp_path)
        manifest = root / "datasets" / "training_samples" / "shard-00000" / "manifest.jsonl"
        manifest.write_text(manifest.read_text() + "{not json\n")
        expected = "training_samples/shard-00000/manifest.jsonl"
    before = snapshot(root)
    proc = music(root, home, "stage", "train")
    line = assert_one_line_error(proc, 2, expected, "Dagster run ")
    assert snapshot(root, ("datasets", "models")) == {k: v for k, v in before.items() if k.startswith(("datasets", "models"))}
    run_id = line.split("Dagster run ")[1].split(":")[0]
    instance = instance_of(root)
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    # The console showed a line per failed event; the instance keeps Dagster's whole error for the UI.
    assert len([ln for ln in proc.stdout.splitlines() if " ERROR " in ln]) == 2
    failure = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)[0].dagster_event
    assert "Stack Trace" in failure.step_failure_data.error.to_string()


def test_the_ui_daemon_monitors_runs_and_frees_the_slots_of_finished_runs(tmp_path):
    from music_dagster.config import PROJECT_ROOT

    shutil.copy(PROJECT_ROOT / ".dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
    assert instance.run_monitoring_start_timeout_seconds > 0 and instance.run_monitoring_cancel_timeout_seconds > 0


def test_a_run_is_stale_only_when_its_process_is_gone_from_this_host():
    from music_dagster.doctor import process_gone
    from music_dagster.pipeline import TAG_HOST, TAG_PID, TAG_PROCESS_START, process_tags

    tags = process_tags()
    assert process_gone(dg.DagsterRun(job_name="j", tags=tags)) is None  # this very process
    reused = {**tags, TAG_PROCESS_START: str(float(tags[TAG_PROCESS_START]) - 3600)}
    assert process_gone(dg.DagsterRun(job_name="j", tags=reused)).endswith("now belongs to another process)")
    assert process_gone(dg.DagsterRun(job_name="j", tags={**tags, TAG_HOST: "elsewhere"})) is None  # cannot tell
    assert process_gone(dg.DagsterRun(job_name="j", tags={})) is None  # not started by `music`: the daemon's
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = {**tags, TAG_PID: str(child.pid)}
    assert process_gone(dg.DagsterRun(job_name="j", tags=dead)).startswith(f"process {child.pid} on host ")
