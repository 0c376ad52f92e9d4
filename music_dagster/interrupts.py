"""Interrupts that long work cannot lose.

Ctrl-C and SIGTERM stop a step by raising an exception wherever Python happens to be when the signal arrives
(KeyboardInterrupt, or Dagster's `DagsterExecutionInterruptedError` inside a step). When that is a weakref or
garbage-collection callback or a `__del__` (SQLAlchemy's, torch's, while models load), Python prints the exception
as "Exception ignored in ..." and drops it, and the work goes on as if nothing had happened. `interrupts_kept()`
wraps the handlers in place so that the exception is also kept, and `raise_kept_interrupt()` raises it again at the
next safe point. Every model-heavy Dagster step keeps them (`assets.device_lease.step_devices`), as do `music`'s
commands and each launched training process; the loops of long work raise them: the training loop before each
step, the data stages before each batch (`synthesis.common.batches`), the evaluations before each generation, the
procedural experiment before each chunk of prompts.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_kept: list[BaseException] = []


@contextmanager
def interrupts_kept() -> Iterator[None]:
    """Within: SIGINT and SIGTERM run the handlers they had (which raise where the code is), and whatever those
    raise is kept for `raise_kept_interrupt`. Enter it inside the code whose handlers raise: in a Dagster step, at
    the step's start (Dagster installs its own for each step). Only the main thread receives signals: elsewhere it
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {s: signal.getsignal(s) for s in _SIGNALS}

    def keep(signo, frame):
        try:
            handlers[signo](signo, frame)
        except BaseException as interrupt:
            _kept.append(interrupt)
            raise

    wrapped = [s for s, handler in handlers.items() if callable(handler)]  # SIG_IGN and SIG_DFL stay as they are
    for s in wrapped:
        signal.signal(s, keep)
    try:
        yield
    finally:
        for s in wrapped:
            if signal.getsignal(s) is keep:
                signal.signal(s, handlers[s])
        _kept.clear()


def raise_kept_interrupt() -> None:
    """Raise the first interrupt kept by `interrupts_kept` (again: it was dropped or swallowed), if there is one."""
    if _kept:
        raise _kept[0].with_traceback(None)
