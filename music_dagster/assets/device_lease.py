"""The devices a model-heavy step holds. Every asset in the Dagster pool `gpu` (the data stages with a model, the
training and evaluation assets) leases devices of the profile's `devices` while it works (`zoo.devices.lease`: an
OS lock per device, as many devices as pool slots) and records them in its materialization metadata. It also keeps
the interrupts Dagster's handlers raise meanwhile (`interrupts.interrupts_kept`), for its loops to raise again.

The lease, not the pool, is what keeps one step per device: on the project's SQLite instance Dagster's claim of a
pool slot is not atomic across processes (two runs claiming the last slot at the same moment can both get it), so a
second step may start, and it then waits for the device before it loads anything. Its log says how long."""
import contextlib
import time

import dagster as dg

from music_dagster.interrupts import interrupts_kept
from music_dagster.zoo import devices

POOL = devices.POOL  # the Dagster pool of every model-heavy asset: `prepare_instance` gives it a slot per device


@contextlib.contextmanager
def step_devices(context: dg.AssetExecutionContext, profile, count: int = 1):
    """Hold `count` devices of `profile.devices` (a training launch: one per process) while the block runs, waiting
    at most `profile.pool_wait_s` for them. Yields (the devices, in rank order; their metadata: `device` and
    `device_slot`, or with several devices `devices` and `device_slots`). Dagster's handlers (raising its interrupt)
    are the step's by now: what they raise while the block runs is kept, so that a loop of the block raises it at
    its next item even when it was dropped (`interrupts.raise_kept_interrupt`)."""
    wanted = devices.visible_devices(profile.devices)
    asked = time.monotonic()
    with interrupts_kept(), devices.lease(context.instance.root_directory, wanted, profile.pool_wait_s, count) as held:
        taken = time.monotonic()
        slots, names = [slot for slot, _ in held], [device for _, device in held]
        if count == 1:
            metadata = {"device": dg.MetadataValue.text(names[0]), "device_slot": dg.MetadataValue.int(slots[0])}
        else:
            metadata = {"devices": dg.MetadataValue.json(names), "device_slots": dg.MetadataValue.json(slots)}
        context.log.info(f"{context.op_def.name}: holds {', '.join(names)} (slot {', '.join(map(str, slots))}) after "
                         f"waiting {taken - asked:.1f} s")
        try:
            yield names, metadata
        finally:
            held_s = time.monotonic() - taken
            context.log.info(f"{context.op_def.name}: releases {', '.join(names)} after {held_s:.1f} s")
