"""Shared fixtures. Tests run offline on the tiny zoo, with one torch thread (2 cores are shared)."""
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never a download, whatever the shell says
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
from hypothesis import HealthCheck, settings

# Property tests assert behaviour, never speed: on a busy 2-core machine a per-example deadline or the too-slow
# health check only makes them flaky. Derandomized, so CI explores the same examples on every run.
settings.register_profile("music", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.load_profile("music")


def pytest_collection_modifyitems(items):
    """The few tests marked `long` come first. Under `make test`'s two workers (work stealing: each starts on its half
    of the collection) the first runs them one after another, beside the short ones, not two trainings side by
    side, and none of them starts last."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: otherwise the collection order


@pytest.fixture(scope="session")
def tiny_zoo():
    """The project's `models/tiny/` zoo, built once if missing (or built by other code): role -> folder."""
    import torch

    from music_dagster.config import default_config
    from music_dagster.zoo.tiny import ensure_zoo

    torch.set_num_threads(1)
    return ensure_zoo(seed=default_config().seed)  # the project's seed, as the zoo asset builds it


@pytest.fixture(scope="session")
def make_project(tmp_path_factory):
    """A factory of project configs: `make_project(root=None, paths=None, outputs=False, **sections)` writes the
    project's params.yaml to `root/params.yaml` (default root: a new temporary folder) with the tiny profile, the
    `paths` entries of `paths` replaced, and each tiny-profile section of `sections` updated
    (`train={"max_steps": 2}`); `outputs`: every output path (datasets, models, metrics, work, the MLflow store and
    artifacts) under `root`. Returns its `ProjectConfig` (profile `tiny`, whatever MUSIC_PROFILE says):
    `project.get()` is the config, `dg.materialize(assets, resources=build_resources(project))` runs assets on
    it, `project.environment()` is what a child process needs to read it (`projects.project_env`)."""
    import yaml

    from music_dagster.config import PARAMS_FILE
    from music_dagster.resources import ProjectConfig

    def make(root=None, paths=None, outputs=False, **sections) -> ProjectConfig:
        root = Path(root) if root is not None else tmp_path_factory.mktemp("project")
        root.mkdir(parents=True, exist_ok=True)
        raw = yaml.safe_load(PARAMS_FILE.read_text())
        raw["profile"] = "tiny"
        if outputs:
            raw["paths"].update(datasets=str(root / "datasets"), models=str(root / "models"),
                                metrics=str(root / "metrics"), work=str(root / "work"),
                                mlflow_tracking_uri=f"sqlite:///{root / 'mlruns.db'}",
                                mlflow_artifacts=str(root / "mlartifacts"))
        raw["paths"].update({k: str(v) for k, v in (paths or {}).items()})
        tiny = raw["profiles"]["tiny"]
        for name, values in sections.items():
            tiny[name] = {**(tiny.get(name) or {}), **values}
        path = root / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        return ProjectConfig(params=str(path), profile="tiny")

    return make


@pytest.fixture()
def raising_handlers():
    """SIGINT and SIGTERM raise `signals.Interrupted` wherever the code is, as inside a Dagster step."""
    import signal

    from signals import SIGNALS, raise_interrupted

    before = {s: signal.getsignal(s) for s in SIGNALS}
    for s in before:
        signal.signal(s, raise_interrupted)
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.fixture()
def use_project(monkeypatch):
    """`use_project(project)`: for one test, the process's own config (`default_config()`, what the `music`
    commands read when run in-process) is `project`'s."""
    from music_dagster.config import default_config

    def use(project):
        for key, value in project.environment().items():
            monkeypatch.setenv(key, value)
        default_config.cache_clear()

    yield use
    default_config.cache_clear()


@pytest.fixture()
def fail_captions(monkeypatch):
    """`fail_captions(key)`: from now on the `scene_captions` stage fails for shard `key` with a one-line
    SynthesisError, an injected model fault (every other shard runs the real stage); `fail_captions(None)` puts
    the real stage back."""
    from music_dagster.synthesis import SynthesisError, captions

    real = captions.scene_captions

    def fail(key):
        def failing(llm, ctx, *args):
            if ctx.key == key:
                raise SynthesisError("the LLM wrote no caption (injected)")
            return real(llm, ctx, *args)

        monkeypatch.setattr(captions, "scene_captions", real if key is None else failing)

    return fail
