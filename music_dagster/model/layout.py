"""The semantic grid layout of MUSIC (DESIGN "grid_layouts"): which subject owns which cell of a grid x grid plan.

For subject i with region r_i (a normalised box or a boolean mask) and patch p of the target image:
- IoU(r_i, p): boxes use exact geometric IoU in normalised coordinates; masks use pixel IoU against the patch's pixel
  rectangle (patch edges at `k * H // grid`, `k * W // grid`).
- tau_i = lam * mean over the grid*grid patches of IoU(r_i, p); p is a candidate for i when IoU(r_i, p) > tau_i.
- A patch with several candidates goes to the highest IoU; ties go to the smaller region (normalised area), then to
  the lower id. A patch without candidates is background (0).
- Every subject keeps at least one cell ("its best patch"): after the assignment above, each subject left without a
  cell, smallest region first, takes its best patch, i.e. the first one in its preference order (highest IoU, then
  patch centre nearest the region's centre, then row-major). A patch that is the only cell of its current owner is
  skipped (the next preferred patch is taken instead), so no rescue ever empties another subject. With at most
  grid*grid subjects there is always such a patch, hence every subject owns >= 1 cell.

Subject ids are 1-based in input order. IoUs are rounded to 12 decimals so that geometrically equal overlaps compare
as ties whatever their float rounding (this keeps the result independent of input order).

Text form (what the model reads and writes): `layout: ` then `grid` space-separated rows of `grid` characters, one
lowercase hex digit per cell (`0` background, `1`-`9`, `a`=10 ... `f`=15), e.g. `layout: 00110000 00110000 ...`.
Ids up to 15 fit one character, which covers the paper's 12 subjects.

Pure numpy + PIL: no Dagster, no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from music_dagster.errors import UserError

TEXT_PREFIX = "layout:"
MAX_TEXT_ID = 15
_HEX = "0123456789abcdef"
_ROW = re.compile(r"^[0-9a-fA-F]+$")
# A fixed palette (matplotlib's tab20 order) so previews of the same layout look the same.
_PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
)


class LayoutError(UserError):
    """A region, grid or layout text that cannot be used; the message is one line naming it."""


@dataclass(frozen=True)
class LayoutResult:
    """A layout with the quantities it was derived from (for asset checks and metadata)."""

    grid: np.ndarray  # [grid, grid] int64, 0 = background, i = subject i (1-based, input order)
    ious: np.ndarray  # [N, grid, grid] float64, IoU(r_i, p)
    tau: np.ndarray  # [N] float64, lam * mean_p IoU(r_i, p)
    areas: np.ndarray  # [N] float64, normalised region areas (the tie-breaker)
    rescued: tuple[tuple[int, int, int], ...]  # (subject id, row, col) cells given by the keep-one-cell rule


def _box(region, index: int) -> np.ndarray:
    box = np.asarray(region, dtype=np.float64)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise LayoutError(f"region {index + 1}: a box must be 4 finite numbers (x1, y1, x2, y2), got {region!r}")
    x1, y1, x2, y2 = box
    if min(x1, y1) < 0 or max(x2, y2) > 1 or x2 <= x1 or y2 <= y1:
        raise LayoutError(f"region {index + 1}: box {tuple(box.tolist())} is not 0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1")
    return box


def _is_mask(region) -> bool:
    return isinstance(region, np.ndarray) and region.ndim == 2


def _box_ious(box: np.ndarray, grid: int):
    edges = np.arange(grid + 1, dtype=np.float64) / grid
    x1, y1, x2, y2 = box
    ox = np.clip(np.minimum(x2, edges[1:]) - np.maximum(x1, edges[:-1]), 0.0, None)
    oy = np.clip(np.minimum(y2, edges[1:]) - np.maximum(y1, edges[:-1]), 0.0, None)
    inter = oy[:, None] * ox[None, :]
    area = (x2 - x1) * (y2 - y1)
    iou = inter / (area + 1.0 / grid**2 - inter)
    return iou, area, ((x1 + x2) / 2, (y1 + y2) / 2)


def _mask_ious(mask: np.ndarray, grid: int, index: int):
    if mask.dtype != bool:
        raise LayoutError(f"region {index + 1}: a mask must be a boolean array, got dtype {mask.dtype}")
    h, w = mask.shape
    if h < grid or w < grid:
        raise LayoutError(f"region {index + 1}: mask {h}x{w} is smaller than the {grid}x{grid} grid")
    total = int(mask.sum())
    if total == 0:
        raise LayoutError(f"region {index + 1}: mask is empty")
    ye = np.arange(grid + 1) * h // grid
    xe = np.arange(grid + 1) * w // grid
    inter = np.add.reduceat(np.add.reduceat(mask.astype(np.int64), ye[:-1], axis=0), xe[:-1], axis=1)
    patch = np.diff(ye)[:, None] * np.diff(xe)[None, :]
    iou = inter / (total + patch - inter)
    ys, xs = np.nonzero(mask)
    # Centroid in normalised coordinates, pixel centres at (k + 0.5) / size.
    return iou, total / (h * w), ((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h)


def compute_layout(regions: Sequence, grid: int = 8, lam: float = 0.05) -> LayoutResult:
    """The layout of `regions` (boxes `(x1, y1, x2, y2)` normalised, or boolean HxW masks; mixed allowed)."""
    if not isinstance(grid, (int, np.integer)) or grid < 1:
        raise LayoutError(f"grid must be a positive integer, got {grid!r}")
    if not np.isfinite(lam) or not 0 <= lam < 1:
        raise LayoutError(f"lam must be in [0, 1), got {lam!r}")
    regions = list(regions)
    if not regions:
        raise LayoutError("no regions: a layout needs at least one subject")
    if len(regions) > grid * grid:
        raise LayoutError(f"{len(regions)} subjects cannot each own a cell of a {grid}x{grid} grid")
    n = len(regions)
    ious = np.empty((n, grid, grid))
    areas = np.empty(n)
    centres = np.empty((n, 2))
    for i, region in enumerate(regions):
        iou, area, centre = _mask_ious(region, grid, i) if _is_mask(region) else _box_ious(_box(region, i), grid)
        ious[i], areas[i], centres[i] = iou, area, centre
    ious = np.round(ious, 12)
    tau = lam * ious.reshape(n, -1).mean(axis=1)

    flat = ious.reshape(n, -1)
    candidate = flat > tau[:, None]
    # Rank subjects per patch: highest IoU, then smaller area, then lower id (lexsort: last key is primary).
    order = np.lexsort((np.arange(n), areas))  # subjects by (area, id)
    rank_in_size = np.empty(n, dtype=np.int64)
    rank_in_size[order] = np.arange(n)
    score = np.where(candidate, flat, -1.0)
    owner = np.zeros(grid * grid, dtype=np.int64)
    for p in range(grid * grid):
        best = max(range(n), key=lambda i: (score[i, p], -rank_in_size[i]))
        if candidate[best, p]:
            owner[p] = best + 1

    # Keep-one-cell rule: preference per subject = highest IoU, nearest patch centre, row-major.
    pc = (np.arange(grid) + 0.5) / grid
    px, py = np.meshgrid(pc, pc)
    counts = np.bincount(owner, minlength=n + 1)
    rescued = []
    for i in order:
        if counts[i + 1]:
            continue
        dist = np.round((px.ravel() - centres[i, 0]) ** 2 + (py.ravel() - centres[i, 1]) ** 2, 12)
        for p in np.lexsort((np.arange(grid * grid), dist, -flat[i])):
            prev = owner[p]
            if prev and counts[prev] == 1:
                continue
            counts[prev] -= 1
            owner[p] = i + 1
            counts[i + 1] = 1
            rescued.append((int(i + 1), int(p // grid), int(p % grid)))
            break
    return LayoutResult(owner.reshape(grid, grid), ious, tau, areas, tuple(rescued))


def grid_layout(regions: Sequence, grid: int = 8, lam: float = 0.05) -> np.ndarray:
    """A `grid x grid` int array of subject ids (1-based, input order; 0 = background). See the module docstring."""
    return compute_layout(regions, grid, lam).grid


def layout_to_text(grid: np.ndarray) -> str:
    """`layout: 00110000 00110000 ...` (one hex digit per cell, rows separated by spaces)."""
    arr = np.asarray(grid)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.size == 0:
        raise LayoutError(f"a layout must be a non-empty square grid, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > MAX_TEXT_ID:
        raise LayoutError(f"layout cells must be integers in 0..{MAX_TEXT_ID}")
    return TEXT_PREFIX + " " + " ".join("".join(_HEX[v] for v in row) for row in arr.tolist())


def layout_from_text(text: str, grid: int | None = None) -> np.ndarray:
    """Parse `layout_to_text`'s form (the `layout:` prefix is optional); `grid` checks the size when given."""
    body = text.strip()
    if body.lower().startswith(TEXT_PREFIX):
        body = body[len(TEXT_PREFIX):]
    rows = body.split()
    size = len(rows)
    if size == 0 or any(len(r) != size or not _ROW.match(r) for r in rows):
        raise LayoutError(f"not a layout: expected {TEXT_PREFIX} followed by N rows of N hex digits, got {text[:80]!r}")
    if grid is not None and size != grid:
        raise LayoutError(f"layout is {size}x{size}, expected {grid}x{grid}")
    return np.array([[int(c, 16) for c in r] for r in rows], dtype=np.int64)


