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

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

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
        raise BenchmarkError(f"DreamBench folder {root} does not exist (run `music data dreambench`, or set eval.dreambench in params.yaml)")
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


def _summary(records: Sequence[dict]) -> dict:
    return {**{m: mean([r[m] for r in records]) for m in METRICS}, "n": len(records)}


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
        values = {"dino": cosine(refs.dino, refs.dino)[off].tolist(),
                  "clip_i": cosine(refs.clip, refs.clip)[off].tolist()}
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
    """A generated image for an MSIC sample."""

    sample: MsicSample
    path: Path

    @property
    def key(self) -> str:
        return self.sample.key


def load_msic(shards_dir: str | Path, limit: int | None = None) -> tuple[MsicSample, ...]:
    """The MSIC samples (`split: msic`) of the complete `training_samples` shards under `shards_dir`.

    With `limit`, samples are taken round-robin over subject counts (in shard and manifest order), so that every
    count present is represented before any count gets a second sample.
    """
    from music_dagster.storage import MANIFEST, complete_shards, read_shard, resolve_stored

    shards_dir = Path(shards_dir)
    root = shards_dir.parent  # image references are datasets-relative: <asset>/<key>/<file>
    by_count: dict[int, list[MsicSample]] = defaultdict(list)
    for key in complete_shards(shards_dir):
        shard = read_shard(shards_dir / key)
        for n, record in enumerate(shard.records):
            if record.get("split") != "msic":
                continue
            try:
                fields = [(int(s["id"]), str(s["category"]), s["reference"])
                          for s in sorted(record["subjects"], key=lambda s: s["id"])]
                sample_id, instruction = str(record["sample_id"]), str(record["instruction"])
            except (KeyError, TypeError, ValueError) as e:
                raise BenchmarkError(f"{shard.path}: record {n}: not an MSIC sample (missing or bad {e})") from None
            where = f"{shard.path / MANIFEST}: line {n + 1}"
            subjects = tuple(MsicSubject(i, category, resolve_stored(root, ref, where)) for i, category, ref in fields)
            sample = MsicSample(sample_id, instruction, subjects)
            for s in subjects:
                if not s.reference.is_file():
                    raise BenchmarkError(f"{shard.path}: record {n}: subject {s.id}'s reference {s.reference} "
                                         "is missing")
            if not 1 <= len(subjects) <= 12:
                raise BenchmarkError(f"{shard.path}: record {n}: {len(subjects)} subjects, MSIC has 1..12")
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

    The data graph's grounding (`synthesis.detection`): one GroundingDINO pass with every category in the query,
    a phrase's score per query from its tokens' probabilities, the best query per category, one category per query.
    """
    import torch

    from music_dagster.synthesis.detection import assign_boxes, phrase_scores, query_text
    from music_dagster.synthesis.schemas import phrase

    text, spans = query_text([phrase(c) for c in categories])
    # Tokenized here, not by the processor, so that the offsets are those of the ids the model sees.
    text_inputs = detector.processor.tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    offsets = text_inputs.pop("offset_mapping")[0].tolist()
    inputs = {**detector.processor.image_processor(images=image, return_tensors="pt"), **text_inputs}
    with torch.inference_mode():
        out = detector.model(**{k: v.to(detector.device, detector.dtype) if v.is_floating_point() else
                                v.to(detector.device) for k, v in inputs.items()})
    probs = out.logits[0].float().sigmoid().cpu()
    scores, token_max = phrase_scores(probs, offsets, spans)
    boxes = []  # normalised (x1, y1, x2, y2), clipped to the image
    for cx, cy, w, h in out.pred_boxes[0].float().cpu().tolist():
        boxes.append([min(1.0, max(0.0, v)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)])
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
    return {**_summary(samples), "found_rate": mean([float(sub["found"]) for sub in subjects]),
            "subjects": len(subjects)}


def score_msic(items: Sequence[MsicItem], embedder: Embedder, detector, box_threshold: float,
               text_threshold: float) -> dict:
    """Per-sample, per-subject-count and overall DINO / CLIP-I (detected region vs reference) and CLIP-T."""
    failures: list[dict] = []
    ok, images = _read_all(items, failures)
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
                "key": item.key, "num_subjects": len(subjects), "text": item.sample.text,
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


# ------------------------------------------------------------------------------------------- runs and reports
METHODS = ("music", "music_star")  # MUSIC: one greedy plan; MUSIC*: N sampled plans, the best CLIP-T kept
LABELS = {"music": "MUSIC", "music_star": "MUSIC*", "real_vs_real": "real vs real"}
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
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


def _methods(branches: int) -> dict[str, int]:
    return {"music": 1, "music_star": branches}


def evaluate_dreambench(bench: DreamBench, generate: GenerateFn, embedder: Embedder, folder: Path, branches: int,
                        images_per_prompt: int, seed: int) -> dict:
    """Generate every (subject, prompt, sample) image from the subject's fixed reference, for MUSIC and MUSIC*,
    into `folder/<method>/`, and score them; plus the real-vs-real row. The subject is tagged `[1]` in the
    unique token's place of the prompt."""
    from music_dagster.decimation import tag
    from music_dagster.synthesis.common import derive_seed

    jobs, items = [], []
    for s in bench.subjects:
        for i, prompt in enumerate(s.prompts):
            for k in range(images_per_prompt):
                key = f"{s.name}/{i:02d}/{k}"
                jobs.append(Job(key, (s.reference,), s.instruction(i, tag(1)), derive_seed("dreambench", seed, key)))
                items.append((s.name, prompt))
    methods = {}
    for method, n in _methods(branches).items():
        failed = generate_images(jobs, generate, n, folder / method)
        bad = {f["key"] for f in failed}
        scored = [DreamItem(j.key, name, prompt, folder / method / j.file_name)
                  for j, (name, prompt) in zip(jobs, items) if j.key not in bad]
        result = score_dreambench(bench, scored, embedder)
        methods[method] = {**result, "branches": n, "failures": failed + result["failures"]}
    return {
        "benchmark": "dreambench", "encoders": embedder.encoders, "branches": branches,
        "subjects": [s.name for s in bench.subjects], "images_per_prompt": images_per_prompt,
        "prompts": {s.name: list(s.prompts) for s in bench.subjects},
        "methods": methods, "real_vs_real": score_real_vs_real(bench, embedder),
    }


