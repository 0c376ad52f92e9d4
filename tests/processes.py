"""Killing a child process at a known point, for the tests of what a killed write leaves behind."""
import subprocess
import sys
import time
from pathlib import Path


def kill_when_ready(script: str, args: list[str], ready: Path, timeout_s: float, env: dict | None = None,
                    quiet: bool = False) -> None:
    """Run `python -c script *args`, wait until it creates the file `ready` (failing if it exits first or takes
    longer than `timeout_s`), then SIGKILL it: no cleanup handler of the child runs."""
    out = subprocess.DEVNULL if quiet else None
    child = subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            assert child.poll() is None, f"the child exited ({child.returncode}) before {ready.name} appeared"
            assert time.monotonic() < deadline, f"the child did not create {ready.name} within {timeout_s:.0f} s"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
