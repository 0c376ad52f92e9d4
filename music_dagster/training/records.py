"""`training_samples` records read back: the one reader that training (`training.collect_samples`) and the MSIC
benchmark (`evaluation.msic.load_msic`) share.

A shard lives at `<datasets root>/<asset>/<key>/`; the paths its records store (references, the target image) are
datasets-relative, `<asset>/<key>/<file>`, and are resolved inside the datasets root (`storage.resolve_stored`), so a
path that leaves it is refused with the manifest line that holds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class StoredRecord:
    """One manifest record of a `training_samples` shard, as stored."""

    shard: Path  # the shard folder
    line: int  # the manifest line, 1-based
    fields: dict

    @property
    def where(self) -> str:
        """What an error names: the manifest and the line."""
        from music_dagster.storage import MANIFEST

        return f"{self.shard / MANIFEST}: line {self.line}"

    def subjects(self) -> list[dict]:
        """The record's subjects in id order."""
        return sorted(self.fields["subjects"], key=lambda s: s["id"])

    def resolve(self, ref) -> Path:
        """The file a stored path of this record names, inside the datasets root."""
        from music_dagster.storage import resolve_stored

        return resolve_stored(self.shard.parent.parent, ref, self.where)


def shard_records(shard) -> Iterator[StoredRecord]:
    """Every record of a read shard (`storage.read_shard`), in manifest order."""
    for n, fields in enumerate(shard.records):
        yield StoredRecord(shard.path, n + 1, fields)
