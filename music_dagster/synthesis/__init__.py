"""The data-synthesis stages of MUSIC, one module per stage: pure functions over model handles and records.

Nothing here imports Dagster; torch and the model libraries are imported inside functions. Each stage takes model
handles, a `ShardContext` (key, seed), the `data` config and the parent records of one shard, and returns a
`StageResult` (records, the images they reference, dropped samples with reasons): a sample the models fail on is
dropped, never crashing the shard; bad input raises a one-line `SynthesisError` (or `ImageError` for an image).
"""
from music_dagster.errors import UserError


class SynthesisError(UserError):
    """Bad input to a data stage (category list, subject range, an unreadable image): one line naming it."""
