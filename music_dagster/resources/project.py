"""`ProjectConfig`: the project config (`params.yaml`, one profile) as a Dagster resource.

Assets, checks and schedules receive the config through this resource (key `project`), never by reading
`params.yaml` themselves, so a test or a launchpad swaps it in one line:
`dg.materialize(assets, resources={"project": ProjectConfig(params=str(path))})`.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from music_dagster.config import PARAMS_FILE, Config, load_config


@functools.lru_cache(maxsize=8)
def _load(path: str, profile: str | None, stamp: tuple[int, int]) -> Config:
    return load_config(path, profile)


class ProjectConfig(dg.ConfigurableResource):
    """Where the config comes from: a params file and, optionally, the profile to use instead of its `profile`."""

    params: str = Field(default=str(PARAMS_FILE), description="params.yaml to read (absolute, or relative to the "
                                                               "working directory)")
    profile: str | None = Field(default=None, description="profile to use (default: the file's `profile`, or "
                                                          "MUSIC_PROFILE)")

    @classmethod
    def from_environment(cls) -> ProjectConfig:
        """The config of this process: MUSIC_PARAMS, else the project's params.yaml."""
        return cls(params=os.environ.get("MUSIC_PARAMS") or str(PARAMS_FILE))

    def environment(self) -> dict[str, str]:
        """What a child process needs to read this config with `default_config()` (a training launch, a command):
        MUSIC_PARAMS (absolute), and MUSIC_PROFILE when a profile is set."""
        env = {"MUSIC_PARAMS": str(Path(self.params).resolve())}
        if self.profile is not None:
            env["MUSIC_PROFILE"] = self.profile
        return env

    def get(self) -> Config:
        """The validated config, read again only when the file changed (a one-line `ConfigError` when invalid)."""
        path = Path(self.params)
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = (0, 0)  # load_config names the missing file
        return _load(str(path), self.profile, stamp)
