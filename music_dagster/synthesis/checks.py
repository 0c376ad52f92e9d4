"""The invariants each data stage guarantees, checked on the records as written (the asset checks call these).

Each check returns `Verdict(passed, detail)`; `detail` names the first offending sample, so a failure is actionable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from music_dagster.synthesis.captions import missing_phrases
from music_dagster.synthesis.category_names import display_name
from music_dagster.synthesis.common import box_area
from music_dagster.synthesis.decimation import tags_in
from music_dagster.synthesis.schemas import cot_pattern, phrase


@dataclass(frozen=True)
class Verdict:
    passed: bool
    detail: str


def _first(records: list[dict], problem: Callable[[dict], str | None], ok: str) -> Verdict:
    for record in records:
        found = problem(record)
        if found:
            return Verdict(False, f"{record['sample_id']}: {found}")
    return Verdict(True, f"{len(records)} records: {ok}")


def categories_valid(records: list[dict], names: set[str], lo: int, hi: int, min_keep: int) -> Verdict:
    """Candidates in range, each the display name of one of `names` (the category file's), kept ones distinct."""
    known = {display_name(n) for n in names}

    def problem(r):
        if not lo <= len(r["candidates"]) <= hi:
            return f"{len(r['candidates'])} candidates, outside {lo}..{hi}"
        unknown = [c for c in r["candidates"] if c not in known]
        if unknown:
            return f"unknown category {unknown[0]!r}"
        if len(set(r["categories"])) != len(r["categories"]) or len(r["categories"]) < min_keep:
            return f"kept {r['categories']} (need >= {min_keep} distinct)"
        if not set(r["categories"]) <= set(r["candidates"]):
            return "kept a category that was not a candidate"
        return None

    return _first(records, problem, f"{lo}..{hi} known candidates, >= {min_keep} distinct kept")


def captions_mention_categories(records: list[dict]) -> Verdict:
    def problem(r):
        missing = missing_phrases(r["caption"], [phrase(c) for c in r["categories"]])
        return f"caption lacks {missing[0]!r}" if missing else None

    return _first(records, problem, "every caption names every kept category")


def images_have_size(records: list[dict], size: int, open_image) -> Verdict:
    def problem(r):
        image = open_image(r["image"])
        return None if image.size == (size, size) else f"image is {image.size}, expected {(size, size)}"

    return _first(records, problem, f"every target image is {size}x{size}")


def box_area_filter(records: list[dict], min_area: float, min_subjects: int) -> Verdict:
    def problem(r):
        if len(r["subjects"]) < min_subjects:
            return f"{len(r['subjects'])} subjects, fewer than {min_subjects}"
        boxes = [tuple(s["box"]) for s in r["subjects"]]
        if len(set(boxes)) != len(boxes):
            return "two subjects share a box"
        if len({s["category"] for s in r["subjects"]}) != len(boxes):
            return "a category has more than one box"
        for s in r["subjects"]:
            x1, y1, x2, y2 = s["box"]
            if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1) or box_area(s["box"]) < min_area:
                return f"{s['category']}: box {s['box']} (area {box_area(s['box']):.4f}) fails the {min_area} filter"
        return None

    return _first(records, problem, f"every box inside the image with area >= {min_area}, one per category")


def verified_above_threshold(records: list[dict], threshold: float, min_subjects: int) -> Verdict:
    def problem(r):
        if len(r["subjects"]) < min_subjects:
            return f"{len(r['subjects'])} verified subjects, fewer than {min_subjects}"
        low = [s for s in r["subjects"] if not s["p_yes"] > threshold]
        if low:
            return f"{low[0]['category']}: P(yes) {low[0]['p_yes']} <= {threshold} but kept"
        high = [s for s in r["rejected"] if s["p_yes"] > threshold]
        return f"{high[0]['category']}: P(yes) {high[0]['p_yes']} > {threshold} but rejected" if high else None

    return _first(records, problem, f"kept iff P(yes) > {threshold}")


