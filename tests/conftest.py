"""Shared fixtures. Tests run offline on the tiny zoo, with one torch thread (2 cores are shared)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest


@pytest.fixture(scope="session")
def tiny_zoo():
    """The project's `models/tiny/` zoo, built once if missing (or built by other code): role -> folder."""
    import torch

    from music_dagster.zoo import ensure_zoo

    torch.set_num_threads(1)
    return ensure_zoo()
