"""Subject-count decimation (the paper's augmentation; DESIGN "training_samples").

A sample is a plain dict:
    {"subjects": [{"id": 1, "category": "dog", "box": [x1, y1, x2, y2], ...}, ...],
     "instruction": str, "cot": str, "layout": grid x grid ids (nested lists or array), ...any other keys}
Subject ids are 1..N. In the instruction and the CoT a subject is referred to by the tag `[i]` (its id in square
brackets, e.g. "put [2] on the left of [1]"); the VLM prompt of `cot_annotations` asks for exactly this form.

`decimate` sorts the subjects by box area and removes the smallest one at a time (equal areas: the higher id first)
until `min_subjects` remain, keeping every intermediate count: N, N-1, ..., min_subjects subjects. At each step the
kept subjects are renumbered 1..k in their original id order, consistently in the subjects list, both texts and the
layout; a removed subject's cells become background (0) and its tag becomes its plain category name. All other
subject fields (reference, region, ...) travel with their subject. Pure: the input is never modified.
"""
from __future__ import annotations

import copy
import math
import re

import numpy as np

from music_dagster.errors import UserError

TAG = re.compile(r"\[(\d+)\]")


class DecimationError(UserError):
    """A sample that cannot be decimated (inconsistent ids, tags or layout); one line naming the problem."""


def tag(subject_id: int) -> str:
    """The tag that refers to subject `subject_id` in an instruction or CoT."""
    return f"[{subject_id}]"


def tags_in(text: str) -> list[int]:
    """The subject ids tagged in `text`, in order of appearance."""
    return [int(m.group(1)) for m in TAG.finditer(text)]


def box_area(box) -> float:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x2 - x1) * (y2 - y1)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(sample: dict) -> tuple[list[dict], np.ndarray]:
    subjects = sample.get("subjects")
    if not isinstance(subjects, list) or not subjects or not all(isinstance(s, dict) for s in subjects):
        raise DecimationError("sample subjects must be a non-empty list of mappings")
    ids = sorted(s.get("id") for s in subjects if isinstance(s.get("id"), int))
    if ids != list(range(1, len(subjects) + 1)):
        raise DecimationError(f"subject ids must be 1..{len(subjects)}, got {[s.get('id') for s in subjects]}")
    for s in subjects:
        if not isinstance(s.get("category"), str) or not s["category"].strip():
            raise DecimationError(f"subject {s['id']} has no category")
        box = s.get("box")
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_finite(v) for v in box):
            raise DecimationError(f"subject {s['id']}: box must be 4 numbers, got {box!r}")
    n = len(subjects)
    for key in ("instruction", "cot"):
        text = sample.get(key)
        if not isinstance(text, str):
            raise DecimationError(f"sample {key} must be a string")
        bad = sorted({i for i in tags_in(text) if not 1 <= i <= n})
        if bad:
            raise DecimationError(f"sample {key} tags unknown subject {tag(bad[0])} (subjects 1..{n})")
    try:
        layout = np.asarray(sample.get("layout"))
    except ValueError:
        raise DecimationError("sample layout must be a square grid of integer ids (rows differ in length)") from None
    if layout.ndim != 2 or layout.shape[0] != layout.shape[1] or not np.issubdtype(layout.dtype, np.integer):
        raise DecimationError(f"sample layout must be a square grid of integer ids, got shape {layout.shape}")
    if layout.min() < 0 or layout.max() > n:
        raise DecimationError(f"sample layout holds id {int(layout.max())} outside 0..{n}")
    return sorted(subjects, key=lambda s: s["id"]), layout


def _relabel_text(text: str, mapping: dict[int, int], names: dict[int, str]) -> str:
    return TAG.sub(lambda m: tag(mapping[i]) if (i := int(m.group(1))) in mapping else names[i], text)


def decimate(sample: dict, min_subjects: int = 2) -> list[dict]:
    """Samples with N, N-1, ..., `min_subjects` subjects (empty when N < min_subjects); see the module docstring."""
    if min_subjects < 1:
        raise DecimationError(f"min_subjects must be >= 1, got {min_subjects}")
    subjects, layout = _check(sample)
    n = len(subjects)
    removal = [s["id"] for s in sorted(subjects, key=lambda s: (box_area(s["box"]), -s["id"]))]
    names = {s["id"]: s["category"].strip() for s in subjects}
    out = []
    for k in range(n, min_subjects - 1, -1):
        removed = set(removal[: n - k])
        kept = [s for s in subjects if s["id"] not in removed]
        mapping = {s["id"]: new for new, s in enumerate(kept, start=1)}
        lut = np.zeros(n + 1, dtype=np.int64)
        for old, new in mapping.items():
            lut[old] = new
        item = copy.deepcopy({key: v for key, v in sample.items() if key not in ("subjects", "layout")})
        item["subjects"] = [dict(copy.deepcopy(s), id=mapping[s["id"]]) for s in kept]
        item["instruction"] = _relabel_text(sample["instruction"], mapping, names)
        item["cot"] = _relabel_text(sample["cot"], mapping, names)
        item["layout"] = lut[layout].tolist()
        out.append(item)
    return out
