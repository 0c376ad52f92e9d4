"""The fault battery's one expensive fixture: a trained project, built once per session and copied per test."""
import pytest

from helpers import build_project


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A project copy after `music pipeline`: data, checkpoints, scores, metrics and MLflow runs. Tests copy it
    (`helpers.copy_project`) and never change it."""
    return build_project(tmp_path_factory.mktemp("trained") / "p", "pipeline")
