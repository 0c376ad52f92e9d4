"""Generation with a trained MUSIC checkpoint: reference subjects + instruction -> CoT + layout -> image.

MUSIC* (test-time scaling): N plans are sampled as one batch, their image tokens predicted in one batched forward,
decoded by the de-tokenizer as one batch, and scored by CLIP text similarity against the instruction (the
`select_clip` role) in one batch; the highest score wins (ties: the lower branch). One branch decodes the plan greedily.

Editable plans: a `GivenPlan` (`--plan plan.json`: CoT and layout; `--layout grid.json`: the layout only) is
drawn instead of the model's plan (see `GivenPlan` for how each is fed to the image stage); `read_plan` /
`read_layout` refuse a malformed file, a wrong grid size, an unknown id or a subject without a cell in one line.

A checkpoint records the `train.ablation` it was trained with (`MusicSettings.ablation`; "none" for one saved before
it was recorded): its own plans are decoded under the grammar of the parts it writes, a given plan is fed to the
image stage as `plan_text` writes it for that ablation, a given part it was not trained with is refused in one line
naming the ablation (`check_given`), and `plan.json` records it (`ablation`).

`MusicPipeline` (`model/pipeline.py`) is the one inference path: `generate(...)` (a one-call API), `cli_generate`
(`music generate`), the evaluation, the training assets' sample generations, the benchmark and the web demo all go
through it. `Generator` keeps the models loaded across calls and does the work; it is the pipeline's internal,
used nowhere outside `model/`. Bad input (no subject, more than 12, an unreadable image, an empty prompt, N < 1, a missing or
damaged checkpoint, an existing output folder) raises a one-line `UserError` before any model is loaded; the output
folder appears only once complete. torch is imported inside functions.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from music_dagster.config import MAX_SUBJECTS, plan_parts
from music_dagster.errors import UserError
from music_dagster.model.layout import TEXT_PREFIX

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from music_dagster.config import Config
    from music_dagster.resources.models import ModelResource

IMAGE_FILE, PLAN_FILE, OVERLAY_FILE = "image.png", "plan.json", "layout.png"


class GenerateError(UserError):
    """A generation request that cannot run: no or too many subjects, an empty prompt, N < 1, a bad output folder."""


class PlanError(GenerateError):
    """A given plan or layout that cannot be drawn: a malformed file, a wrong grid size, an unknown or missing id."""


@dataclass(frozen=True)
class GivenPlan:
    """A plan the user gives instead of the model's: the layout grid, and the CoT (None: the model writes it).

    With a CoT the planning step is skipped: every branch reads this plan, so branches differ only in the image
    stage's sampling. Without one (`--layout`) the model decodes its plan as usual and its CoT (the text before its
    first `layout:`) is kept while the given layout replaces the model's: the CoT comes first in the plan, so it is
    written before the layout exists and is not conditioned on it; the image stage is. A checkpoint trained
    without the CoT (`no_cot`) writes none: a given layout is its whole plan, and planning is skipped too."""

    layout: np.ndarray
    cot: str | None = None

    @property
    def source(self) -> str:
        """What `plan.json` records as `plan_source`."""
        return "given" if self.cot is not None else "given_layout"


_GRID_SCHEMA = {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}
_PLAN_SCHEMA = {"type": "object", "required": ["cot", "layout"],
                "properties": {"cot": {"type": "string"}, "layout": _GRID_SCHEMA}}


def check_layout(layout, subjects: int, grid: int, name: str) -> np.ndarray:
    """`layout` (rows of subject ids) as a `grid x grid` int array whose ids are 0..subjects, each subject owning
    at least one cell; else a one-line PlanError naming `name` (the file) and the problem."""
    rows = len(layout)
    if rows != grid or any(len(row) != grid for row in layout):
        cols = sorted({len(row) for row in layout}) or [0]
        shape = f"{rows}x{cols[0]}" if len(cols) == 1 else f"{rows} rows of {cols[0]}..{cols[-1]} cells"
        raise PlanError(f"{name}: the layout grid is {shape}, expected {grid}x{grid}")
    arr = np.asarray(layout, dtype=np.int64)
    for (r, c), sid in np.ndenumerate(arr):
        if not 0 <= sid <= subjects:
            raise PlanError(f"{name}: cell (row {r}, column {c}) holds id {sid}, not among the {subjects} subject(s) "
                            f"(ids 1..{subjects}, 0 = background)")
    for sid in range(1, subjects + 1):
        if not (arr == sid).any():
            raise PlanError(f"{name}: subject {sid} has no cell in the layout (each subject needs at least one)")
    return arr


def check_given(given: GivenPlan, ablation: str, checkpoint) -> None:
    """Refuse, in one line naming the checkpoint's `ablation`, a given plan with a part the checkpoint was not
    trained to write: a plan (CoT and layout) needs both, a layout alone needs the layout."""
    writes_cot, writes_layout = plan_parts(ablation)
    if not writes_layout:
        missing, hint = "layout", ""
    elif given.cot is not None and not writes_cot:
        missing, hint = "CoT", "; give the layout alone (--layout)"
    else:
        return
    what = "plan (CoT and layout)" if given.cot is not None else "layout"
    raise PlanError(f"checkpoint {checkpoint} was trained with train.ablation {ablation}: its plans hold no "
                    f"{missing}, so a given {what} cannot be drawn{hint}")


def read_plan(path: str | os.PathLike, subjects: int, grid: int) -> GivenPlan:
    """The CoT and layout of a plan file (`plan.json`'s format: its `cot` and `layout` keys; others ignored)."""
    from music_dagster.storage import read_json

    plan = read_json(path, _PLAN_SCHEMA, error=PlanError)
    return GivenPlan(layout=check_layout(plan["layout"], subjects, grid, str(path)), cot=plan["cot"])


def read_layout(path: str | os.PathLike, subjects: int, grid: int) -> GivenPlan:
    """A layout file: just the grid, as JSON rows of subject ids (what `plan.json` holds under `layout`)."""
    from music_dagster.storage import read_json

    return GivenPlan(layout=check_layout(read_json(path, _GRID_SCHEMA, error=PlanError), subjects, grid, str(path)))


@dataclass(frozen=True)
class Branch:
    """One test-time branch: its plan, its image and the image's CLIP similarity to the instruction."""

    text: str  # the decoded plan as written by the model
    cot: str
    layout: np.ndarray | None  # None when the plan's layout does not parse
    clip_score: float
    image: Image.Image


@dataclass(frozen=True)
class Result:
    """What one generation request produced; `branches[best]` is the image kept."""

    prompt: str
    seed: int
    branches: tuple[Branch, ...]
    best: int
    checkpoint: str
    clip_model: str
    grid: int
    subjects: tuple[str, ...]  # how each reference was given (file path, or `<image i>` for an in-memory image)
    plan_source: str = "model"  # "model", or `GivenPlan.source`: "given" (CoT and layout), "given_layout"
    ablation: str = "none"  # the checkpoint's `train.ablation`: which parts of the plan it writes

    @property
    def image(self) -> Image.Image:
        return self.branches[self.best].image

    @property
    def layout(self) -> np.ndarray | None:
        return self.branches[self.best].layout

    def overlay(self) -> Image.Image:
        """The kept image with its layout drawn over it (an empty grid when its layout did not parse)."""
        from music_dagster.model.layout import render_overlay

        layout = self.layout if self.layout is not None else np.zeros((self.grid, self.grid), np.int64)
        return render_overlay(self.image, layout)

    def plan(self) -> dict:
        """`plan.json`: the kept CoT and layout grid, every branch's plan and CLIP score, which won, and the
        checkpoint's `train.ablation`."""
        def grid(layout):
            return None if layout is None else np.asarray(layout).tolist()

        return {
            "prompt": self.prompt, "seed": self.seed, "checkpoint": self.checkpoint, "clip_model": self.clip_model,
            "subjects": list(self.subjects), "num_branches": len(self.branches), "best": self.best,
            "plan_source": self.plan_source, "ablation": self.ablation,
            "cot": self.branches[self.best].cot, "layout": grid(self.layout),
            "branches": [{"index": i, "text": b.text, "cot": b.cot, "layout": grid(b.layout),
                          "parsed": b.layout is not None, "clip_score": b.clip_score}
                         for i, b in enumerate(self.branches)],
        }

    def save(self, out: str | os.PathLike) -> Path:
        """Write image, plan and overlay into the new folder `out`, atomically: a temporary sibling renamed at the
        end, so a failure leaves no `out` at all. `out` must not exist."""
        from music_dagster.storage import png_bytes, staged_dir

        out = Path(out)
        if out.exists():
            raise GenerateError(f"--out {out}: already exists (choose a new folder)")
        with staged_dir(out, replace=False) as tmp:
            (tmp / IMAGE_FILE).write_bytes(png_bytes(self.image))
            (tmp / OVERLAY_FILE).write_bytes(png_bytes(self.overlay()))
            (tmp / PLAN_FILE).write_text(json.dumps(self.plan(), indent=2, sort_keys=True) + "\n")
        return out


def read_subjects(subjects: Sequence) -> tuple[list, tuple[str, ...]]:
    """The reference images as RGB PIL images, and how each was given. Paths are read with `images.read_image`
    (odd modes, 16-bit, EXIF orientation handled; missing or corrupt files refused); PIL images are converted."""
    from PIL import Image

    from music_dagster.images import read_image, to_rgb

    if len(subjects) == 0:
        raise GenerateError(f"no subject given (pass 1..{MAX_SUBJECTS} reference images with --subject)")
    if len(subjects) > MAX_SUBJECTS:
        raise GenerateError(f"{len(subjects)} subjects given; at most {MAX_SUBJECTS} are supported")
    images, names = [], []
    for i, subject in enumerate(subjects, start=1):
        if isinstance(subject, Image.Image):
            images.append(to_rgb(subject))
            names.append(f"<image {i}>")
        elif isinstance(subject, (str, os.PathLike)):
            images.append(read_image(subject))
            names.append(str(subject))
        else:
            raise GenerateError(f"subject {i}: expected an image path or a PIL image, got {type(subject).__name__}")
    return images, tuple(names)


def check_request(prompt: str, branches: int) -> str:
    """The stripped prompt, after checking the prompt and branch count."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerateError("the prompt is empty (pass an instruction with --prompt)")
    if not isinstance(branches, int) or branches < 1:
        raise GenerateError(f"--branches must be at least 1 (got {branches})")
    return prompt.strip()


def check_detokenizer(detokenizer: Path):
    """Refuse a missing, incomplete or damaged de-tokenizer folder; its settings."""
    from music_dagster.model.detokenizer import check_checkpoint

    if not detokenizer.is_dir():
        raise GenerateError(f"de-tokenizer {detokenizer} does not exist (materialize the detokenizer asset)")
    return check_checkpoint(detokenizer)


def check_checkpoint_exists(checkpoint: Path) -> None:
    """Refuse a checkpoint folder that is not there, naming the asset that makes it."""
    if not checkpoint.is_dir():
        raise GenerateError(f"checkpoint {checkpoint} does not exist (materialize the lora_checkpoint asset, "
                            "or pass --checkpoint)")


def checkpoint_ablation(checkpoint: Path) -> str:
    """The `train.ablation` a MUSIC checkpoint records, from its configs alone (`music.read_saved`: no weight file
    read), so a given plan is checked against it before any model loads."""
    from music_dagster.model.music import read_saved

    check_checkpoint_exists(checkpoint)
    return read_saved(checkpoint).settings.ablation


def check_checkpoints(checkpoint: Path, detokenizer: Path):
    """Refuse a missing, incomplete or damaged checkpoint or de-tokenizer before anything is loaded; what
    each one's `check_checkpoint` read (handed to `from_pretrained`, so no weight file is hashed twice)."""
    from music_dagster.model.music import check_checkpoint

    check_checkpoint_exists(checkpoint)
    return check_checkpoint(checkpoint), check_detokenizer(detokenizer)


class Generator:
    """A loaded MUSIC checkpoint, de-tokenizer and CLIP scorer, reused across `generate` calls: `MusicPipeline`'s
    internal (callers outside `model/` use the pipeline).

    The backbones (`music_llm`, `music_vision`) and the CLIP scorer (`select_clip`) are fresh copies loaded from their
    resources: `models` (role -> `ModelResource`, what an asset received), else the config's (`runtime.load_model`).
    """

    def __init__(self, config: Config, checkpoint: str | os.PathLike | None = None,
                 detokenizer: str | os.PathLike | None = None, models: Mapping[str, ModelResource] | None = None):
        from music_dagster.model.detokenizer import Detokenizer, load_vae
        from music_dagster.model.music import MusicModel
        from music_dagster.model.runtime import detokenizer_dir, device_of, load_model, lora_dir

        models = models or {}
        self.config = config
        self.checkpoint = Path(checkpoint) if checkpoint is not None else lora_dir(config)
        detokenizer = Path(detokenizer) if detokenizer is not None else detokenizer_dir(config)
        saved, detok_settings = check_checkpoints(self.checkpoint, detokenizer)
        config.check_models([r for r in ("music_llm", "music_vision", "music_unet", "select_clip") if r not in models])
        device = device_of(config)
        self.model = MusicModel.from_pretrained(self.checkpoint, load_model(config, "music_llm", models),
                                                load_model(config, "music_vision", models), saved=saved)
        detok_cfg = config.profile.detokenizer
        vae = load_vae(detok_cfg.vae, device) if detok_cfg.vae is not None else None
        self.detokenizer = Detokenizer.from_pretrained(detokenizer, vae=vae, device=device, settings=detok_settings)
        self.clip = load_model(config, "select_clip", models)

    @property
    def ablation(self) -> str:
        """The checkpoint's `train.ablation`: which parts of the plan it writes (`config.plan_parts`)."""
        return self.model.settings.ablation

    def forced_plan(self, cot: str, layout: np.ndarray):
        """The plan the image stage reads for a given CoT and layout: the text the model was trained to write for
        them (`plan_text` for the checkpoint's ablation) and its token ids."""
        from music_dagster.model.music import Plan, plan_text

        text = plan_text(cot, layout, self.ablation)
        return Plan(text=text, cot=cot.strip(), layout=np.asarray(layout),
                    token_ids=tuple(self.model.encode_ids(text)))

    def generate(self, subjects: Sequence, prompt: str, branches: int = 1, seed: int = 0,
                 progress: bool = False, given: GivenPlan | None = None) -> Result:
        """Generate one image for `prompt` from the reference `subjects` (paths or PIL images), keeping the best
        of `branches` plans by CLIP text similarity; `given`: draw this plan or layout (see `GivenPlan`)."""
        prompt = check_request(prompt, branches)
        images, names = read_subjects(subjects)
        if given is not None:
            given = GivenPlan(check_layout(np.asarray(given.layout).tolist(), len(images), self.model.settings.grid,
                                           "the given plan"), given.cot)
        return self.generate_images(images, prompt, branches, seed, progress, names, given=given)

    def generate_images(self, images: Sequence, prompt: str, branches: int = 1, seed: int = 0,
                        progress: bool = False, names: Sequence[str] | None = None,
                        sample: bool | None = None, given: GivenPlan | None = None,
                        progress_bar: dict | None = None) -> Result:
        """`generate` for references already read as RGB PIL images (`read_subjects`). `sample`: sample the
        plans (default: when there are several branches; one branch decodes greedily). `given`: draw this plan
        or layout (checked with `check_layout`, and against the checkpoint's ablation with `check_given`) instead
        of the model's (see `GivenPlan`). `progress_bar`: tqdm options for the bar over the four stages
        (`MusicPipeline.set_progress_bar_config`)."""
        import torch
        from tqdm.auto import tqdm

        from music_dagster.model.music import Sample
        from music_dagster.model.runtime import flush_denormals
        from music_dagster.zoo.clip_similarity import image_text_scores

        prompt = check_request(prompt, branches)
        if given is not None:
            check_given(given, self.ablation, self.checkpoint)
        names = tuple(names or (f"<image {i}>" for i in range(1, len(images) + 1)))
        gen = self.config.profile.generate
        bar_options = {"desc": "music generate", "unit": "stage", "disable": not progress, **(progress_bar or {})}
        with flush_denormals(), tqdm(total=4, **bar_options) as bar:
            bar.set_postfix_str(f"planning {branches} branch(es)")
            request = Sample(instruction=prompt, references=images)
            encoded = [self.model.encode(request, with_target=False)]
            sample = branches > 1 if sample is None else sample
            writes_cot, _ = plan_parts(self.ablation)
            if given is not None and (given.cot is not None or not writes_cot):  # the whole plan is given
                plans = [self.forced_plan(given.cot or "", given.layout)] * branches
            else:
                plans = self.model.plan([request], branches=branches, sample=sample,
                                        temperature=gen.temperature, top_k=gen.top_k,
                                        max_new_tokens=gen.max_plan_tokens, seed=seed, encoded=encoded,
                                        constrained=True)[0]
                if given is not None:  # a layout alone: the model's CoT, then the given layout
                    plans = [self.forced_plan(p.text.split(TEXT_PREFIX, 1)[0], given.layout) for p in plans]
            bar.update()
            bar.set_postfix_str("image tokens")
            tokens = self.model.image_tokens([request] * branches, plans, encoded=encoded * branches)
            bar.update()
            bar.set_postfix_str("decoding")
            pictures = self.detokenizer.decode(tokens, seed=seed, steps=gen.decode_steps)
            bar.update()
            bar.set_postfix_str("CLIP scoring")
            scores = image_text_scores(self.clip, pictures, prompt, dtype=torch.float32)
            bar.update()
        best = int(np.argmax(scores))  # first maximum: ties go to the lower branch
        return Result(
            prompt=prompt, seed=seed, best=best, checkpoint=str(self.checkpoint), clip_model=str(self.clip.name),
            grid=self.model.settings.grid, subjects=names, plan_source=given.source if given else "model",
            ablation=self.ablation,
            branches=tuple(Branch(text=p.text, cot=p.cot, layout=p.layout, clip_score=float(s), image=im)
                           for p, s, im in zip(plans, scores, pictures)),
        )


def generate(subjects: Sequence, prompt: str, branches: int = 1, seed: int = 0,
             checkpoint: str | os.PathLike | None = None, config: Config | None = None,
             progress: bool = False) -> Result:
    """One generation with the project's config (or `config`) and the latest checkpoint (or `checkpoint`), through
    `MusicPipeline`. The request is checked before any model is loaded."""
    from music_dagster.config import default_config
    from music_dagster.model.pipeline import MusicPipeline

    prompt = check_request(prompt, branches)
    read_subjects(subjects)  # read again by the pipeline: checked here before any model loads
    pipe = MusicPipeline.from_pretrained(checkpoint, config or default_config())
    pipe.set_progress_bar_config(disable=not progress)
    return pipe(subjects, prompt, branches, generator=seed).result


def cli_generate(args) -> None:
    """`music generate`: check the output folder, the request and a given plan, then (`MusicPipeline`) the
    checkpoints before any model loads; generate and write `image.png`, `plan.json` and `layout.png` into the new
    folder `--out`."""
    import torch

    from music_dagster.config import default_config
    from music_dagster.model.pipeline import MusicPipeline
    from music_dagster.model.runtime import lora_dir

    out = Path(args.out)
    if out.exists():
        raise GenerateError(f"--out {out}: already exists (choose a new folder)")
    config = default_config()
    prompt = check_request(args.prompt, args.branches)
    images, _ = read_subjects(args.subject)  # read again by the pipeline: checked here before any model loads
    grid = config.profile.data.grid
    given = (read_plan(args.plan, len(images), grid) if args.plan else
             read_layout(args.layout, len(images), grid) if args.layout else None)
    checkpoint = Path(args.checkpoint) if args.checkpoint else lora_dir(config)
    if given is not None:
        check_given(given, checkpoint_ablation(checkpoint), checkpoint)
    torch.set_num_threads(config.profile.torch_threads)
    pipe = MusicPipeline.from_pretrained(checkpoint, config)
    result = pipe(args.subject, prompt, args.branches, plan=given, generator=args.seed).result
    result.save(out)
    scores = ", ".join(f"{b.clip_score:.4f}" for b in result.branches)
    print(f"wrote {out}/{{{IMAGE_FILE},{PLAN_FILE},{OVERLAY_FILE}}}; branch {result.best} of "
          f"{len(result.branches)} kept (CLIP-T {scores})")
