"""The procedural world: a second data source with known ground truth, in the training-sample format.

Random tiny foundation models draw noise, so nothing can be learned from the tiny zoo's data; here the method can
be shown to learn. A sample has 2..4 subjects; each subject is a shape (its category: circle, square, triangle)
with an identity (a colour and a texture: plain or striped), placed in one of nine named regions at one of two
sizes, on a noisy grey background. Ground truth follows from the placement:

- instruction: `place [1] small at the top left, [2] large at the center.` (subjects by id tag, `decimation.tag`);
- CoT: `[1] is a red circle at the top left. [2] is an orange ...` (subjects in reading order of position);
- layout: `layout.grid_layout` of the subjects' cell-aligned boxes (so each subject owns exactly its box's cells);
- references: each subject redrawn recoloured (per-channel jitter), rescaled, rotated, on its own background, so a
  reference is never a pixel copy of the target (the paper's guard against copy-paste learning).

Sample `i` of seed `s` depends only on `(s, i)`: the same seed gives the same samples and the same shard bytes.
`procedural_samples` gives `model.Sample`s in memory (tests); `write_procedural_shard` writes the same samples as a
shard with `storage.ShardWriter` in the training-sample record format, read back by `training.collect_samples`
like any data shard. numpy + PIL only.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from music_dagster.errors import UserError
from music_dagster.model.layout import grid_layout, layout_to_text
from music_dagster.synthesis.decimation import decimate, tag

SOURCE = "procedural"
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SIZES = {"small": 2, "large": 3}  # side in grid cells (of an 8x8 grid; scaled for other grids)
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 40), "blue": (40, 70, 220), "yellow": (230, 210, 30),
    "purple": (150, 50, 200), "pink": (240, 120, 190), "orange": (245, 130, 20), "brown": (120, 70, 30),
}
TEXTURES = ("plain", "striped")
BACKGROUND = 200.0


class ProceduralError(UserError):
    """Procedural world settings that cannot make a sample."""


@dataclass(frozen=True)
class WorldSettings:
    """Size of the images, the layout grid and the subject-count range."""

    image_size: int = 64
    grid: int = 8
    min_subjects: int = 2
    max_subjects: int = 4

    def __post_init__(self):
        if self.grid < 4 or self.image_size < self.grid or self.image_size % self.grid:
            raise ProceduralError(f"image_size {self.image_size} must be a multiple of grid {self.grid} (>= 4)")
        if not 1 <= self.min_subjects <= self.max_subjects <= len(REGIONS):
            raise ProceduralError(
                f"subject range {self.min_subjects}..{self.max_subjects} must lie in 1..{len(REGIONS)}")

    @classmethod
    def from_config(cls, config) -> "WorldSettings":
        """The world a `Config` describes (`train.procedural_*` and `data.grid`)."""
        train = config.profile.train
        return cls(image_size=train.procedural_image_size, grid=config.profile.data.grid,
                   min_subjects=train.procedural_min_subjects, max_subjects=train.procedural_max_subjects)


def _shape_patch(px: int, shape: str, rgb, texture: str) -> tuple[np.ndarray, np.ndarray]:
    """(colour [px, px, 3] float, mask [px, px] bool) of one textured shape filling a px x px square."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(mask)
    e = max(1, px // 16)
    if shape == "circle":
        draw.ellipse([e, e, px - 1 - e, px - 1 - e], fill=255)
    elif shape == "square":
        draw.rectangle([e, e, px - 1 - e, px - 1 - e], fill=255)
    else:
        draw.polygon([(px / 2, e), (e, px - 1 - e), (px - 1 - e, px - 1 - e)], fill=255)
    colour = np.ones((px, px, 3), np.float32) * np.asarray(rgb, np.float32)
    yy = np.arange(px)[:, None]
    period = max(2, px // 6)
    if texture == "striped":
        colour[np.broadcast_to((yy // period) % 2 == 1, (px, px))] *= 0.45
    return colour, np.asarray(mask) > 127


def _placement(region: int, side: int, grid: int) -> tuple[int, int]:
    """Top-left cell (row, col) of a side x side box in a named region."""
    row, col = divmod(region, 3)
    starts = (0, (grid - side) // 2, grid - side)
    return starts[row], starts[col]


def _reference(rng: np.random.Generator, size: int, shape: str, rgb, texture: str):
    """The subject redrawn: recoloured, rescaled, rotated, centred on its own background."""
    from PIL import Image

    px = int(rng.integers(int(size * 0.56), int(size * 0.78) + 1))
    jitter = rng.uniform(-25, 25, 3)
    colour, mask = _shape_patch(px, shape, np.clip(np.asarray(rgb) + jitter, 0, 255), texture)
    ref = np.full((size, size, 3), BACKGROUND + rng.uniform(-20, 20), np.float32)
    o = (size - px) // 2
    ref[o:o + px, o:o + px][mask] = colour[mask]
    fill = tuple(int(v) for v in ref[0, 0])
    image = Image.fromarray(ref.clip(0, 255).astype(np.uint8))
    return image.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR, fillcolor=fill)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_sample(seed: int, index: int, world: WorldSettings = WorldSettings()) -> dict:
    """Sample `index` of the world of `seed`: the record fields plus PIL images under `target` and each
    subject's `reference`, and each subject's `attributes` (colour, texture, region, size)."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    g, size = world.grid, world.image_size
    cell = size // g
    n = int(rng.integers(world.min_subjects, world.max_subjects + 1))
    looks = [(s, c) for s in SHAPES for c in COLOURS]
    picks = rng.choice(len(looks), n, replace=False)
    # Regions and sizes: redraw until no two boxes overlap (each subject owns exactly its own cells).
    scale = g / 8
    while True:
        regions = rng.choice(len(REGIONS), n, replace=False)
        sizes = [list(SIZES)[int(k)] for k in rng.integers(0, len(SIZES), n)]
        occupied = np.zeros((g, g), np.int64)
        for i in range(n):
            side = max(1, round(SIZES[sizes[i]] * scale))
            r0, c0 = _placement(int(regions[i]), side, g)
            occupied[r0:r0 + side, c0:c0 + side] += 1
        if occupied.max() <= 1:
            break
    image = BACKGROUND + rng.normal(0, 6, (size, size, 3)).astype(np.float32)
    subjects = []
    for i in range(n):
        shape, colour = looks[int(picks[i])]
        texture = TEXTURES[int(rng.integers(0, len(TEXTURES)))]
        side = max(1, round(SIZES[sizes[i]] * scale))
        r0, c0 = _placement(int(regions[i]), side, g)
        patch, mask = _shape_patch(side * cell, shape, COLOURS[colour], texture)
        area = image[r0 * cell:(r0 + side) * cell, c0 * cell:(c0 + side) * cell]
        area[mask] = patch[mask]
        subjects.append({
            "id": i + 1, "category": shape,
            "box": [c0 / g, r0 / g, (c0 + side) / g, (r0 + side) / g],
            "reference": _reference(rng, size, shape, COLOURS[colour], texture),
            "attributes": {"colour": colour, "texture": texture, "region": REGIONS[int(regions[i])],
                           "size": sizes[i], "row": r0, "col": c0},
        })
    layout = grid_layout([s["box"] for s in subjects], grid=g)
    instruction = "place " + ", ".join(
        f"{tag(s['id'])} {s['attributes']['size']} at the {s['attributes']['region']}" for s in subjects) + "."
    reading = sorted(subjects, key=lambda s: (s["attributes"]["row"], s["attributes"]["col"]))
    cot = " ".join(f"{tag(s['id'])} is {_article(s['attributes']['colour'])} {s['attributes']['colour']} "
                   f"{s['category']} at the {s['attributes']['region']}." for s in reading)
    caption = ", ".join(f"{_article(s['attributes']['colour'])} {s['attributes']['colour']} {s['category']}"
                        for s in subjects) + " on a grey background"
    return {
        "sample_id": f"{SOURCE}-{seed}-{index:06d}", "instruction": instruction, "cot": cot, "caption": caption,
        "layout": layout.tolist(), "subjects": subjects,
        "target": Image.fromarray(image.clip(0, 255).astype(np.uint8)),
    }


def to_sample(raw: dict, source_subjects: int | None = None):
    """A `make_sample` dict as a `model.Sample` (each subject's attributes kept in `meta`, and `source_subjects`:
    how many subjects the world sample had before decimation)."""
    from music_dagster.model.music import Sample

    return Sample(
        instruction=raw["instruction"], references=[s["reference"] for s in raw["subjects"]], cot=raw["cot"],
        layout=np.asarray(raw["layout"], np.int64), target=raw["target"], id=raw["sample_id"],
        meta={"subjects": [{"id": s["id"], "category": s["category"], **s["attributes"]} for s in raw["subjects"]],
              "source": SOURCE, "source_subjects": source_subjects or len(raw["subjects"])},
    )


def procedural_samples(n: int, seed: int, world: WorldSettings = WorldSettings(), start: int = 0,
                       decimated: bool = False) -> list:
    """Samples `start .. start + n - 1` of the world of `seed`, as `model.Sample`s (in memory). `decimated`: each
    followed by its decimations down to `world.min_subjects` subjects (`decimation.decimate`, the paper's
    augmentation: a removed subject stays in the image and is named by its shape), with ids `<id>-n<count>`."""
    out = []
    for i in range(start, start + n):
        raw = make_sample(seed, i, world)
        if not decimated:
            out.append(to_sample(raw))
            continue
        full = len(raw["subjects"])
        for item in decimate(raw, min(world.min_subjects, full)):
            count = len(item["subjects"])
            suffix = "" if count == full else f"-n{count:02d}"
            out.append(to_sample({**item, "sample_id": raw["sample_id"] + suffix}, source_subjects=full))
    return out


def write_procedural_shard(path: str | os.PathLike, n: int, seed: int, world: WorldSettings = WorldSettings(),
                           start: int = 0, split: str = "train") -> Path:
    """Write samples `start .. start + n - 1` of the world of `seed` as the shard `path` = `<root>/<asset>/<key>`
    (atomic, through `storage.ShardWriter`), with the `training_samples` record schema: image references are
    datasets-relative (`<asset>/<key>/<file>`), as the data assets write them. Returns the shard path."""
    from PIL import Image

    from music_dagster.storage import ShardWriter
    from music_dagster.synthesis.schemas import RECORDS

    if n < 1:
        raise ProceduralError(f"a procedural shard needs at least one sample, got {n}")
    path = Path(path).absolute()
    prefix = f"{path.parent.name}/{path.name}/"
    with ShardWriter(path, RECORDS["training_samples"]) as writer:
        for i in range(start, start + n):
            raw = make_sample(seed, i, world)
            sid = raw["sample_id"]
            size = world.image_size
            subjects = []
            for s in raw["subjects"]:
                x1, y1, x2, y2 = (round(v * size) for v in s["box"])
                mask = Image.new("L", (size, size), 0)
                mask.paste(255, (x1, y1, x2, y2))
                subjects.append({
                    "id": s["id"], "category": s["category"], "box": s["box"], "region": "mask",
                    "reference": prefix + writer.add_image(f"{sid}/reference_{s['id']}.png", s["reference"]),
                    "mask": prefix + writer.add_image(f"{sid}/mask_{s['id']}.png", mask),
                })
            writer.add_record({
                "sample_id": sid, "parent_ids": [], "shard": path.name, "split": split,
                "num_subjects": len(subjects), "source_subjects": len(subjects),
                "image": prefix + writer.add_image(f"{sid}/target.png", raw["target"]),
                "caption": raw["caption"], "scene": "procedural world", "instruction": raw["instruction"],
                "cot": raw["cot"], "layout": raw["layout"], "layout_text": layout_to_text(np.asarray(raw["layout"])),
                "subjects": subjects,
            })
    return path


_SAID = re.compile(r"\[(\d+)\] is an? (\w+) (\w+)")


def stated_looks(cot: str) -> dict[int, tuple[str, str]]:
    """{subject id: (colour, shape)} as a procedural CoT states them (the first statement of an id counts)."""
    return {int(i): (c, s) for i, c, s in reversed(_SAID.findall(cot))}


def score_plans(samples: Sequence, plans: Sequence) -> dict:
    """How well plans (`model.Plan`s, one per procedural `Sample`) match the ground truth (the sample's layout
    and CoT): `parsed` (share of layouts that parse), `cell_acc` (all cells), `subject_cell_acc` (cells owned by
    a subject in the truth), `colour_acc` and `shape_acc` (per subject as the CoT states them: colour and shape
    can only come from the reference images)."""
    parsed = cells = subject_hits = subject_cells = colours = shapes = subjects = 0
    for sample, plan in zip(samples, plans, strict=True):
        truth = np.asarray(sample.layout)
        if plan.layout is not None and plan.layout.shape == truth.shape:
            parsed += 1
            cells += float((plan.layout == truth).mean())
            subject_hits += int((plan.layout == truth)[truth > 0].sum())
        subject_cells += int((truth > 0).sum())
        said = stated_looks(plan.cot)
        for sid, (colour, shape) in stated_looks(sample.cot).items():
            got = said.get(sid, ("", ""))
            colours += got[0] == colour
            shapes += got[1] == shape
            subjects += 1
    n = len(samples)
    return {"parsed": parsed / n, "cell_acc": cells / n, "subject_cell_acc": subject_hits / subject_cells,
            "colour_acc": colours / subjects, "shape_acc": shapes / subjects}
