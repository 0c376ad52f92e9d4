"""What both benchmarks share: their error, the methods (MUSIC, MUSIC* chosen two ways), generating a benchmark's
images with a method (a failed generation is a recorded failure, never the end of a run), reading them back,
choosing MUSIC*'s branch, and the means of a group of scored records."""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from music_dagster.errors import UserError
from music_dagster.evaluation.metrics import METRICS, mean
from music_dagster.interrupts import raise_kept_interrupt


class BenchmarkError(UserError):
    """A benchmark folder or record that cannot be used: one line naming the file or subject."""


# MUSIC: one greedy plan. MUSIC*: N sampled plans; "music_star" keeps the branch the selection encoder
# (`select_clip`) matches best with the instruction, "music_star_eval_clip" the same N branches' one with the highest
# CLIP-T as the evaluation scores it (the paper's way: the CLIP that selects is the one that scores).
METHODS = ("music", "music_star", "music_star_eval_clip")


@dataclass(frozen=True)
class Generated:
    """One request's images, one per branch in branch order, and the branch the selection encoder kept."""

    images: tuple[Any, ...]  # PIL images
    best: int = 0


# (references, instruction, branches, seed) -> the generated branches; a UserError is that request's failure
GenerateFn = Callable[[Sequence[Path], str, int, int], Generated]
# [(job, branch, image path)] -> (score records, each with `key`, `branch` and `clip_t`; failures)
ScoreFn = Callable[[list[tuple["Job", int, Path]]], tuple[list[dict], list[dict]]]


@dataclass(frozen=True)
class Job:
    key: str
    references: tuple[Path, ...]
    instruction: str
    seed: int

    @property
    def file_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.key) + ".png"


def generate_images(jobs: Sequence[Job], generate: GenerateFn, branches: int, folder: Path
                    ) -> tuple[dict[str, list[Path]], dict[str, int], list[dict]]:
    """Each job's kept image written as `folder/<file_name>` (PNG) and, with several branches, every branch as
    `folder/branches/<name>-<i>.png`. Returns per job key the images to score (the kept one, or every branch) and
    the branch kept, and the jobs whose generation failed, as failures."""
    from music_dagster.storage import png_bytes

    folder.mkdir(parents=True, exist_ok=True)
    images, kept, failures = {}, {}, []
    for job in jobs:
        raise_kept_interrupt()  # a stop kept in the step (`interrupts.interrupts_kept`) ends it between jobs
        try:
            generated = generate(job.references, job.instruction, branches, job.seed)
        except UserError as e:
            failures.append({"key": job.key, "path": None, "error": f"generation failed: {e}"})
            continue
        (folder / job.file_name).write_bytes(png_bytes(generated.images[generated.best]))
        kept[job.key] = generated.best
        if branches == 1:
            images[job.key] = [folder / job.file_name]
            continue
        (folder / "branches").mkdir(exist_ok=True)
        images[job.key] = []
        for i, image in enumerate(generated.images):
            path = folder / "branches" / f"{Path(job.file_name).stem}-{i}.png"
            path.write_bytes(png_bytes(image))
            images[job.key].append(path)
    return images, kept, failures


def choose_branches(records: Sequence[dict], kept: Mapping[str, int]) -> dict[str, list[dict]]:
    """MUSIC*'s record of each job, two ways, from the scored records of its branches (in branch order):
    `music_star`, the branch the selection encoder kept (none when that image could not be read), and
    `music_star_eval_clip`, the branch with the highest CLIP-T (the evaluation's CLIP; ties: the lower branch)."""
    by_key = defaultdict(list)
    for r in records:
        by_key[r["key"]].append(r)
    return {"music_star": [r for r in records if r["branch"] == kept[r["key"]]],
            "music_star_eval_clip": [max(rs, key=lambda r: r["clip_t"]) for rs in by_key.values()]}


def evaluate_methods(jobs: Sequence[Job], generate: GenerateFn, score: ScoreFn, folder: Path, branches: int
                     ) -> dict[str, tuple[list[dict], list[dict], int]]:
    """Each method's (score records, failures, branches): MUSIC (one branch) and MUSIC* (`branches`) generated into
    `folder/music/` and `folder/music_star/`; every image scored once, each of MUSIC*'s branches too, and MUSIC*'s
    branch chosen both ways among them (`choose_branches`), so its branches are generated once."""
    out = {}
    for name, n in (("music", 1), ("music_star", branches)):
        images, kept, failed = generate_images(jobs, generate, n, folder / name)
        records, failures = score([(job, i, path) for job in jobs for i, path in enumerate(images.get(job.key, ()))])
        chosen = {"music": records} if name == "music" else choose_branches(records, kept)
        out.update({method: (rs, failed + failures, n) for method, rs in chosen.items()})
    return out


def read_generated(items: Sequence, failures: list[dict]):
    """The readable generated images, in order, with each unreadable one recorded in `failures`."""
    from music_dagster.images import read_image

    ok, images = [], []
    for item in items:
        try:
            images.append(read_image(item.path))
        except UserError as e:
            failures.append({"key": item.key, "path": str(item.path), "error": str(e)})
            continue
        ok.append(item)
    return ok, images


def summarize(records: Sequence[dict]) -> dict:
    """Each metric's mean over `records`, and their number."""
    return {**{m: mean([r[m] for r in records]) for m in METRICS}, "n": len(records)}


def group_summaries(records: Sequence[dict], key: str, summary: Callable[[Sequence[dict]], dict],
                    name: Callable = str) -> dict:
    """`summary` of each group of `records` sharing `record[key]`, by `name(value)`, in sorted value order."""
    groups = defaultdict(list)
    for r in records:
        groups[r[key]].append(r)
    return {name(value): summary(rs) for value, rs in sorted(groups.items())}