def render_overlay(image, grid: np.ndarray, labels: Sequence[str] = (), alpha: int = 110):
    """The image with each owned cell tinted in its subject's colour and marked with its id; the first cell
    (row-major) of subject i also shows `labels[i - 1]` when given. Returns a new RGB image of the same size."""
    from PIL import Image, ImageDraw, ImageFont

    arr = np.asarray(grid)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise LayoutError(f"a layout must be a square grid, got shape {arr.shape}")
    g = arr.shape[0]
    base = image.convert("RGBA")
    w, h = base.size
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    xe = [k * w // g for k in range(g + 1)]
    ye = [k * h // g for k in range(g + 1)]
    for r in range(g):
        for c in range(g):
            sid = int(arr[r, c])
            if sid:
                draw.rectangle((xe[c], ye[r], xe[c + 1] - 1, ye[r + 1] - 1), fill=(*_PALETTE[(sid - 1) % len(_PALETTE)], alpha))
    out = Image.alpha_composite(base, tint)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(8, min(xe[1] - xe[0], ye[1] - ye[0]) // 2))
    for k in range(1, g):
        draw.line((xe[k], 0, xe[k], h - 1), fill=(255, 255, 255, 90))
        draw.line((0, ye[k], w - 1, ye[k]), fill=(255, 255, 255, 90))
    named = set()
    for r in range(g):
        for c in range(g):
            sid = int(arr[r, c])
            if not sid:
                continue
            text = str(sid)
            if sid not in named and sid <= len(labels):
                text = f"{sid} {labels[sid - 1]}"
                named.add(sid)
            draw.text((xe[c] + 1, ye[r]), text, fill=(255, 255, 255, 255), font=font,
                      stroke_width=1, stroke_fill=(0, 0, 0, 255))
    return out.convert("RGB")
