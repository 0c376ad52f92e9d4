"""One device per concurrent model-heavy step: two processes holding a device at once hold two distinct ones, a
third waits and gives up in one line, a killed holder frees its device, a launch takes its devices all at once or
none, and the `gpu` pool gets one slot per device."""
import multiprocessing
import time

import dagster as dg
import pytest

from music_dagster.zoo import devices
CPUS = ["cpu", "cpu"]


def _hold(home, ready, release, slots):
    """A step's process: lease a device, say which, hold it until told to let go."""
    with devices.lease(home, CPUS, wait_s=60) as [(slot, device)]:
        assert devices.current() == device
        slots.put((slot, device))
        ready.set()
        release.wait(120)


def test_two_concurrent_steps_hold_two_distinct_devices_and_a_third_waits(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    slots, release = ctx.Queue(), ctx.Event()
    readies = [ctx.Event(), ctx.Event()]
    workers = [ctx.Process(target=_hold, args=(str(tmp_path), ready, release, slots)) for ready in readies]
    for worker in workers:
        worker.start()
    try:
        assert all(ready.wait(120) for ready in readies)
        held = sorted(slots.get(timeout=10) for _ in workers)
        assert held == [(0, "cpu"), (1, "cpu")]  # both held at once: never the same slot
        with pytest.raises(devices.DeviceWaitError, match=r"^no device of \['cpu', 'cpu'\] came free in 0.5 s"):
            with devices.lease(tmp_path, CPUS, wait_s=0.5):
                pass
    finally:
        release.set()
        for worker in workers:
            worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    with devices.lease(tmp_path, CPUS, wait_s=1) as [(slot, device)]:  # released: free again
        assert device == "cpu" and slot in (0, 1)
    assert devices.current() is None


def test_a_killed_holder_frees_its_device(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    slots, release, ready = ctx.Queue(), ctx.Event(), ctx.Event()
    worker = ctx.Process(target=_hold, args=(str(tmp_path), ready, release, slots))
    worker.start()
    assert ready.wait(120)
    slot, _ = slots.get(timeout=10)
    worker.kill()
    worker.join(30)
    taken = []
    with devices.lease(tmp_path, ["cpu"] * 2, wait_s=1) as [(first, _)]:
        taken.append(first)
        with devices.lease(tmp_path, ["cpu"] * 2, wait_s=1) as [(second, _)]:
            taken.append(second)
    assert sorted(taken) == [0, 1] and slot in taken


def test_a_launch_takes_its_devices_all_at_once_or_none(tmp_path):
    """A training launched over n processes leases n devices: while fewer are free it holds none of them (two
    such steps never wait on each other holding a part each), and gives up in one line."""
    three = ["cpu"] * 3
    with devices.lease(tmp_path, three, wait_s=1) as [(held, _)]:
        with pytest.raises(devices.DeviceWaitError, match=r"^no 3 devices of \['cpu', 'cpu', 'cpu'\] came free"):
            with devices.lease(tmp_path, three, wait_s=0.5, count=3):
                pass
        with devices.lease(tmp_path, three, wait_s=1, count=2) as pair:  # the failed wait left nothing taken
            assert sorted(slot for slot, _ in pair) == sorted({0, 1, 2} - {held})
            assert devices.current() == pair[0][1]
        with pytest.raises(ValueError, match="4 devices asked of"):
            with devices.lease(tmp_path, three, wait_s=1, count=4):
                pass
    assert devices.current() is None


def test_launched_processes_see_only_their_gpus():
    assert devices.cuda_visible_devices(["cuda:3", "cuda:1"]) == "3,1"
    assert devices.cuda_visible_devices(["cpu", "cpu"]) == ""  # CPU devices: the processes see no GPU


def test_the_gpu_pool_has_one_slot_per_device():
    instance = dg.DagsterInstance.ephemeral()
    assert devices.prepare_instance(instance, ["cpu", "cpu", "cpu"]) == 3
    assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 3
    assert devices.visible_devices(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]


def test_auto_is_every_visible_gpu_or_the_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert devices.visible_devices("auto") == ["cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert devices.visible_devices("auto") == ["cuda:0", "cuda:1", "cuda:2"]


def test_a_model_step_keeps_the_interrupt_dagster_raises(tmp_path):
    """Inside `step_devices` (every model-heavy step), Dagster's interrupt, which Python dropped because the signal
    arrived in a weakref callback, is raised at the next safe point of the step's loops (here a data stage's next
    batch), and the handlers are Dagster's and then the test's again."""
    import signal

    from dagster._core.errors import DagsterExecutionInterruptedError

    from music_dagster.assets.device_lease import step_devices
    from music_dagster.config import load_config
    from music_dagster.synthesis.common import batches
    from signals import signal_inside_a_weakref_callback

    profile = load_config(profile="tiny").profile.model_copy(update={"devices": CPUS})
    before, done = signal.getsignal(signal.SIGINT), []

    @dg.asset
    def model_step(context: dg.AssetExecutionContext) -> None:
        with step_devices(context, profile):
            for batch in batches([1, 2, 3], 1):
                done.extend(batch)
                signal_inside_a_weakref_callback(signal.SIGINT)  # dropped by Python, kept by the step

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance, pytest.raises(DagsterExecutionInterruptedError):
        dg.materialize([model_step], instance=instance)
    assert done == [1]
    assert signal.getsignal(signal.SIGINT) is before
