"""`MlflowTracking`: the project's MLflow store as a Dagster resource (a thin layer over
`music_dagster.tracking.runs`)."""
from __future__ import annotations

import dagster as dg

from music_dagster.config import Config
from music_dagster.tracking import runs as tracking


class MlflowTracking(dg.ConfigurableResource):
    """Tracking URI (SQLite in the project by default), artifact root and experiment of every run."""

    tracking_uri: str
    artifact_root: str
    experiment: str = tracking.EXPERIMENT
    ui_url: str = tracking.DEFAULT_UI_URL
    system_metrics_interval_s: float = 1.0

    @classmethod
    def from_config(cls, config: Config) -> "MlflowTracking":
        store = tracking.store_from_config(config)
        return cls(tracking_uri=store.tracking_uri, artifact_root=store.artifact_root)

    @property
    def store(self) -> tracking.Store:
        return tracking.Store(tracking_uri=self.tracking_uri, artifact_root=self.artifact_root,
                              experiment=self.experiment, ui_url=self.ui_url,
                              system_metrics_interval_s=self.system_metrics_interval_s)

    def check(self) -> None:
        """Before expensive work: a one-line error when the store is damaged or it or its artifact folder is
        read-only (`tracking.check_store`)."""
        tracking.check_store(self.store)

    def training_run(self, config: Config, context: dg.AssetExecutionContext, partitions=(), data_version=None,
                     name: str | None = None):
        """One run per training materialization, tagged with the Dagster run id, partitions and data version."""
        tags = {tracking.TAG_DAGSTER_RUN: context.run_id,
                tracking.TAG_PARTITIONS: ",".join(sorted(partitions))}
        if data_version is not None:
            tags[tracking.TAG_DATA_VERSION] = data_version
        return tracking.start_training_run(self.store, config, name or context.asset_key.to_user_string(), tags)

    def nested_run(self, parent_run_id: str, name: str, tags=None):
        """An evaluation run nested under a training run (context manager yielding `tracking.ActiveRun`)."""
        return tracking.start_nested_run(self.store, parent_run_id, name, tags)

    def client(self):
        return tracking.client(self.store)
