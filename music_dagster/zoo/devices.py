"""One device per concurrent model-heavy step: the profile's `devices`, one per slot of the `gpu` pool.

`devices` lists where models run (`[cuda:0, cuda:1, ...]`, or `[cpu, cpu]` to test on a CPU box); `auto` is every
visible GPU, or `[cpu]` without one. The `gpu` pool gets one slot per device when the project's instance is
prepared (`prepare_instance`), so at most that many model-heavy steps run at once, and a step holding a slot also
holds one device: an exclusive OS lock on `<instance home>/devices/<i>.lock` (the first free one, the one this
process held last tried first, since its models are loaded there). The OS frees the lock of a killed process, so a
device is never left taken. Inside the lease, `current()` names the device; model resources load there.
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import time
from pathlib import Path

from music_dagster.errors import UserError

POOL = "gpu"
_POLL_S = 0.2
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("music_device", default=None)
_last_slot: dict[tuple[str, ...], int] = {}  # device list -> slot this process held last


class DeviceWaitError(UserError):
    """No device of the profile's `devices` came free within `pool_wait_s`."""


def visible_devices(devices: list[str] | str) -> list[str]:
    """The profile's `devices` as a list: `auto` is every visible GPU (`cuda:<i>`), or `["cpu"]` without one."""
    if devices != "auto":
        return list(devices)
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


def prepare_instance(instance, devices: list[str] | str) -> int:
    """Give the `gpu` pool one slot per device; returns the slot count."""
    count = len(visible_devices(devices))
    instance.event_log_storage.set_concurrency_slots(POOL, count)
    return count


def current() -> str | None:
    """The device leased by the step running in this thread, None outside a lease."""
    return _current.get()


@contextlib.contextmanager
def lease(home: str | os.PathLike, devices: list[str], wait_s: float):
    """Hold one device of `devices` for the duration: yields (slot index, device)."""
    folder = Path(home) / "devices"
    folder.mkdir(parents=True, exist_ok=True)
    key = tuple(devices)
    preferred = _last_slot.get(key, 0)
    order = [preferred] + [i for i in range(len(devices)) if i != preferred]
    deadline = time.monotonic() + wait_s
    while True:
        for slot in order:
            fd = os.open(folder / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _last_slot[key] = slot
            token = _current.set(devices[slot])
            try:
                yield slot, devices[slot]
            finally:
                _current.reset(token)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        if time.monotonic() > deadline:
            raise DeviceWaitError(f"no device of {devices} came free in {wait_s:g} s (locks in {folder}; "
                                  f"pool_wait_s in params.yaml sets the wait)")
        time.sleep(_POLL_S)
