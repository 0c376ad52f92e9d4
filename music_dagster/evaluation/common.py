"""What both benchmarks share: their error, the methods (MUSIC, MUSIC*), generating a benchmark's images with a
method (a failed generation is a recorded failure, never the end of a run), reading them back, and the means of a
group of scored records."""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from music_dagster.errors import UserError
from music_dagster.evaluation.metrics import METRICS, mean


class BenchmarkError(UserError):
    """A benchmark folder or record that cannot be used: one line naming the file or subject."""


METHODS = ("music", "music_star")  # MUSIC: one greedy plan; MUSIC*: N sampled plans, the best CLIP-T kept
# (references, instruction, branches, seed) -> the generated PIL image; a UserError is that image's failure
GenerateFn = Callable[[Sequence[Path], str, int, int], Any]


@dataclass(frozen=True)
class Job:
    key: str
    references: tuple[Path, ...]
    instruction: str
    seed: int

    @property
    def file_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.key) + ".png"


def generate_images(jobs: Sequence[Job], generate: GenerateFn, branches: int, folder: Path) -> list[dict]:
    """Each job's image written as `folder/<file_name>` (PNG); the jobs whose generation failed, as failures."""
    from music_dagster.storage import png_bytes

    folder.mkdir(parents=True, exist_ok=True)
    failures = []
    for job in jobs:
        try:
            image = generate(job.references, job.instruction, branches, job.seed)
        except UserError as e:
            failures.append({"key": job.key, "path": None, "error": f"generation failed: {e}"})
            continue
        (folder / job.file_name).write_bytes(png_bytes(image))
    return failures


def method_branches(branches: int) -> dict[str, int]:
    """Each method's branch count: MUSIC one, MUSIC* `branches`."""
    return {"music": 1, "music_star": branches}


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
