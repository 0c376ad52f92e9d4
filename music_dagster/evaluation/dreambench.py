"""DreamBench: the benchmark read from a folder in google/dreambooth's layout (`<subject>/NN.jpg` and
`prompts_and_classes.txt`), generated with MUSIC and MUSIC*, and scored.

One fixed reference per subject (its first photo), the 25 prompts of its type (object or live subject) with the
class noun. DINO and CLIP-I of a generated image are its mean cosine against every real photo of the subject, CLIP-T
is against the prompt; the "real vs real" row scores the subject's photos against each other (the copy-paste
ceiling). A generated image that cannot be read is a recorded failure, never the end of a run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from music_dagster.evaluation.common import (BenchmarkError, GenerateFn, Job, evaluate_methods, group_summaries,
                                             read_generated, summarize)
from music_dagster.evaluation.metrics import Embedder, Embeddings, cosine, image_scores, mean, text_scores

PROMPTS_FILE = "prompts_and_classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CLASS_LINE = re.compile(r"^([\w.-]+),(.+)$")
_PROMPT = re.compile(r"""['"](.*?)['"]\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")
_OBJECT_HEADING = "object prompts"
_LIVE_HEADING = "live subject prompts"


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


@dataclass(frozen=True)
class DreamItem:
    """One generated DreamBench image: which subject and prompt it answers, where it is, and its branch (MUSIC*)."""

    key: str
    subject: str
    prompt: str
    path: Path
    branch: int = 0


def score_dreambench(bench: DreamBench, items: Sequence[DreamItem], embedder: Embedder) -> dict:
    """Per-image, per-subject and overall DINO / CLIP-I (mean against every real photo) and CLIP-T (prompt)."""
    failures: list[dict] = []
    ok, images = read_generated(items, failures)
    records = []
    if ok:
        generated = embedder.images(images)
        texts = embedder.clip_texts([it.prompt for it in ok])
        clip_t = text_scores(generated, texts)
        for i, item in enumerate(ok):
            refs = embedder.references(bench.subject(item.subject).images)
            row = Embeddings(generated.dino[i:i + 1], generated.clip[i:i + 1])
            scores = image_scores(row, refs)
            records.append({"key": item.key, "subject": item.subject, "prompt": item.prompt, "branch": item.branch,
                            "dino": scores["dino"][0], "clip_i": scores["clip_i"][0], "clip_t": clip_t[i],
                            **embedder.encoders})
    return dreambench_result(records, failures, embedder.encoders)


def dreambench_result(records: Sequence[dict], failures: list[dict], encoders: dict) -> dict:
    """Overall and per-subject means of scored images, with the images' records and the failures."""
    return {
        "encoders": encoders,
        "overall": summarize(records),
        "per_subject": group_summaries(records, "subject", summarize),
        "images": list(records),
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


def evaluate_dreambench(bench: DreamBench, generate: GenerateFn, embedder: Embedder, folder: Path, branches: int,
                        images_per_prompt: int, seed: int, selector: str) -> dict:
    """Generate every (subject, prompt, sample) image from the subject's fixed reference, for MUSIC and MUSIC*
    (`common.evaluate_methods`: MUSIC*'s branch chosen by the selection encoder `selector` and by the evaluation's
    CLIP), into `folder/<music|music_star>/`, and score them; plus the real-vs-real row. The subject is tagged `[1]`
    in the unique token's place of the prompt."""
    from music_dagster.synthesis.common import derive_seed
    from music_dagster.synthesis.decimation import tag

    jobs, asked = [], {}
    for s in bench.subjects:
        for i, prompt in enumerate(s.prompts):
            for k in range(images_per_prompt):
                key = f"{s.name}/{i:02d}/{k}"
                jobs.append(Job(key, (s.reference,), s.instruction(i, tag(1)), derive_seed("dreambench", seed, key)))
                asked[key] = (s.name, prompt)

    def score(images: list[tuple[Job, int, Path]]) -> tuple[list[dict], list[dict]]:
        result = score_dreambench(bench, [DreamItem(job.key, *asked[job.key], path, branch)
                                          for job, branch, path in images], embedder)
        return result["images"], result["failures"]

    methods = {method: {**dreambench_result(records, failures, embedder.encoders), "branches": n}
               for method, (records, failures, n) in evaluate_methods(jobs, generate, score, folder, branches).items()}
    return {
        "benchmark": "dreambench", "encoders": embedder.encoders, "branches": branches,
        "selected_by": {"music_star": selector, "music_star_eval_clip": embedder.clip_name},
        "subjects": [s.name for s in bench.subjects], "images_per_prompt": images_per_prompt,
        "prompts": {s.name: list(s.prompts) for s in bench.subjects},
        "methods": methods, "real_vs_real": score_real_vs_real(bench, embedder),
    }
