"""Ground-truth image metrics of the procedural world (numpy only): placement, identity, hallucination, plan.

A generated image is read through a *colour map*: each pixel takes the label of its nearest prototype colour, where
the prototypes are the world's background grey and each subject colour at three shades (plain, a striped shape
blurred to its mean, the dark stripe; `procedural._shape_patch` darkens stripes to 0.45). A pixel farther than
`MAX_DISTANCE` from every prototype is "other" (edges, noise). Cells are the layout grid's cells mapped onto the
image at its own resolution, so a 32 px de-tokenizer output is scored against a 64 px world directly.

Per subject (the unit of the summaries; "its box" is the cells the ground-truth layout gives it):
- placement: 1 when the subject's colour is the most frequent subject colour in its box and covers at least
  `MIN_COVER` of the box's pixels, else 0;
- identity: 1 when placement holds and the texture is right: the share of the subject-colour pixels in its box
  that are shaded (mid or dark) is above `STRIPED_SHARE` exactly when the subject is striped;
- hallucination: the share of the background cells (outside every box) that this subject's colour dominates
  (it covers at least `MIN_COVER` of the cell and is the cell's most frequent subject colour); lower is better;
- plan: `cot_colour` / `cot_shape` (the CoT states the subject's colour / shape; `procedural.stated_looks`) and
  `layout_cells` (share of the subject's ground-truth cells the predicted layout gives it; 0 when it does not parse).

`summarise` gives each metric's mean, 95% interval and n, overall and per subject count. The interval is a
percentile bootstrap over *samples* (subjects of one image are not independent), seeded, so it is reproducible.
`across_runs` pools one value per training run with a Student-t interval over runs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from music_dagster.model.procedural import BACKGROUND, COLOURS, stated_looks

COLOUR_NAMES = tuple(COLOURS)
SHADES = (1.0, 0.725, 0.45)  # plain, a stripe pattern averaged, the dark stripe
MAX_DISTANCE = 70.0  # RGB distance beyond which a pixel matches no prototype ("other")
MIN_COVER = 0.15  # share of a box (or cell) the colour must cover to count as there
STRIPED_SHARE = 0.3  # shaded share of a subject's pixels above which it reads as striped
BACKGROUND_LABEL, OTHER_LABEL = 0, -1  # colour labels: 1..8 are COLOUR_NAMES[label - 1]
IMAGE_METRICS = ("placement", "identity", "hallucination")
PLAN_METRICS = ("cot_colour", "cot_shape", "layout_cells")
METRICS = IMAGE_METRICS + PLAN_METRICS
BOOTSTRAP = 1000


def _prototypes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB [P, 3], colour label [P], shade index [P]) of every prototype, the background first."""
    rgb, labels, shades = [np.full(3, BACKGROUND)], [BACKGROUND_LABEL], [0]
    for k, name in enumerate(COLOUR_NAMES, start=1):
        for s, factor in enumerate(SHADES):
            rgb.append(np.asarray(COLOURS[name], np.float64) * factor)
            labels.append(k)
            shades.append(s)
    return np.stack(rgb), np.asarray(labels), np.asarray(shades)


PROTOTYPES, PROTOTYPE_LABELS, PROTOTYPE_SHADES = _prototypes()


