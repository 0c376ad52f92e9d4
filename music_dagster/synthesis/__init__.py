"""The data-synthesis stages of MUSIC, one module per stage: pure functions over model handles and records.

Nothing here imports Dagster; torch and the model libraries are imported inside functions. Each stage takes the
parent records of one shard and returns `StageResult(records, dropped)`: a sample that the models fail on is
dropped with its reason, never crashing the shard; bad input raises a one-line `SynthesisError`.
"""
from music_dagster.errors import UserError


class SynthesisError(UserError):
    """Bad input to a data stage (category list, subject range, an unreadable image): one line naming it."""
