"""DreamBench and MSIC: loading the benchmarks and scoring generated images with `metrics`.

DreamBench is read from a folder in google/dreambooth's layout (`<subject>/NN.jpg` and `prompts_and_classes.txt`):
one fixed reference per subject (its first photo), the 25 prompts of its type (object or live subject) with the class
noun. DINO and CLIP-I of a generated image are its mean cosine against every real photo of the subject, CLIP-T is
against the prompt; the "real vs real" row scores the subject's photos against each other (the copy-paste ceiling).

MSIC is the held-out synthetic benchmark (1..12 subjects). Each subject is scored on the region where the detector
finds its category in the generated image (the whole image when it is not found; the found rate is reported),
against its reference; CLIP-T is against the instruction with its id tags replaced by category names.

A generated image that cannot be read is a recorded failure, never the end of a run.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from music_dagster.decimation import TAG
from music_dagster.errors import UserError
from music_dagster.metrics import METRICS, Embedder, Embeddings, cosine, image_scores, mean, text_scores

PROMPTS_FILE = "prompts_and_classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CLASS_LINE = re.compile(r"^([\w.-]+),(.+)$")
_PROMPT = re.compile(r"""['"](.*?)['"]\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")
_OBJECT_HEADING = "object prompts"
_LIVE_HEADING = "live subject prompts"


class BenchmarkError(UserError):
    """A benchmark folder or record that cannot be used: one line naming the file or subject."""


# --------------------------------------------------------------------------------------------------- DreamBench
@dataclass(frozen=True)
class DreamSubject:
    name: str
    class_noun: str
    kind: str  # "object" or "live"
    images: tuple[Path, ...]
    templates: tuple[str, ...]  # DreamBooth's '{0} unique token, {1} class noun' prompt templates

    @property
    def reference(self) -> Path:
        """The one fixed reference image a method is given: the subject's first photo."""
        return self.images[0]

    @property
    def prompts(self) -> tuple[str, ...]:
        """The prompts with the class noun in place of `<unique token> <class>` (what CLIP-T is scored against)."""
        return tuple(self.instruction(i, "") for i in range(len(self.templates)))

    def instruction(self, index: int, tag: str) -> str:
        """Prompt `index` with `tag` (a method's subject reference, e.g. an id tag) in the unique token's place."""
        return " ".join(self.templates[index].format(tag, self.class_noun).split())