def colour_map(image) -> tuple[np.ndarray, np.ndarray]:
    """(label [H, W], shade [H, W]) of an RGB image (PIL or array): label 0 background, 1..8 a subject colour
    (`COLOUR_NAMES[label - 1]`), -1 no prototype within `MAX_DISTANCE`; shade 0 plain, 1 mid, 2 dark."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, np.float64)[..., :3]
    distance = np.linalg.norm(pixels[..., None, :] - PROTOTYPES, axis=-1)
    nearest = distance.argmin(-1)
    labels = np.where(distance.min(-1) <= MAX_DISTANCE, PROTOTYPE_LABELS[nearest], OTHER_LABEL)
    return labels, PROTOTYPE_SHADES[nearest]


def cell_pixels(shape: tuple[int, int], cells: np.ndarray) -> np.ndarray:
    """A boolean [H, W] mask of the pixels of the grid cells marked in `cells` [g, g] (any image size)."""
    h, w = shape
    g_rows, g_cols = cells.shape
    rows = np.minimum(np.arange(h) * g_rows // h, g_rows - 1)
    cols = np.minimum(np.arange(w) * g_cols // w, g_cols - 1)
    return cells[rows[:, None], cols[None, :]]


def _dominant(labels: np.ndarray) -> tuple[int, float]:
    """(the most frequent subject colour label, its share of all the pixels given) of a pixel set; (0, 0) if none."""
    counts = np.bincount(labels[labels > 0], minlength=len(COLOUR_NAMES) + 1)
    if labels.size == 0 or counts.max() == 0:
        return 0, 0.0
    best = int(counts.argmax())
    return best, counts[best] / labels.size


def score_image(image, layout: np.ndarray, subjects: Sequence[dict]) -> list[dict]:
    """Placement, identity and hallucination of each subject in a generated image. `layout`: the ground-truth
    grid of subject ids; `subjects`: each with `id`, `colour` and `texture` (a procedural `Sample.meta`)."""
    labels, shades = colour_map(image)
    layout = np.asarray(layout)
    background = layout == 0
    cell_owner = np.zeros(layout.shape, np.int64)  # per background cell: the dominant subject colour label
    for r, c in zip(*np.nonzero(background)):
        one = np.zeros(layout.shape, bool)
        one[r, c] = True
        label, share = _dominant(labels[cell_pixels(labels.shape, one)])
        cell_owner[r, c] = label if share >= MIN_COVER else 0
    rows = []
    for subject in subjects:
        want = COLOUR_NAMES.index(subject["colour"]) + 1
        box = cell_pixels(labels.shape, layout == subject["id"])
        label, share = _dominant(labels[box])
        placed = label == want and share >= MIN_COVER
        mine = box & (labels == want)
        shaded = float((shades[mine] > 0).mean()) if mine.any() else 0.0
        striped = shaded > STRIPED_SHARE
        rows.append({
            "subject": subject["id"], "placement": float(placed),
            "identity": float(placed and striped == (subject["texture"] == "striped")),
            "hallucination": float((cell_owner[background] == want).mean()) if background.any() else 0.0,
        })
    return rows


def score_plan(cot: str | None, layout: np.ndarray | None, truth_layout: np.ndarray,
               subjects: Sequence[dict], writes_cot: bool = True, writes_layout: bool = True) -> list[dict]:
    """CoT colour and shape and layout-cell accuracy of each subject for one predicted plan (`subjects` carry
    `id`, `colour` and `category`). A plan part the method does not write (an ablation without CoT or without
    layout) gives no value for its metrics; a layout that does not parse scores 0."""
    truth_layout = np.asarray(truth_layout)
    said = stated_looks(cot or "")
    rows = []
    for subject in subjects:
        sid = subject["id"]
        row = {"subject": sid}
        if writes_cot:
            colour, shape = said.get(sid, ("", ""))
            row.update(cot_colour=float(colour == subject["colour"]), cot_shape=float(shape == subject["category"]))
        if writes_layout:
            parsed = layout is not None and np.shape(layout) == truth_layout.shape
            row["layout_cells"] = float((np.asarray(layout)[truth_layout == sid] == sid).mean()) if parsed else 0.0
        rows.append(row)
    return rows


def interval(values_by_sample: Sequence[Sequence[float]], seed: int = 0) -> dict:
    """{"mean", "lo", "hi", "n"} of the pooled values: the mean over every value, a 95% percentile bootstrap
    interval resampling samples (each a list of its subjects' values), n the number of values."""
    groups = [np.asarray(v, np.float64) for v in values_by_sample if len(v)]
    n = int(sum(len(g) for g in groups))
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    sums = np.asarray([g.sum() for g in groups])
    counts = np.asarray([len(g) for g in groups], np.float64)
    pick = np.random.default_rng(seed).integers(0, len(groups), (BOOTSTRAP, len(groups)))
    boot = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(sums.sum() / n), "lo": float(lo), "hi": float(hi), "n": n}


def summarise(rows: Sequence[dict], metrics: Sequence[str] = METRICS) -> dict:
    """Per metric: {"overall": interval, "by_count": {subject count: interval}} of per-subject rows that carry
    `sample` and `count` (the sample's subject count). A metric no row carries is left out."""
    out = {}
    for metric in metrics:
        have = [r for r in rows if r.get(metric) is not None]
        if not have:
            continue

        def by_sample(selected):
            groups: dict[str, list[float]] = {}
            for r in selected:
                groups.setdefault(r["sample"], []).append(r[metric])
            return list(groups.values())

        counts = sorted({r["count"] for r in have})
        out[metric] = {"overall": interval(by_sample(have)),
                       "by_count": {str(c): interval(by_sample([r for r in have if r["count"] == c]))
                                    for c in counts}}
    return out


def paired_gap(a: Sequence[dict], b: Sequence[dict], metric: str, seed: int = 0) -> dict:
    """Mean of a - b over the subjects both rows scored (matched by sample and subject), with a 95% bootstrap
    interval over samples: how far one method is from another on the same held-out prompts."""
    other = {(r["sample"], r["subject"]): r.get(metric) for r in b}
    groups: dict[str, list[float]] = {}
    for r in a:
        theirs = other.get((r["sample"], r["subject"]))
        if r.get(metric) is not None and theirs is not None:
            groups.setdefault(r["sample"], []).append(r[metric] - theirs)
    return interval(list(groups.values()), seed)


def across_runs(values: Sequence[float]) -> dict:
    """{"mean", "lo", "hi", "n"} of one value per training run (world seeds, machines): their mean and a 95% Student-t
    interval over runs. It covers the run-to-run spread, which a run's own bootstrap over prompts does not; one run
    has no interval."""
    from scipy.stats import t

    runs = np.asarray(values, np.float64)
    mean = float(runs.mean())
    if len(runs) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": len(runs)}
    half = float(t.ppf(0.975, len(runs) - 1) * runs.std(ddof=1) / np.sqrt(len(runs)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(runs)}
