"""What every data stage shares: shard context and seeds, stage results with their drops, image helpers.

Records are JSON dicts. Images are referenced by their path relative to the datasets root
(`<asset>/<shard>/<file>`), so any stage can open any ancestor's image through one `open_image(ref)` callable.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from music_dagster.config import MAX_SUBJECTS
from music_dagster.interrupts import raise_kept_interrupt
from music_dagster.synthesis import SynthesisError


OpenImage = Callable[[str], "object"]  # datasets-relative ref -> PIL RGB image (raises a UserError when unreadable)


def clip_prompts(pipe, prompts: Sequence[str]) -> list[str]:
    """The prompts as FLUX's CLIP encoder reads them: cut to its 77-token window here, on purpose, so that
    diffusers has no truncation to warn about on every call. FLUX's T5 reads the whole prompt (`prompt_2`)."""
    tokenizer, limit = pipe.tokenizer, pipe.tokenizer_max_length
    cut = []
    for prompt in prompts:
        text, ids, keep = prompt, tokenizer(prompt, verbose=False).input_ids, limit - 2  # 2: start and end tokens
        while len(ids) > limit:  # decoded text can re-encode longer (BPE merges differ): cut until it fits
            text = tokenizer.decode(ids[1:1 + keep], skip_special_tokens=True)
            ids, keep = tokenizer(text, verbose=False).input_ids, keep - 1
        cut.append(text)
    return cut


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (sha256 of their text): stable across runs, processes and machines."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def shard_seed(config_seed: int, shard_key: str) -> int:
    """The seed of one shard: from the config's seed and the shard key only."""
    return derive_seed("shard", config_seed, shard_key)


SHARD_PREFIX = "shard-"
_INDEXED = re.compile(rf"^{SHARD_PREFIX}(\d+)$")


def shard_key(index: int) -> str:
    """The key of the `index`-th registered shard: `shard-00000`, `shard-00001`, ..."""
    return f"{SHARD_PREFIX}{index:05d}"


def shard_index(key: str) -> int | None:
    """The index of a `shard-<i>` key (any number of digits), None for any other key."""
    m = _INDEXED.match(key)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ShardContext:
    """The shard a stage works on: its key, its seed, and the asset whose folder the outputs go to."""

    asset: str
    key: str
    seed: int

    def ref(self, name: str) -> str:
        """The datasets-relative reference of an output file `name` of this shard."""
        return f"{self.asset}/{self.key}/{name}"

    def seed_for(self, *parts) -> int:
        return derive_seed(self.seed, self.asset, *parts)


@dataclass
class StageResult:
    """A stage's output for one shard: kept records, the images they reference (shard-relative name -> PIL
    image), and the dropped samples with their reasons."""

    records: list[dict] = field(default_factory=list)
    images: dict = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)

    def drop(self, record: dict, stage: str, reason: str, detail: str = "") -> None:
        self.dropped.append({"sample_id": record["sample_id"], "parent_ids": list(record.get("parent_ids", [])),
                             "stage": stage, "reason": reason, "detail": detail})

    def reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(d["reason"] for d in self.dropped).items()))


def child(record: dict, **fields) -> dict:
    """A record one stage further: the same sample id, the parent's id as lineage, the parent's fields plus
    `fields` (records carry forward what later stages need)."""
    out = {k: v for k, v in record.items() if k not in ("parent_ids",)}
    out["parent_ids"] = [record["sample_id"]]
    out.update(fields)
    return out


def batches(items: Sequence, size: int) -> Iterator[list]:
    """`items` in batches of `size`, the stages' model calls' unit. Before each, an interrupt kept in the step
    (`interrupts.interrupts_kept`) is raised: a stop that arrived during the last batch ends the stage here."""
    if size < 1:
        raise SynthesisError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        raise_kept_interrupt()
        yield list(items[start:start + size])


def check_subject_range(lo: int, hi: int) -> None:
    """The number of subjects a sample may have: 1 <= lo <= hi <= MAX_SUBJECTS (the paper's bound)."""
    if not (isinstance(lo, int) and isinstance(hi, int)) or not 1 <= lo <= hi <= MAX_SUBJECTS:
        raise SynthesisError(f"subject range {lo}..{hi} is outside 1..{MAX_SUBJECTS} (or empty)")


# ---------------------------------------------------------------------------------------------------------------
# Geometry and image helpers (boxes are normalised (x1, y1, x2, y2) in [0, 1]).
def box_area(box: Sequence[float]) -> float:
    """Normalised area, rounded to 12 decimals so a 0.1 x 0.1 box is 0.01 of the image, not a hair under."""
    x1, y1, x2, y2 = box
    return round(max(0.0, x2 - x1) * max(0.0, y2 - y1), 12)


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel rectangle covering a normalised box (at least one pixel)."""
    x1 = min(width - 1, max(0, int(box[0] * width)))
    y1 = min(height - 1, max(0, int(box[1] * height)))
    x2 = max(x1 + 1, min(width, round(box[2] * width)))
    y2 = max(y1 + 1, min(height, round(box[3] * height)))
    return x1, y1, x2, y2


def crop(image, box: Sequence[float]):
    return image.crop(pixel_box(box, *image.size))


def square(image, size: int, fill=(127, 127, 127)):
    """`image` scaled to fit a `size` x `size` square, centred on a neutral background (aspect kept)."""
    from PIL import Image

    w, h = image.size
    scale = size / max(w, h)
    resized = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, ((size - resized.size[0]) // 2, (size - resized.size[1]) // 2))
    return canvas


_BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255))


def draw_numbered_boxes(image, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None):
    """A copy of `image` with box i drawn and tagged `[i]` (1-based), plus its label when given: what the VLM
    sees when it writes the instruction and CoT, and the preview shows."""
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    font = ImageFont.load_default(size=max(8, min(w, h) // 16))
    for i, box in enumerate(boxes, start=1):
        colour = _BOX_COLOURS[(i - 1) % len(_BOX_COLOURS)]
        x1, y1, x2, y2 = pixel_box(box, w, h)
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=colour, width=max(1, min(w, h) // 128))
        text = f"[{i}]" + (f" {labels[i - 1]}" if labels else "")
        draw.text((x1 + 1, y1), text, fill=colour, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return out


def image_grid(images: Sequence, columns: int = 4, cell: int = 128):
    """A contact sheet of `images` (each fitted into a `cell` square), for previews."""
    from PIL import Image

    images = list(images)
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i, image in enumerate(images):
        sheet.paste(square(image.convert("RGB"), cell, fill=(255, 255, 255)), ((i % columns) * cell, (i // columns) * cell))
    return sheet
