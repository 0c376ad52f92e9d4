"""Stage 10, `training_samples`: subject-count decimation (`synthesis/decimation.py`) of every annotated sample: N,
N-1, ..., `data.min_subjects` subjects, ids renumbered in instruction, CoT and layout.

MSIC hold-out: a fixed, seeded share of the shards (one in `data.msic_holdout_every`) is the MSIC benchmark, not
training data; its samples are marked `split: msic` and decimated further, down to one subject (MSIC spans 1..12).
"""
from __future__ import annotations

from music_dagster.model.layout import layout_to_text
from music_dagster.synthesis.common import ShardContext, StageResult, derive_seed, shard_index
from music_dagster.synthesis.decimation import decimate

STAGE = "training_samples"
MSIC_MIN_SUBJECTS = 1


def is_msic_shard(key: str, seed: int, every: int) -> bool:
    """Whether shard `key` is held out: for `shard-<i>` keys, i % every == seed % every (so any `every`
    consecutive shards hold exactly one MSIC shard); for other keys, a hash of (seed, key) picks one in `every`."""
    index = shard_index(key)
    if index is not None:
        return index % every == seed % every
    return derive_seed("msic", seed, key) % every == 0


def training_samples(ctx: ShardContext, data, records: list[dict], held_out: bool) -> StageResult:
    floor = MSIC_MIN_SUBJECTS if held_out else data.min_subjects
    result = StageResult()
    for record in records:
        subjects = [{"id": i, "category": s["category"], "box": s["box"], "reference": s["reference"],
                     "region": s["region"], "mask": s["mask"]} for i, s in enumerate(record["subjects"], start=1)]
        source = {"subjects": subjects, "instruction": record["instruction"], "cot": record["cot"],
                  "layout": record["layout"]}
        for item in decimate(source, min_subjects=floor):
            n = len(item["subjects"])
            result.records.append({
                "sample_id": f"{record['sample_id']}-n{n:02d}", "parent_ids": [record["sample_id"]],
                "shard": ctx.key, "split": "msic" if held_out else "train", "num_subjects": n,
                "source_subjects": len(subjects), "image": record["image"], "caption": record["caption"],
                "scene": record["scene"], "instruction": item["instruction"], "cot": item["cot"],
                "layout": item["layout"], "layout_text": layout_to_text(item["layout"]),
                "subjects": item["subjects"],
            })
    return result