def references_not_copies(records: list[dict], open_image, min_change: float = 1.0) -> Verdict:
    """Every subject has a readable reference that differs from its target crop (mean absolute pixel difference
    above `min_change` of 255): the I2I model changed it."""
    def problem(r):
        for s in r["subjects"]:
            ref = np.asarray(open_image(s["reference"]), dtype=np.float64)
            src = np.asarray(open_image(s["crop"]), dtype=np.float64)
            if ref.shape != src.shape:
                return f"{s['category']}: reference {ref.shape} and crop {src.shape} differ in size"
            change = float(np.abs(ref - src).mean())
            if change <= min_change:
                return f"{s['category']}: reference is a copy of its crop (mean change {change:.2f})"
        return None

    return _first(records, problem, "every subject has a reference that is not a copy of its crop")


def regions_valid(records: list[dict], open_image) -> Verdict:
    """Every subject has a mask file and a region; the mask is chosen exactly when Sim_mask > Sim_unmask (and the
    mask is not empty)."""
    def problem(r):
        for s in r["subjects"]:
            mask = np.asarray(open_image(s["mask"]))[..., 0] > 127
            want = "mask" if mask.any() and s["sim_mask"] > s["sim_unmask"] else "box"
            if s["region"] != want:
                return f"{s['category']}: region {s['region']} but Sim_mask {s['sim_mask']} vs {s['sim_unmask']}"
        return None

    return _first(records, problem, "every subject has a region, mask iff Sim_mask > Sim_unmask")


def every_subject_owns_a_cell(records: list[dict], grid: int) -> Verdict:
    def problem(r):
        layout = np.asarray(r["layout"])
        n = len(r["subjects"])
        if layout.shape != (grid, grid):
            return f"layout shape {layout.shape}, expected {(grid, grid)}"
        if layout.min() < 0 or layout.max() > n:
            return f"layout holds ids outside 0..{n}"
        empty = [i for i in range(1, n + 1) if not (layout == i).any()]
        return f"subject {empty[0]} owns no cell" if empty else None

    return _first(records, problem, f"every subject owns >= 1 cell of the {grid}x{grid} grid")


def annotation_tags_valid(records: list[dict], words: int) -> Verdict:
    """Every tag names a subject, the instruction tags each, and the CoT is its schema's: one sentence per subject
    of at most `words` (`data.cot_words_per_subject`) words."""
    def problem(r):
        n = len(r["subjects"])
        for key in ("instruction", "cot"):
            bad = [i for i in tags_in(r[key]) if not 1 <= i <= n]
            if bad:
                return f"{key} tags [{bad[0]}] of {n} subjects"
        absent = sorted(set(range(1, n + 1)) - set(tags_in(r["instruction"])))
        if absent:
            return f"instruction never refers to [{absent[0]}]"
        if not re.fullmatch(cot_pattern(n, words), r["cot"]):
            return f"cot is not one sentence per subject of at most {words} words"
        return None

    return _first(records, problem, f"instructions tag every subject; all tags name a subject; CoT <= {words} "
                                    "words per subject")


def decimation_consistent(records: list[dict], sources: list[dict], floor: int) -> Verdict:
    """Each source sample with N subjects gave exactly the counts N..floor; in every sample the ids are 1..k,
    every tag and layout id names a kept subject, the instruction tags each of them and each owns a cell."""
    by_source: dict[str, list[dict]] = {}
    for r in records:
        by_source.setdefault(r["parent_ids"][0], []).append(r)
    for source in sources:
        n = len(source["subjects"])
        got = sorted(r["num_subjects"] for r in by_source.get(source["sample_id"], []))
        want = list(range(floor, n + 1))
        if got != want:
            return Verdict(False, f"{source['sample_id']}: subject counts {got}, expected {want}")

    def problem(r):
        k = r["num_subjects"]
        if [s["id"] for s in r["subjects"]] != list(range(1, k + 1)):
            return f"ids {[s['id'] for s in r['subjects']]} are not 1..{k}"
        for key in ("instruction", "cot"):
            bad = [i for i in tags_in(r[key]) if not 1 <= i <= k]
            if bad:
                return f"{key} tags [{bad[0]}] of {k} subjects"
        if sorted(set(tags_in(r["instruction"]))) != list(range(1, k + 1)):
            return f"instruction tags {sorted(set(tags_in(r['instruction'])))}, expected 1..{k}"
        layout = np.asarray(r["layout"])
        if layout.max() > k or any(not (layout == i).any() for i in range(1, k + 1)):
            return "layout ids do not match the kept subjects"
        return None

    return _first(records, problem, "decimated ids consistent across subjects, instruction, CoT and layout")

