"""Signals as a Dagster step gets them: handlers that raise wherever the code is, and a signal whose exception
Python drops because it arrived inside a weakref callback (SQLAlchemy's, torch's, while models load)."""
import signal
import weakref


class Interrupted(BaseException):
    """What a step's signal handler raises (Dagster's `DagsterExecutionInterruptedError` is a BaseException)."""


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def raise_interrupted(signo, frame):
    """The handler of the `raising_handlers` fixture (tests/conftest.py)."""
    raise Interrupted(signal.Signals(signo).name)


def handlers_restored() -> bool:
    """SIGINT and SIGTERM run `raise_interrupted` again (nothing wrapped them for good)."""
    return all(signal.getsignal(s) is raise_interrupted for s in SIGNALS)


def signal_inside_a_weakref_callback(signo: int) -> None:
    class Thing:
        pass

    thing = Thing()
    ref = weakref.ref(thing, lambda _: signal.raise_signal(signo))
    del thing  # the callback runs here: Python prints what it raises ("Exception ignored in ...") and drops it
    assert ref() is None
