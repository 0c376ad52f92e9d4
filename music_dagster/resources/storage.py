"""`DatasetStore`: the project's `datasets/` folder as a Dagster resource (a thin layer over `music_dagster.storage`)."""
from __future__ import annotations

from pathlib import Path

import dagster as dg

from music_dagster import storage
from music_dagster.config import Config


class DatasetStore(dg.ConfigurableResource):
    """Shards live at `<root>/<asset>/<shard key>/`; only complete shards are ever visible."""

    root: str

    @classmethod
    def from_config(cls, config: Config) -> "DatasetStore":
        return cls(root=str(config.paths.resolve("datasets")))

    def asset_dir(self, asset: str) -> Path:
        return Path(self.root) / storage.check_key(asset, "asset name")

    def shard_path(self, asset: str, key: str) -> Path:
        return self.asset_dir(asset) / storage.check_key(key)

    def check_writable(self, asset: str, key: str) -> Path:
        """Before a shard is computed: a one-line error when it could not be written (a read-only folder or
        shard: a read-only shard is never replaced)."""
        return storage.check_replaceable(self.shard_path(asset, key), "paths.datasets")

    def writer(self, asset: str, key: str, schema: dict) -> storage.ShardWriter:
        """`with store.writer("grid_layouts", key, SCHEMA) as w: ...`: the shard appears only when the block ends."""
        return storage.ShardWriter(self.shard_path(asset, key), schema)

    def read(self, asset: str, key: str) -> storage.Shard:
        return storage.read_shard(self.shard_path(asset, key))

    def exists(self, asset: str, key: str) -> bool:
        return (self.shard_path(asset, key) / storage.MANIFEST).is_file()

    def complete_shards(self, asset: str) -> list[str]:
        return storage.complete_shards(self.asset_dir(asset))
