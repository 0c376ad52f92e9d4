"""DVC from the project: the `dvc` command run by subprocess, DVC's hash of an output, recording an output in
`dvc.lock` and the remote, and `dvc import` of DreamBench. `dvc.yaml`'s stage entry points (`music stage <name>`)
are the application layer's: `pipeline.run_stage`.

dvc is never imported here: its hydra-core pins an antlr4 runtime that breaks Dagster's asset-selection parser, so it
lives in its own environment (`.dvc-tool/`, linked as `.venv/bin/dvc`). `dvc_md5` computes the hash DVC 3 writes
to `dvc.lock` (md5 of each file; a folder is the md5 of its sorted JSON listing plus `.dir`); `record_output`
checks it against DVC's own result whenever it commits.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from music_dagster.config import PROJECT_ROOT
from music_dagster.errors import UserError
from music_dagster.tracking.runs import TAG_DVC_HASH

TOOL_DVC = PROJECT_ROOT / ".dvc-tool" / "bin" / "dvc"
# Set by DVC for the command of a stage it runs (dvc/stage/run.py): `dvc repro` itself records the outputs then.
STAGE_ENV = "DVC_STAGE"


class DvcError(UserError):
    """DVC missing, failing, or disagreeing with the project about an output."""


def dvc_executable() -> str:
    """The `dvc` command: on PATH, else beside this Python (`make setup` links it into .venv/bin), else the
    project's isolated tool environment."""
    for candidate in (shutil.which("dvc"), Path(sys.executable).parent / "dvc", TOOL_DVC):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise DvcError("the dvc command is not installed (`make setup` installs it in .dvc-tool/)")


