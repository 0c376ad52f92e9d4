"""What a person wants to see of a shard in the UI: a contact sheet per stage and a few samples as a table."""
from __future__ import annotations

from collections import Counter

from music_dagster.model.layout import render_overlay
from music_dagster.synthesis.common import draw_numbered_boxes, image_grid

MAX_PREVIEW = 8


def sheet(asset: str, records: list[dict], open_image):
    """The stage's contact sheet (PIL image), or None for text-only stages or an empty shard."""
    records = records[:MAX_PREVIEW]
    if not records or "image" not in records[0]:
        return None
    if asset == "target_images":
        images = [open_image(r["image"]) for r in records]
    elif asset in ("detected_boxes", "verified_boxes", "cot_annotations"):
        images = [draw_numbered_boxes(open_image(r["image"]), [s["box"] for s in r["subjects"]],
                                      [s["category"] for s in r["subjects"]]) for r in records]
    elif asset == "reference_subjects":  # crop, then its reference, subject by subject
        images = [open_image(s[k]) for r in records for s in r["subjects"] for k in ("crop", "reference")]
        images = images[: 2 * MAX_PREVIEW]
    elif asset == "subject_masks":
        images = [open_image(s["mask"]) for r in records for s in r["subjects"]][: 2 * MAX_PREVIEW]
    else:  # grid_layouts, training_samples: the layout over the target image
        images = [render_overlay(open_image(r["image"]), r["layout"], [s["category"] for s in r["subjects"]])
                  for r in records]
    return image_grid(images, columns=4, cell=128)


def subject_counts(records: list[dict]) -> dict[int, int]:
    """Number of samples per subject count (records with a `subjects` list)."""
    return dict(sorted(Counter(len(r["subjects"]) for r in records if "subjects" in r).items()))


def _cell(text) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def sample_table(records: list[dict], columns: tuple[str, ...]) -> str:
    """A markdown table of the first samples' `columns` (lists joined with commas)."""
    rows = ["| sample | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for r in records[:MAX_PREVIEW]:
        values = [", ".join(map(str, r[c])) if isinstance(r.get(c), list) else r.get(c, "") for c in columns]
        rows.append(f"| {r['sample_id']} | " + " | ".join(_cell(v) for v in values) + " |")
    return "\n".join(rows)


def drop_table(dropped: list[dict]) -> str:
    """A markdown table of the first dropped samples with their reasons."""
    rows = ["| sample | reason | detail |", "| --- | --- | --- |"]
    rows += [f"| {d['sample_id']} | {d['reason']} | {_cell(d['detail'])} |" for d in dropped[:MAX_PREVIEW]]
    if len(dropped) > MAX_PREVIEW:
        rows.append(f"| ... | {len(dropped) - MAX_PREVIEW} more | see dropped.json |")
    return "\n".join(rows)