@dataclass(frozen=True)
class DreamBench:
    root: Path
    subjects: tuple[DreamSubject, ...]
    unlisted: tuple[str, ...] = ()  # subjects of the prompts file with no folder in this copy

    def subject(self, name: str) -> DreamSubject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise BenchmarkError(f"{self.root}: no DreamBench subject {name!r}")

    @property
    def num_images(self) -> int:
        return sum(len(s.images) for s in self.subjects)

    @property
    def num_prompts(self) -> int:
        return sum(len(s.templates) for s in self.subjects)

    def subset(self, num_subjects: int | None, num_prompts: int | None) -> DreamBench:
        """`num_subjects` subjects evenly spaced over the sorted list (so both types appear), each with its first
        `num_prompts` prompts; None keeps everything."""
        subjects = self.subjects
        if num_subjects is not None and num_subjects < len(subjects):
            subjects = tuple(subjects[i * len(subjects) // num_subjects] for i in range(num_subjects))
        if num_prompts is not None:
            subjects = tuple(
                DreamSubject(s.name, s.class_noun, s.kind, s.images, s.templates[:num_prompts]) for s in subjects
            )
        return DreamBench(self.root, subjects, self.unlisted)


def _parse_prompts_file(path: Path) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """Classes (subject -> class noun) and the object and live-subject prompt templates of a prompts file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    lowered = [line.strip().lower() for line in lines]
    if _OBJECT_HEADING not in lowered or _LIVE_HEADING not in lowered:
        raise BenchmarkError(f"{path}: expected an 'Object Prompts' and a 'Live Subject Prompts' section")
    obj_at, live_at = lowered.index(_OBJECT_HEADING), lowered.index(_LIVE_HEADING)
    classes = {}
    for line in lines[:min(obj_at, live_at)]:
        match = _CLASS_LINE.match(line.strip())
        if match and match.group(1) != "subject_name":
            classes[match.group(1)] = match.group(2).strip()
    if not classes:
        raise BenchmarkError(f"{path}: no 'subject_name,class' lines")
    obj_end = live_at if live_at > obj_at else len(lines)
    live_end = obj_at if obj_at > live_at else len(lines)
    objects = tuple(_PROMPT.findall("\n".join(lines[obj_at:obj_end])))
    live = tuple(_PROMPT.findall("\n".join(lines[live_at:live_end])))
    for heading, found in (("Object Prompts", objects), ("Live Subject Prompts", live)):
        if not found:
            raise BenchmarkError(f"{path}: no prompts under '{heading}'")
    return classes, objects, live


def load_dreambench(root: str | Path, live_classes: Iterable[str] = ("cat", "dog")) -> DreamBench:
    """The DreamBench copy at `root`: every subject folder that the prompts file lists, sorted by name.

    A subject is a live subject when its class noun is one of `live_classes` (DreamBooth's cats and dogs).
    Subjects of the prompts file missing from the folder are skipped (a partial copy) and listed in `unlisted`.
    """
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkError(f"DreamBench folder {root} does not exist (set paths.dreambench)")
    prompts = root / PROMPTS_FILE
    if not prompts.is_file():
        raise BenchmarkError(f"{root}: no {PROMPTS_FILE}")
    classes, objects, live = _parse_prompts_file(prompts)
    live_classes = set(live_classes)
    subjects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in classes:
            raise BenchmarkError(f"{folder}: subject folder not listed in {PROMPTS_FILE}")
        images = tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        if not images:
            raise BenchmarkError(f"{folder}: subject {folder.name!r} has no images")
        noun = classes[folder.name]
        kind = "live" if noun in live_classes else "object"
        subjects.append(DreamSubject(folder.name, noun, kind, images, live if kind == "live" else objects))
    if not subjects:
        raise BenchmarkError(f"{root}: no subject folders")
    present = {s.name for s in subjects}
    return DreamBench(root, tuple(subjects), tuple(sorted(set(classes) - present)))


# ------------------------------------------------------------------------------------------------------ scoring
@dataclass(frozen=True)
class DreamItem:
    """One generated DreamBench image: which subject and prompt it answers, and where it is."""

    key: str
    subject: str
    prompt: str
    path: Path


def _read_all(items: Sequence, failures: list[dict]):
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


def _summary(records: Sequence[dict], extra: Iterable[str] = ()) -> dict:
    out = {m: mean([r[m] for r in records]) for m in METRICS}
    for key in extra:
        out[key] = mean([r[key] for r in records])
    out["n"] = len(records)
    return out


def score_dreambench(bench: DreamBench, items: Sequence[DreamItem], embedder: Embedder) -> dict:
    """Per-image, per-subject and overall DINO / CLIP-I (mean against every real photo) and CLIP-T (prompt)."""
    failures: list[dict] = []
    ok, images = _read_all(items, failures)
    records = []
    if ok:
        generated = embedder.images(images)
        texts = embedder.clip_texts([it.prompt for it in ok])
        clip_t = text_scores(generated, texts)
        for i, item in enumerate(ok):
            refs = embedder.references(bench.subject(item.subject).images)
            row = Embeddings(generated.dino[i:i + 1], generated.clip[i:i + 1])
            scores = image_scores(row, refs)
            records.append({"key": item.key, "subject": item.subject, "prompt": item.prompt,
                            "dino": scores["dino"][0], "clip_i": scores["clip_i"][0], "clip_t": clip_t[i],
                            **embedder.encoders})
    by_subject = defaultdict(list)
    for r in records:
        by_subject[r["subject"]].append(r)
    return {
        "encoders": embedder.encoders,
        "overall": _summary(records),
        "per_subject": {name: _summary(rs) for name, rs in sorted(by_subject.items())},
        "images": records,
        "failures": failures,
    }


def score_real_vs_real(bench: DreamBench, embedder: Embedder) -> dict:
    """DINO and CLIP-I between every ordered pair of distinct real photos of a subject (CLIP-T does not apply)."""
    import torch

    per_subject, pairs = {}, {"dino": [], "clip_i": []}
    for s in bench.subjects:
        refs = embedder.references(s.images)
        n = len(refs)
        if n < 2:
            continue
        off = ~torch.eye(n, dtype=torch.bool)
        values = {"dino": cosine(refs.dino, refs.dino)[off].tolist(), "clip_i": cosine(refs.clip, refs.clip)[off].tolist()}
        per_subject[s.name] = {"dino": mean(values["dino"]), "clip_i": mean(values["clip_i"]), "clip_t": None,
                               "n": len(values["dino"]), **embedder.encoders}
        for m in pairs:
            pairs[m].extend(values[m])
    overall = {"dino": mean(pairs["dino"]), "clip_i": mean(pairs["clip_i"]), "clip_t": None, "n": len(pairs["dino"])}
    return {"encoders": embedder.encoders, "overall": overall, "per_subject": per_subject}


# --------------------------------------------------------------------------------------------------------- MSIC
@dataclass(frozen=True)
class MsicSubject:
    id: int
    category: str
    reference: Path


@dataclass(frozen=True)
class MsicItem:
    """One generated MSIC image: the held-out sample's instruction (with id tags) and subjects, and the image."""

    key: str
    instruction: str
    subjects: tuple[MsicSubject, ...]
    path: Path

    @property
    def text(self) -> str:
        """The instruction with each id tag replaced by its subject's category name (what CLIP-T is scored against)."""
        names = {s.id: s.category for s in self.subjects}
        return " ".join(TAG.sub(lambda m: names.get(int(m.group(1)), m.group(0)), self.instruction).split())


def locate_categories(detector, image, categories: Sequence[str], box_threshold: float, text_threshold: float
                      ) -> list[tuple[float, float, float, float] | None]:
    """For each category, the pixel box (x1, y1, x2, y2) where the detector finds it best in `image`, or None.

    One GroundingDINO pass with every category in the text query ("cat. remote control."). A query's score for a
    category is its highest token probability over that category's tokens; the best query for the category must
    clear `box_threshold` on its overall score (GroundingDINO's box score) and `text_threshold` on the category.
    """
    import torch

    names = [c.strip().lower() for c in categories]
    text, spans = "", []
    for name in names:
        spans.append((len(text), len(text) + len(name)))
        text += name + ". "
    text = text.rstrip()
    # Tokenized here, not by the processor, so that the offsets are those of the ids the model sees.
    text_inputs = detector.processor.tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    offsets = text_inputs.pop("offset_mapping")[0].tolist()
    inputs = {**detector.processor.image_processor(images=image, return_tensors="pt"), **text_inputs}
    with torch.inference_mode():
        out = detector.model(**{k: v.to(detector.device, detector.dtype) if v.is_floating_point() else
                                v.to(detector.device) for k, v in inputs.items()})
    probs = out.logits[0].float().sigmoid()  # (queries, text positions)
    box_scores = probs.max(dim=-1).values
    boxes = out.pred_boxes[0].float()  # normalised (cx, cy, w, h)
    width, height = image.size
    found = []
    for start, end in spans:
        tokens = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        score = probs[:, tokens].max(dim=-1).values
        score = torch.where(box_scores > box_threshold, score, torch.full_like(score, -1.0))
        best = int(score.argmax())
        if float(score[best]) <= text_threshold:
            found.append(None)
            continue
        cx, cy, w, h = boxes[best].tolist()
        x1, x2 = sorted((max(0.0, (cx - w / 2) * width), min(float(width), (cx + w / 2) * width)))
        y1, y2 = sorted((max(0.0, (cy - h / 2) * height), min(float(height), (cy + h / 2) * height)))
        found.append((x1, y1, x2, y2))
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
    return {**_summary(samples), "found_rate": mean([float(sub["found"]) for sub in subjects]),
            "subjects": len(subjects)}


def score_msic(items: Sequence[MsicItem], embedder: Embedder, detector, box_threshold: float,
               text_threshold: float) -> dict:
    """Per-sample, per-subject-count and overall DINO / CLIP-I (detected region vs reference) and CLIP-T."""
    failures: list[dict] = []
    ok, images = _read_all(items, failures)
    crops, boxes = [], []
    for item, image in zip(ok, images):
        found = locate_categories(detector, image, [s.category for s in item.subjects], box_threshold, text_threshold)
        boxes.append(found)
        crops.extend(crop_box(image, box) for box in found)
    samples = []
    if ok:
        whole = embedder.images(images)
        clip_t = text_scores(whole, embedder.clip_texts([item.text for item in ok]))
        regions = embedder.images(crops)
        refs = embedder.references([s.reference for item in ok for s in item.subjects])
        # Each region against its own subject's reference: the diagonal of the pairwise cosines.
        dino = (regions.dino * refs.dino).sum(dim=1).tolist()
        clip_i = (regions.clip * refs.clip).sum(dim=1).tolist()
        at = 0
        for i, (item, found) in enumerate(zip(ok, boxes)):
            subjects = []
            for s, box in zip(item.subjects, found):
                subjects.append({"id": s.id, "category": s.category, "found": box is not None,
                                 "box": None if box is None else [round(v, 2) for v in box],
                                 "dino": dino[at], "clip_i": clip_i[at]})
                at += 1
            samples.append({
                "key": item.key, "num_subjects": len(item.subjects), "text": item.text,
                "dino": mean([s["dino"] for s in subjects]), "clip_i": mean([s["clip_i"] for s in subjects]),
                "clip_t": clip_t[i], "found_rate": mean([float(s["found"]) for s in subjects]),
                "subjects": subjects, **embedder.encoders,
            })
    by_count = defaultdict(list)
    for s in samples:
        by_count[s["num_subjects"]].append(s)
    return {
        "encoders": embedder.encoders,
        "overall": _msic_summary(samples),
        "by_subject_count": {str(n): _msic_summary(rs) for n, rs in sorted(by_count.items())},
        "samples": samples,
        "failures": failures,
    }