def run_dvc(*args: str, root: Path = PROJECT_ROOT) -> str:
    """Run `dvc <args>` in `root`; its stdout, or a one-line DvcError with DVC's last error line."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([dvc_executable(), *args], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        raise DvcError(f"dvc {' '.join(args)} failed: {(errors or lines or ['no output'])[-1]}")
    return proc.stdout


def _ignore_patterns(root: Path) -> list[str]:
    path = root / ".dvcignore"
    if not path.is_file():
        return []
    patterns = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for p in patterns:
        # Only what this project's .dvcignore uses: a file name anywhere, or a /rooted path; fail on the rest.
        if p.startswith("!") or "**" in p or p.endswith("/") or ("/" in p and not p.startswith("/")):
            raise DvcError(f".dvcignore: pattern {p!r} is not supported by music_dagster.tracking.dvc.dvc_md5")
    return patterns


def _ignored(rel: str, patterns: list[str]) -> bool:
    """gitignore's rule, as DVC applies it: a name pattern matches any folder or file on the path, a /rooted one the
    path or a folder above it; an ignored folder takes everything in it (a writer's leftover `.x.old.*/`)."""
    parts = rel.split("/")
    rooted = ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(any(fnmatch.fnmatchcase(path, p) for path in rooted) if p.startswith("/")
               else any(fnmatch.fnmatchcase(part, p) for part in parts) for p in patterns)


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_md5(path: str | os.PathLike, root: Path = PROJECT_ROOT) -> str:
    """The md5 DVC 3 records for `path` (a file, or a folder: `<md5>.dir`), leaving out `.dvcignore`d files."""
    path = Path(path).resolve()
    if path.is_file():
        return _file_md5(path)
    if not path.is_dir():
        raise DvcError(f"{path}: no such file or folder to hash")
    patterns = _ignore_patterns(root)
    entries = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if not _ignored(file.relative_to(root).as_posix() if file.is_relative_to(root) else rel, patterns):
            entries.append({"md5": _file_md5(file), "relpath": rel})
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def _rel(path: str | os.PathLike, root: Path) -> str:
    path = Path(path)
    path = path.resolve() if path.is_absolute() else (root / path).resolve()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise DvcError(f"{path} is outside the DVC project {root}") from None


def stage_of(path: str | os.PathLike, root: Path = PROJECT_ROOT) -> str:
    """The `dvc.yaml` stage whose outputs include `path`."""
    rel = _rel(path, root)
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            if (next(iter(out)) if isinstance(out, dict) else out) == rel:
                return name
    raise DvcError(f"{rel} is not an output of any stage in dvc.yaml")


def lock_hash(path: str | os.PathLike, root: Path = PROJECT_ROOT) -> str | None:
    """The md5 `dvc.lock` records for the output `path`, or None when it has none yet."""
    rel = _rel(path, root)
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == rel:
                return out.get("md5")
    return None


@dataclass(frozen=True)
class DvcRecord:
    """What a person needs to get an output back: its DVC hash and the stage whose output it is."""

    path: str  # relative to the project root (absolute when outside it)
    md5: str
    stage: str | None  # None: not an output of dvc.yaml, so DVC cannot pull it
    committed: bool  # recorded in dvc.lock and the DVC cache by this call
    pushed: bool  # copied to the default remote by this call
    note: str

    def metadata(self) -> dict[str, str]:
        """For a Dagster materialization."""
        meta = {"dvc_md5": self.md5, "dvc_status": self.note}
        if self.stage is not None:
            meta.update(dvc_stage=self.stage, dvc_pull=f"dvc pull {self.path}")
        return meta

    def tags(self) -> dict[str, str]:
        """For an MLflow run (`dvc.md5` is what `music runs` shows as the checkpoint)."""
        return {TAG_DVC_HASH: self.md5, "dvc.path": self.path, "dvc.stage": self.stage or "none"}


def record_output(path: str | os.PathLike, push: bool = True, root: Path = PROJECT_ROOT) -> DvcRecord:
    """Record an output of a `dvc.yaml` stage that Dagster just wrote: `dvc commit` its stage (dvc.lock and the
    cache), check DVC's hash against `dvc_md5`, then `dvc push` it to the default remote so that another clone
    can `dvc pull` it.

    Under `dvc repro` (DVC_STAGE set) DVC commits the output itself once the command ends: only the hash is
    computed. Where DVC cannot record it (a folder that is no stage output, dvc not installed, a stage input
    missing, the repo locked) the hash is still returned and `note` says why. A hash that disagrees with DVC's
    raises DvcError.
    """
    path = Path(path) if Path(path).is_absolute() else root / path
    md5 = dvc_md5(path, root)
    try:
        rel = _rel(path, root)
        stage = stage_of(rel, root)
    except DvcError as e:
        return DvcRecord(str(path), md5, None, False, False, f"not recorded by DVC: {e}")
    if os.environ.get(STAGE_ENV):
        return DvcRecord(rel, md5, stage, False, False, f"dvc repro of stage {os.environ[STAGE_ENV]} records it")
    try:
        run_dvc("commit", "--force", stage, root=root)
    except DvcError as e:
        return DvcRecord(rel, md5, stage, False, False, f"not committed: {e}")
    locked = lock_hash(rel, root)
    if locked != md5:
        raise DvcError(f"{rel}: dvc.lock records {locked} but the project computed {md5}")
    if not push:
        return DvcRecord(rel, md5, stage, True, False, "committed to dvc.lock (not pushed)")
    try:
        run_dvc("push", stage, root=root)
    except DvcError as e:
        return DvcRecord(rel, md5, stage, True, False, f"committed to dvc.lock; not pushed: {e}")
    return DvcRecord(rel, md5, stage, True, True, "committed to dvc.lock and pushed to the default remote")


# ---------------------------------------------------------------------------------------------------------------
# The whole DreamBench, the DVC way: `dvc import` of the public dataset folder, pinned by `<out>.dvc` in git.
DREAMBENCH_REPO = "https://github.com/google/dreambooth"
DREAMBENCH_REV = "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0"  # the commit data/dreambench was cut from


def import_dreambench(out: str = "datasets/dreambench", rev: str = DREAMBENCH_REV, root: Path = PROJECT_ROOT) -> Path:
    """`dvc import` google/dreambooth's `dataset/` folder (30 subjects, prompts, licences) into `out`; DVC writes
    `<out>.dvc` (commit it) and the full profile's `eval.dreambench` reads the folder. Nothing is left on failure."""
    rel = _rel(out, root)
    target = root / rel
    if target.exists():
        raise DvcError(f"{rel} already exists (`dvc update {rel}.dvc --rev <commit>` changes its revision)")
    made = [p for p in reversed(target.parents) if p.is_relative_to(root) and not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)  # dvc import needs the folder of its .dvc file
    try:
        run_dvc("import", DREAMBENCH_REPO, "dataset", "-o", rel, "--rev", rev, root=root)
    except DvcError as e:
        for folder in reversed(made):
            folder.rmdir()
        if "Failed to clone" in str(e):
            raise DvcError(f"cannot reach {DREAMBENCH_REPO} from this machine: run `music data dreambench` on a "
                           f"machine with network access and commit {rel}.dvc, or copy that repository's dataset/ "
                           f"folder (commit {rev[:8]}) to {rel}") from None
        raise
    return target