def evaluate_msic(samples: Sequence[MsicSample], generate: GenerateFn, embedder: Embedder, detector, folder: Path,
                  branches: int, box_threshold: float, text_threshold: float, seed: int) -> dict:
    """Generate each MSIC sample from its references and instruction, for MUSIC and MUSIC*, into
    `folder/<method>/`, and score the subjects on their detected regions."""
    from music_dagster.synthesis.common import derive_seed

    jobs = [Job(s.key, tuple(x.reference for x in s.subjects), s.instruction, derive_seed("msic", seed, s.key))
            for s in samples]
    methods = {}
    for method, n in _methods(branches).items():
        failed = generate_images(jobs, generate, n, folder / method)
        bad = {f["key"] for f in failed}
        scored = [MsicItem(s, folder / method / j.file_name) for s, j in zip(samples, jobs) if j.key not in bad]
        result = score_msic(scored, embedder, detector, box_threshold, text_threshold)
        methods[method] = {**result, "branches": n, "failures": failed + result["failures"]}
    return {"benchmark": "msic", "encoders": embedder.encoders, "branches": branches,
            "samples": [s.key for s in samples], "methods": methods}


def summary(report: dict) -> dict:
    """What goes to `metrics/<benchmark>.json` (DVC metrics): overall scores per method (MSIC: also by subject
    count), failure counts, the encoders and the branch count."""
    out = {"benchmark": report["benchmark"], "encoders": report["encoders"], "branches": report["branches"]}
    for method, result in report["methods"].items():
        entry = {**result["overall"], "failures": len(result["failures"])}
        if "by_subject_count" in result:
            entry = {"overall": entry, "by_subject_count": result["by_subject_count"]}
        out[method] = entry
    if "real_vs_real" in report:
        out["real_vs_real"] = report["real_vs_real"]["overall"]
    return out


def by_subject_count(report: dict) -> dict[str, dict[int, dict]]:
    """method -> subject count -> summary (DreamBench: every image has one subject)."""
    out = {}
    for method, result in report["methods"].items():
        rows = result.get("by_subject_count")
        out[method] = {int(n): v for n, v in rows.items()} if rows is not None else {1: result["overall"]}
    return out


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def table_markdown(report: dict) -> str:
    """Scores by subject count (rows) for each method (column groups), with an overall row; DreamBench adds the
    real-vs-real row."""
    counts = by_subject_count(report)
    methods = list(report["methods"])
    keys = (*METRICS, "found_rate") if report["benchmark"] == "msic" else METRICS
    cols = [(m, k) for m in methods for k in keys]
    head = "| subjects | " + " | ".join(f"{LABELS[m]} {METRIC_LABELS.get(k, 'found')}" for m, k in cols) + " | n |"
    lines = [head, "|" + " --- |" * (len(cols) + 2)]
    for n in sorted({n for c in counts.values() for n in c}):
        cells = [_cell(counts[m].get(n, {}).get(k)) for m, k in cols]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {counts[methods[0]].get(n, {}).get('n', 0)} |")
    overall = [_cell(report["methods"][m]["overall"].get(k)) for m, k in cols]
    lines.append("| all | " + " | ".join(overall) + f" | {report['methods'][methods[0]]['overall']['n']} |")
    if "real_vs_real" in report:
        real = report["real_vs_real"]["overall"]
        cells = [_cell(real.get(k)) if m == methods[0] else "" for m, k in cols]
        lines.append("| real vs real | " + " | ".join(cells) + f" | {real['n']} pairs |")
    return "\n".join(lines)


def plot_png(report: dict) -> bytes:
    """Each metric against subject count, one line per method (PNG bytes, matplotlib's Agg backend)."""
    import io

    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    counts = by_subject_count(report)
    fig = Figure(figsize=(12, 3.6), dpi=100)
    axes = fig.subplots(1, len(METRICS))
    for ax, metric in zip(axes, METRICS):
        for method, rows in counts.items():
            xs = sorted(n for n, v in rows.items() if v.get(metric) is not None)
            ax.plot(xs, [rows[n][metric] for n in xs], marker="o", label=LABELS[method])
        real = report.get("real_vs_real", {}).get("overall", {}).get(metric)
        if real is not None:
            ax.axhline(real, linestyle="--", color="grey", label=LABELS["real_vs_real"])
        ax.set_title(f"{report['benchmark']}: {METRIC_LABELS[metric]}")
        ax.set_xlabel("subjects")
        ax.set_xticks(sorted({n for rows in counts.values() for n in rows}) or [1])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: same bytes on reruns
    return buf.getvalue()


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_outputs(metrics_dir: Path, report: dict) -> dict[str, Path]:
    """`<metrics_dir>/<benchmark>.json` (the summary) and `<benchmark>.png` (the plot), each written atomically."""
    from music_dagster.storage import atomic_write_bytes, atomic_write_text

    name = report["benchmark"]
    metrics_dir.mkdir(parents=True, exist_ok=True)
    return {"summary": atomic_write_text(metrics_dir / f"{name}.json", _json(summary(report))),
            "plot": atomic_write_bytes(metrics_dir / f"{name}.png", plot_png(report))}


def write_report(folder: Path, report: dict) -> Path:
    """Every record of a report (per image or sample, failures) as `folder/scores.json`."""
    path = folder / "scores.json"
    path.write_text(_json(report))
    return path


def out_of_range(report: dict) -> list[str]:
    """Every score of a report that is not a finite cosine in [-1, 1] (found rates: [0, 1]), by where it is."""
    bad = []

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                if key in METRICS or key == "found_rate":
                    lo = 0.0 if key == "found_rate" else -1.0
                    ok = value is None or (isinstance(value, (int, float)) and math.isfinite(value)
                                           and lo - 1e-6 <= value <= 1 + 1e-6)
                    if not ok:
                        bad.append(f"{here}={value!r}")
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(report, "")
    return bad


def log_mlflow_run(store, checkpoint: Path, report: dict, files: Sequence[Path]) -> dict:
    """An MLflow run for the report, nested under the training run recorded in `checkpoint` (`mlflow_run.json`),
    naming the encoders; overall scores as metrics (MSIC: per subject count as steps), `files` as artifacts."""
    from music_dagster import tracking

    name = report["benchmark"]
    enc = report["encoders"]
    tags = {"benchmark": name, "eval.dino_model": enc["dino_model"], "eval.clip_variant": enc["clip_variant"],
            "checkpoint": str(checkpoint)}
    parent = tracking.read_run_ref(checkpoint)["run_id"] if (checkpoint / tracking.RUN_REF).is_file() else None
    if parent is not None:
        run_cm = tracking.start_nested_run(store, parent, name, tags)
    else:
        run_cm = tracking.start_run(store, name, {tracking.TAG_KIND: "evaluation", **tags})
    with run_cm as run:
        run.log_params({"dino_model": enc["dino_model"], "clip_variant": enc["clip_variant"],
                        "branches": report["branches"], "checkpoint": str(checkpoint)})
        metrics = {}
        for method, result in report["methods"].items():
            metrics.update({f"{method}/{k}": v for k, v in result["overall"].items() if v is not None})
            metrics[f"{method}/failures"] = len(result["failures"])
            for n, row in sorted((int(n), r) for n, r in result.get("by_subject_count", {}).items()):
                run.log_step(n, {f"{method}/by_subject_count/{k}": v for k, v in row.items() if v is not None})
        if "real_vs_real" in report:
            metrics.update({f"real_vs_real/{k}": v for k, v in report["real_vs_real"]["overall"].items()
                            if v is not None})
        run.log_metrics(metrics)
        for path in files:
            run.log_artifact(path)
        return {**run.reference(), "parent_run_id": parent}
