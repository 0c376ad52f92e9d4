"""A copy of the project, run the way a user runs it: the `music` and `dvc` commands in a clone of their own.

`project_copy` lays the working tree's tracked and untracked (not ignored) files into a fresh git repo, as a clone
would have them, with params shrunk to a minimal run; `run_in` / `in_clone` run a command there with the project's
environment on PATH, the copy's code first on sys.path, its own Dagster instance, and HOME moved so the default DVC
remote (~/.cache/...) is a test folder.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from music_dagster.config import PROJECT_ROOT
from music_dagster.tracking import dvc


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout


def project_copy(dest: Path, shrink: bool = True) -> Path:
    """The working tree as a fresh git repo with nothing beside it that it reads; with `shrink`, params cut to a
    minimal run: 2 shards of 2 samples, a few training steps, a small evaluation."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT_ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"].values()
    outputs = tuple(f"{out}/" for stage in stages for out in stage["outs"])
    for name in filter(None, listed):
        if (PROJECT_ROOT / name).is_file() and not name.startswith(outputs):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, dest / name)
    if shrink:
        raw = yaml.safe_load((dest / "params.yaml").read_text())
        tiny = raw["profiles"]["tiny"]
        tiny["data"].update(num_shards=2, shard_size=2)
        tiny["train"].update(max_steps=3, batch_size=4, checkpoint_every=2, max_plan_tokens=16)
        tiny["detokenizer"].update(max_steps=2, batch_size=4, decode_steps=2)
        tiny["generate"].update(logged_samples=0)
        tiny["eval"].update(dreambench_subjects=1, dreambench_prompts=1, msic_samples=2, branches=2)
        (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "project copy")
    return dest


def copy_zoo(root: Path) -> None:
    """The project's tiny zoo into the copy (built once per session by the `tiny_zoo` fixture)."""
    shutil.copytree(PROJECT_ROOT / "models" / "tiny", root / "models" / "tiny",
                    ignore=shutil.ignore_patterns(".lock", ".*.tmp*"))


def project_env(project, **extra: str) -> dict[str, str]:
    """The environment of a child process (a command, a launch, a server) that reads `project`'s config (a
    `ProjectConfig`, or a params file): this process's, with the config's variables
    (`ProjectConfig.environment`) and `extra`. The one place a test hands a child its config."""
    from music_dagster.resources import ProjectConfig

    if not isinstance(project, ProjectConfig):
        project = ProjectConfig(params=str(project))
    env = {**os.environ, **extra}
    env.pop("MUSIC_PROFILE", None)  # the file's `profile`, unless the project names one
    return {**env, **project.environment()}


def clone_env(root: Path, home: Path) -> dict[str, str]:
    # The project's environment first; then dvc's own (after it: it has a `python` of its own).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"],
                            str(Path(dvc.dvc_executable()).parent)])
    return project_env(root / "params.yaml", PATH=path, PYTHONPATH=str(root),
                       DAGSTER_HOME=str(root / ".dagster_home"), HOME=str(home), DVC_NO_ANALYTICS="1",
                       HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", GIT_CONFIG_GLOBAL=os.devnull,
                       GIT_TERMINAL_PROMPT="0")


def run_in(root: Path, home: Path, *cmd: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """A command in the copy at `root`; its completed process, whatever its exit code."""
    return subprocess.run(list(cmd), cwd=root, env=clone_env(root, home), capture_output=True, text=True,
                          timeout=timeout)


def in_clone(root: Path, home: Path, *cmd: str) -> str:
    """A command in the copy at `root` that must succeed; its stdout."""
    proc = run_in(root, home, *cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)} in {root.name}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout
