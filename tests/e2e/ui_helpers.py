"""Live servers for the browser tests: `dagster dev` and `mlflow server` on 127.0.0.1, each in its own process group
with default signal handlers (a background shell may hand it SIGINT ignored), stopped by its group id: TERM, then
KILL after a grace period. Plus the GraphQL queries the Dagster test polls."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from music_dagster.config import PROJECT_ROOT

BIN = Path(sys.executable).parent  # the project's environment: dagster, mlflow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_signals():
    # Runs in the child before exec: a new session (so the group id is the pid) with default dispositions.
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


class Server:
    """A server process group; `stop()` ends the group, `log_tail()` goes into failure messages."""

    def __init__(self, name: str, cmd: list[str], url: str, log: Path, env: dict, cwd: Path):
        self.name, self.url, self.log = name, url, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=_default_signals)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_http(self, path: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=5):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise AssertionError(f"{self.name} did not answer {path} within {timeout_s} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20) -> None:
        pgid = self.proc.pid  # setsid made the child its group's leader
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.25)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def dagster_home(tmp: Path) -> Path:
    """A fresh instance home: the project's dagster.yaml (pools) with the first-visit modal and telemetry off."""
    home = tmp / "dagster_home"
    home.mkdir()
    config = yaml.safe_load((PROJECT_ROOT / ".dagster_home" / "dagster.yaml").read_text()) or {}
    config["nux"] = {"enabled": False}
    config["telemetry"] = {"enabled": False}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
    return home


def start_dagster(tmp: Path, log: Path, workspace: Path, cwd: Path) -> Server:
    """`dagster dev` on `workspace` with a fresh DAGSTER_HOME under `tmp`, on 127.0.0.1 and a free port; returns
    once every code location has loaded."""
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home(tmp)),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "dagster"), "dev", "-w", str(workspace), "-h", "127.0.0.1", "-p", str(port)]
    server = Server("dagster dev", cmd, f"http://127.0.0.1:{port}", log, env, cwd)
    try:
        server.wait_http("/server_info")
        wait_code_location(server)
    except BaseException:
        server.stop()
        raise
    return server


def start_mlflow(store: Path, log: Path) -> Server:
    """`mlflow server` (one worker) on the SQLite store `store/mlruns.db`, on 127.0.0.1 and a free port."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{store / 'mlruns.db'}",
           "--default-artifact-root", (store / "artifacts").as_uri()]
    server = Server("mlflow server", cmd, f"http://127.0.0.1:{port}", log, env, store)
    try:
        server.wait_http("/health")
    except BaseException:
        server.stop()
        raise
    return server


def graphql(server: Server, query: str, variables: dict | None = None) -> dict:
    out = post_json(f"{server.url}/graphql", {"query": query, "variables": variables or {}})
    if out.get("errors"):
        raise AssertionError(f"GraphQL errors: {out['errors']}")
    return out["data"]


LOCATIONS_Q = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def wait_code_location(server: Server, timeout_s: float = 180) -> None:
    """Until every code location has loaded; a load error fails with its message."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = graphql(server, LOCATIONS_Q)["workspaceOrError"].get("locationEntries") or []
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            for e in entries:
                loaded = e["locationOrLoadError"]
                if loaded["__typename"] != "RepositoryLocation":
                    raise AssertionError(f"code location {e['name']} failed to load: {loaded.get('message')}")
            return
        time.sleep(1)
    raise AssertionError(f"code location not loaded within {timeout_s} s:\n{server.log_tail()}")


RUNS_Q = "{ runsOrError { ... on Runs { results { runId status assetSelection { path } } } } }"


def runs(server: Server) -> list[dict]:
    return graphql(server, RUNS_Q)["runsOrError"]["results"]


def wait_new_run(server: Server, known: set[str], timeout_s: float = 600) -> dict:
    """The first run not in `known`, once it has finished (SUCCESS, FAILURE or CANCELED)."""
    deadline = time.monotonic() + timeout_s
    run = None
    while time.monotonic() < deadline:
        new = [r for r in runs(server) if r["runId"] not in known]
        if new:
            run = new[0]
            if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                return run
        time.sleep(1)
    raise AssertionError(f"no finished run within {timeout_s} s (last seen: {run})")
