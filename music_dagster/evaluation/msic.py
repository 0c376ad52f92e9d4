"""MSIC: the held-out synthetic benchmark (1..12 subjects), read from the `training_samples` shards, generated with
MUSIC and MUSIC*, and scored.

Each subject is scored on the region where the detector finds its category in the generated image (the whole image
when it is not found; the found rate is reported), against its reference; CLIP-T is against the instruction with its
id tags replaced by category names. A generated image that cannot be read is a recorded failure, never the end of a
run.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from music_dagster.config import MAX_SUBJECTS
from music_dagster.evaluation.common import (BenchmarkError, GenerateFn, Job, evaluate_methods, group_summaries,
                                             read_generated, summarize)
from music_dagster.evaluation.metrics import Embedder, mean, text_scores
from music_dagster.synthesis.decimation import TAG


@dataclass(frozen=True)
class MsicSubject:
    id: int
    category: str
    reference: Path


@dataclass(frozen=True)
class MsicSample:
    """One held-out sample: its instruction (subjects referred to by `[i]` tags) and its reference subjects."""

    key: str
    instruction: str
    subjects: tuple[MsicSubject, ...]

    @property
    def text(self) -> str:
        """The instruction with each id tag replaced by its subject's category name (what CLIP-T is scored against)."""
        names = {s.id: s.category for s in self.subjects}
        return " ".join(TAG.sub(lambda m: names.get(int(m.group(1)), m.group(0)), self.instruction).split())


@dataclass(frozen=True)
class MsicItem:
    """A generated image for an MSIC sample, and its branch (MUSIC*)."""

    sample: MsicSample
    path: Path
    branch: int = 0

    @property
    def key(self) -> str:
        return self.sample.key


def load_msic(shards_dir: str | Path, limit: int | None = None) -> tuple[MsicSample, ...]:
    """The MSIC samples (`split: msic`) of the complete `training_samples` shards under `shards_dir`.

    With `limit`, samples are taken round-robin over subject counts (in shard and manifest order), so that every
    count present is represented before any count gets a second sample.
    """
    from music_dagster.storage import complete_shards, read_shard
    from music_dagster.training.records import shard_records

    shards_dir = Path(shards_dir)
    by_count: dict[int, list[MsicSample]] = defaultdict(list)
    for key in complete_shards(shards_dir):
        shard = read_shard(shards_dir / key)
        for record in shard_records(shard):
            n = record.line - 1
            if record.fields.get("split") != "msic":
                continue
            try:
                fields = [(int(s["id"]), str(s["category"]), s["reference"]) for s in record.subjects()]
                sample_id, instruction = str(record.fields["sample_id"]), str(record.fields["instruction"])
            except (KeyError, TypeError, ValueError) as e:
                raise BenchmarkError(f"{shard.path}: record {n}: not an MSIC sample (missing or bad {e})") from None
            subjects = tuple(MsicSubject(i, category, record.resolve(ref)) for i, category, ref in fields)
            sample = MsicSample(sample_id, instruction, subjects)
            for s in subjects:
                if not s.reference.is_file():
                    raise BenchmarkError(f"{shard.path}: record {n}: subject {s.id}'s reference {s.reference} "
                                         "is missing")
            if not 1 <= len(subjects) <= MAX_SUBJECTS:
                raise BenchmarkError(f"{shard.path}: record {n}: {len(subjects)} subjects, MSIC has 1..{MAX_SUBJECTS}")
            by_count[len(subjects)].append(sample)
    if not by_count:
        raise BenchmarkError(f"{shards_dir}: no MSIC samples (materialize training_samples with hold-out shards)")
    queues = [list(by_count[n]) for n in sorted(by_count)]
    picked = []
    while any(queues) and (limit is None or len(picked) < limit):
        for queue in queues:
            if queue and (limit is None or len(picked) < limit):
                picked.append(queue.pop(0))
    return tuple(picked)


def locate_categories(detector, image, categories: Sequence[str], box_threshold: float, text_threshold: float
                      ) -> list[tuple[float, float, float, float] | None]:
    """For each category, the pixel box (x1, y1, x2, y2) where the detector finds it in `image`, or None.

    The data graph's grounding call (`synthesis.detection.ground`): one GroundingDINO pass with every category in
    the query, a phrase's score per query from its tokens' probabilities, the best query per category, one category
    per query; no box is too small here.
    """
    from music_dagster.synthesis.detection import assign_boxes, ground
    from music_dagster.synthesis.schemas import phrase

    ((scores, token_max, boxes),) = ground(detector, [image], [[phrase(c) for c in categories]])
    chosen, _ = assign_boxes(scores, token_max, boxes, box_threshold, text_threshold, min_area=0.0)
    width, height = image.size
    found = []
    for j in range(len(categories)):
        if j not in chosen:
            found.append(None)
            continue
        x1, y1, x2, y2 = boxes[chosen[j][0]]
        found.append((x1 * width, y1 * height, x2 * width, y2 * height))
    return found


