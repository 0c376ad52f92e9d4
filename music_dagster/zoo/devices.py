"""One device per concurrent model-heavy step: the profile's `devices`, one per slot of the `gpu` pool.

`devices` lists where models run (`[cuda:0, cuda:1, ...]`, or `[cpu, cpu]` to test on a CPU box); `auto` is every
visible GPU, or `[cpu]` without one. The `gpu` pool gets one slot per device when the project's instance is
prepared (`prepare_instance`), so at most that many model-heavy steps run at once, and a step holding a slot also
holds a device: an exclusive OS lock on `<instance home>/devices/<i>.lock` (the first free one, the one this
process held last tried first, since its models are loaded there). A training launched over several processes
holds one device per process, all taken at once or none. The OS frees the lock of a killed process, so a device is
never left taken. Inside the lease, `current()` names the (first) device and a bare `cuda` means it: model
resources load there.
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
_last_slots: dict[tuple[str, ...], tuple[int, ...]] = {}  # device list -> slots this process held last


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
    """The device leased by the step running in this thread (its first one), None outside a lease."""
    return _current.get()


def cuda_visible_devices(devices: list[str]) -> str:
    """CUDA_VISIBLE_DEVICES for processes launched on `devices`: their GPU indices in order, "" for CPUs (the
    processes then see no GPU)."""
    return ",".join(d.removeprefix("cuda:") for d in devices if d.startswith("cuda:"))


def _lock_all(folder: Path, order: list[int], count: int) -> list[tuple[int, int]]:
    """(slot, locked fd) of the first `count` free slots in `order`, or [] (nothing left locked) if fewer are free."""
    held = []
    for slot in order:
        fd = os.open(folder / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((slot, fd))
        if len(held) == count:
            return held
    _unlock(held)
    return []


def _unlock(held: list[tuple[int, int]]) -> None:
    for _, fd in held:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _cuda_current(device: str):
    """Inside: a bare `cuda` (accelerate, `device_of`) is `device`, when it is a GPU."""
    if not device.startswith("cuda:"):
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(torch.device(device))


@contextlib.contextmanager
def lease(home: str | os.PathLike, devices: list[str], wait_s: float, count: int = 1):
    """Hold `count` distinct devices of `devices` for the duration: yields [(slot index, device), ...]. All or
    none: while fewer than `count` are free it holds none, so two steps that each want several never wait on each
    other, each holding a part."""
    if not 1 <= count <= len(devices):
        raise ValueError(f"{count} devices asked of {devices}")
    folder = Path(home) / "devices"
    folder.mkdir(parents=True, exist_ok=True)
    key = tuple(devices)
    preferred = _last_slots.get(key, ())
    order = [*preferred, *(i for i in range(len(devices)) if i not in preferred)]
    deadline = time.monotonic() + wait_s
    while not (held := _lock_all(folder, order, count)):
        if time.monotonic() > deadline:
            wanted = "device" if count == 1 else f"{count} devices"
            raise DeviceWaitError(f"no {wanted} of {devices} came free in {wait_s:g} s (locks in {folder}; "
                                  "pool_wait_s in params.yaml sets the wait)")
        time.sleep(_POLL_S)
    slots = [slot for slot, _ in held]
    _last_slots[key] = tuple(slots)
    token = _current.set(devices[slots[0]])
    try:
        with _cuda_current(devices[slots[0]]):
            yield [(slot, devices[slot]) for slot in slots]
    finally:
        _current.reset(token)
        _unlock(held)
