"""Shared by the fault tests (one file per topic in tests/faults/): run `music` in a project copy, check that a fault
is reported as one line, and check that it left the data, the models and the MLflow store as they were.

    root = build_project(tmp / "p", "data")       # a project copy with the zoo and the data stage materialized
    before = snapshot(root)
    proc = music(root, home, "stage", "train")
    line = assert_one_line_error(proc, 2, "lam")
    assert snapshot(root) == before
"""
import contextlib
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from projects import copy_zoo, in_clone, project_copy, run_in

# What a failed or refused command must leave byte-identical.
STORES = ("datasets", "models", "mlruns.db", "mlartifacts")


def snapshot(root: Path, names: tuple[str, ...] = STORES) -> dict[str, str]:
    """sha256 of every file under `names` (files or folders) in `root`, keyed by path relative to `root`."""
    digests = {}
    for name in names:
        top = root / name
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file():
                digests[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def music(root: Path, home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`music <args>` in the project copy at `root` (its own Dagster instance, MLflow store and HOME)."""
    return run_in(root, home, "music", *args, timeout=timeout)


def as_user(*cmd: str) -> list[str]:
    """`cmd` run so that file permissions bind. Root (CI containers, this machine) writes into read-only folders
    through CAP_DAC_OVERRIDE, so as root the command runs with that capability dropped (capsh, Debian's
    libcap2-bin: scripts/install_test_tools.sh installs it). Never skipped: a missing capsh fails the test."""
    if os.geteuid() != 0:
        return list(cmd)
    capsh = shutil.which("capsh") or shutil.which("capsh", path="/usr/sbin:/sbin")
    assert capsh, "capsh is missing: run scripts/install_test_tools.sh (Debian package libcap2-bin)"
    return [capsh, "--drop=cap_dac_override", "--", "-c", 'exec "$0" "$@"', *cmd]


def music_as_user(root: Path, home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`music <args>` in the project copy, with file permissions binding even for root (`as_user`)."""
    return run_in(root, home, *as_user("music", *args), timeout=timeout)


def read_only(*paths: Path) -> None:
    """Take write permission away from each path and everything under it (`writable` gives it back)."""
    for top in paths:
        for path in [top, *(top.rglob("*") if top.is_dir() else ())]:
            path.chmod(path.stat().st_mode & ~0o222)


def writable(*paths: Path) -> None:
    """Give the owner write permission on each path and everything under it again (so tmp folders can go)."""
    for top in paths:
        for path in [top, *(top.rglob("*") if top.is_dir() else ())]:
            path.chmod(path.stat().st_mode | 0o200)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int = 2, *fragments: str) -> str:
    """The command exited with `code` and wrote exactly one line on stderr, containing each fragment, and no
    traceback anywhere; returns that line."""
    output = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert proc.returncode == code, output
    assert "Traceback" not in proc.stderr + proc.stdout, output
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, output
    for fragment in fragments:
        assert fragment in lines[0], output
    return lines[0]


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of the built project `src` at `dest` whose MLflow store points at the copy's own `mlartifacts/`
    (the store records absolute artifact locations, which would otherwise still name `src`'s folder)."""
    import sqlite3

    shutil.copytree(src, dest, symlinks=True)
    db = dest / "mlruns.db"
    if db.exists():
        old, new = (src / "mlartifacts").as_uri(), (dest / "mlartifacts").as_uri()
        with contextlib.closing(sqlite3.connect(db)) as con, con:
            con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
            con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    return dest


def build_project(dest: Path, *stages: str, home: Path | None = None) -> Path:
    """A shrunk project copy at `dest` with the tiny zoo and the given `music stage` stages materialized in order
    (`"pipeline"` runs `music pipeline`). Build it once per module and `shutil.copytree` it per test.

    The MLflow experiment records its artifact folder as an absolute path, so a copy of a project that has
    MLflow runs logs new artifacts into the original's `mlartifacts/`: tests that train again in a copy should
    start from a project built without training."""
    dest.mkdir(parents=True, exist_ok=True)
    project_copy(dest)
    copy_zoo(dest)
    home = home or dest.parent / f"{dest.name}-home"
    home.mkdir(exist_ok=True)
    for stage in stages:
        in_clone(dest, home, "music", *(["pipeline"] if stage == "pipeline" else ["stage", stage]))
    return dest
