"""Dagster resources, wired from the config: one per model role, plus storage and tracking."""
from music_dagster.config import Config


def build_resources(config: Config) -> dict:
    from music_dagster.resources.models import model_resources
    from music_dagster.resources.storage import DatasetStore
    from music_dagster.resources.tracking import MlflowTracking

    return {
        **model_resources(config),
        "store": DatasetStore.from_config(config),
        "tracking": MlflowTracking.from_config(config),
    }
