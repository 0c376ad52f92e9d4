"""Dagster resources, wired from the config: the config itself (`project`), one per model role, storage and
tracking."""
from music_dagster.resources.project import ProjectConfig


def build_resources(project: ProjectConfig) -> dict:
    from music_dagster.resources.models import model_resources
    from music_dagster.resources.storage import DatasetStore
    from music_dagster.resources.tracking import MlflowTracking

    config = project.get()
    return {
        "project": project,
        **model_resources(config),
        "store": DatasetStore.from_config(config),
        "tracking": MlflowTracking.from_config(config),
    }