def crop_box(image, box: tuple[float, float, float, float] | None):
    """The box's region of `image` (at least one pixel), or the whole image for None."""
    if box is None:
        return image
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1 = min(x1, image.width - 1), min(y1, image.height - 1)
    return image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


def _msic_summary(samples: Sequence[dict]) -> dict:
    """Means over samples; the found rate over every subject of them."""
    subjects = [sub for s in samples for sub in s["subjects"]]
    return {**summarize(samples), "found_rate": mean([float(sub["found"]) for sub in subjects]),
            "subjects": len(subjects)}


def score_msic(items: Sequence[MsicItem], embedder: Embedder, detector, box_threshold: float,
               text_threshold: float) -> dict:
    """Per-sample, per-subject-count and overall DINO / CLIP-I (detected region vs reference) and CLIP-T."""
    failures: list[dict] = []
    ok, images = read_generated(items, failures)
    crops, boxes = [], []
    for item, image in zip(ok, images):
        found = locate_categories(detector, image, [s.category for s in item.sample.subjects], box_threshold,
                                  text_threshold)
        boxes.append(found)
        crops.extend(crop_box(image, box) for box in found)
    samples = []
    if ok:
        whole = embedder.images(images)
        clip_t = text_scores(whole, embedder.clip_texts([item.sample.text for item in ok]))
        regions = embedder.images(crops)
        refs = embedder.references([s.reference for item in ok for s in item.sample.subjects])
        # Each region against its own subject's reference: row-wise cosines.
        dino = (regions.dino * refs.dino).sum(dim=1).tolist()
        clip_i = (regions.clip * refs.clip).sum(dim=1).tolist()
        at = 0
        for i, (item, found) in enumerate(zip(ok, boxes)):
            subjects = []
            for s, box in zip(item.sample.subjects, found):
                subjects.append({"id": s.id, "category": s.category, "found": box is not None,
                                 "box": None if box is None else [round(v, 2) for v in box],
                                 "dino": dino[at], "clip_i": clip_i[at]})
                at += 1
            samples.append({
                "key": item.key, "branch": item.branch, "num_subjects": len(subjects), "text": item.sample.text,
                "dino": mean([s["dino"] for s in subjects]), "clip_i": mean([s["clip_i"] for s in subjects]),
                "clip_t": clip_t[i], "found_rate": mean([float(s["found"]) for s in subjects]),
                "subjects": subjects, **embedder.encoders,
            })
    return msic_result(samples, failures, embedder.encoders)


def msic_result(samples: Sequence[dict], failures: list[dict], encoders: dict) -> dict:
    """Overall and per-subject-count means of scored samples, with the samples' records and the failures."""
    return {
        "encoders": encoders,
        "overall": _msic_summary(samples),
        "by_subject_count": group_summaries(samples, "num_subjects", _msic_summary),
        "samples": list(samples),
        "failures": failures,
    }


def evaluate_msic(samples: Sequence[MsicSample], generate: GenerateFn, embedder: Embedder, detector, folder: Path,
                  branches: int, box_threshold: float, text_threshold: float, seed: int, selector: str) -> dict:
    """Generate each MSIC sample from its references and instruction, for MUSIC and MUSIC*
    (`common.evaluate_methods`: MUSIC*'s branch chosen by the selection encoder `selector` and by the evaluation's
    CLIP), into `folder/<music|music_star>/`, and score the subjects on their detected regions."""
    from music_dagster.synthesis.common import derive_seed

    jobs = [Job(s.key, tuple(x.reference for x in s.subjects), s.instruction, derive_seed("msic", seed, s.key))
            for s in samples]
    by_key = {s.key: s for s in samples}

    def score(images: list[tuple[Job, int, Path]]) -> tuple[list[dict], list[dict]]:
        result = score_msic([MsicItem(by_key[job.key], path, branch) for job, branch, path in images], embedder,
                            detector, box_threshold, text_threshold)
        return result["samples"], result["failures"]

    methods = {method: {**msic_result(records, failures, embedder.encoders), "branches": n}
               for method, (records, failures, n) in evaluate_methods(jobs, generate, score, folder, branches).items()}
    return {"benchmark": "msic", "encoders": embedder.encoders, "branches": branches,
            "selected_by": {"music_star": selector, "music_star_eval_clip": embedder.clip_name},
            "samples": [s.key for s in samples], "methods": methods}
