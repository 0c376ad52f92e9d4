"""Shared fixtures. Tests run offline on the tiny zoo, with one torch thread (2 cores are shared)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never a download, whatever the shell says
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
from hypothesis import HealthCheck, settings

# Property tests assert behaviour, never speed: on a busy 2-core machine a per-example deadline or the too-slow
# health check only makes them flaky. Derandomized, so CI explores the same examples on every run.
settings.register_profile("music", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.load_profile("music")


@pytest.fixture(scope="session")
def tiny_zoo():
    """The project's `models/tiny/` zoo, built once if missing (or built by other code): role -> folder."""
    import torch

    from music_dagster.config import default_config
    from music_dagster.zoo import ensure_zoo

    torch.set_num_threads(1)
    return ensure_zoo(seed=default_config().seed)  # the project's seed, as the zoo asset builds it
