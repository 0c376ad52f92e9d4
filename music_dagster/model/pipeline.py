"""`MusicPipeline`: MUSIC in diffusers' calling convention, the one inference path (`music generate`, the evaluation,
the training assets' logged sample generations, `music bench generate` and the web demo all call it).

    pipe = MusicPipeline.from_pretrained("models/lora")
    out = pipe(subjects=[Image.open("dog.png"), Image.open("hat.png")], prompt="put the hat [2] on [1]",
               branches=4, generator=torch.Generator().manual_seed(0))
    out.images[out.best].save("best.png")
    out.plans[out.best]["layout"]   # the 8x8 grid of subject ids it was drawn from

A thin shell over `generate.Generator` (which holds the models and does the work; an internal of this pipeline,
used nowhere outside `model/`), so both give the same bytes for the same request and seed. diffusers is imported at this module's top: import it inside functions from
anything `music_dagster.definitions` imports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import PIL.Image
from diffusers.utils import BaseOutput

from music_dagster.model.generate import (
    GivenPlan, Generator, PlanError, Result, check_layout, check_request, read_subjects,
)
from music_dagster.model.runtime import DETOKENIZER_DIR, detokenizer_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from music_dagster.config import Config
    from music_dagster.resources.models import ModelResource


@dataclass
class MusicPipelineOutput(BaseOutput):
    """One request's branches: `images[i]`, `plans[i]` (its text, CoT and layout, rows of subject ids or None
    when the model's layout did not parse or the checkpoint writes none: `MusicPipeline.ablation`) and
    `scores[i]` (CLIP similarity to the prompt); `images[best]` is kept. `result` is the whole record:
    `result.save(folder)` writes what `music generate` writes."""

    images: list[PIL.Image.Image]
    plans: list[dict]
    scores: list[float]
    best: int
    result: Result


class MusicPipeline:
    """A MUSIC checkpoint, its de-tokenizer and the CLIP scorer, called like a diffusers pipeline."""

    def __init__(self, generator: Generator):
        self.generator = generator
        self.progress_bar_config: dict = {}

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | os.PathLike | None = None, config: Config | None = None,
                        detokenizer_dir_: str | os.PathLike | None = None,
                        models: Mapping[str, ModelResource] | None = None) -> "MusicPipeline":
        """Load the LoRA checkpoint `checkpoint_dir` (default: the project's latest, `models/lora`). The
        de-tokenizer is `detokenizer_dir_`, else the `detokenizer/` folder beside the checkpoint (where the
        training assets write it), else the project's; the backbones and the CLIP scorer come from their
        resources, `models` (role -> `ModelResource`: `music_llm`, `music_vision`, `select_clip`, what an asset
        received) else the ones the project's params make (`config`, default `default_config()`), and are checked
        against the sizes the checkpoint records."""
        from music_dagster.config import default_config

        config = config or default_config()
        checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
        detok = detokenizer_dir_
        if detok is None:
            beside = checkpoint.parent / DETOKENIZER_DIR if checkpoint is not None else None
            detok = beside if beside is not None and beside.is_dir() else detokenizer_dir(config)
        return cls(Generator(config, checkpoint, detok, models))

    def to(self, device) -> "MusicPipeline":
        """Move every model (MUSIC, de-tokenizer, CLIP scorer) to `device`; returns the pipeline."""
        import torch

        device = torch.device(device)
        g = self.generator
        g.model.to(device)
        g.detokenizer.to(device)
        g.clip.model.to(device)
        g.clip.device = device
        return self

    @property
    def device(self):
        return self.generator.model.device

    @property
    def ablation(self) -> str:
        """The `train.ablation` the checkpoint records ("none" for one saved before it was recorded): which parts
        of the plan it writes (`config.plan_parts`), so which it decodes and which a given plan may hold."""
        return self.generator.ablation

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the progress bar over the stages of a call (planning, image tokens, decoding,
        scoring), e.g. `disable=True`, `leave=False`, `desc=...`."""
        self.progress_bar_config = kwargs

    def __call__(self, subjects: Sequence, prompt: str, branches: int = 1, plan: dict | GivenPlan | None = None,
                 generator: torch.Generator | int | None = None,
                 sample_plans: bool | None = None) -> MusicPipelineOutput:
        """Draw `prompt` from the reference `subjects` (PIL images or paths), keeping the best of `branches` by
        CLIP similarity. `plan`: a given plan instead of the model's, `{"cot": ..., "layout": rows}` (plan.json's
        keys; without `cot` the model writes the CoT) or a `GivenPlan`; a part the checkpoint was not trained to
        write (`ablation`) is refused (`PlanError`). `generator`: its initial seed (or the int itself) seeds the
        plan sampling and the de-tokenizer's noise, as `music generate --seed` does; None is 0.
        `sample_plans`: sample the model's plans (default: when there are several branches; one branch decodes
        greedily); `music bench generate` samples one branch too, so it does the work of one branch of N."""
        prompt = check_request(prompt, branches)
        images, names = read_subjects(subjects)
        given = None
        if plan is not None:
            if isinstance(plan, dict):
                if "layout" not in plan:
                    raise PlanError("plan: no layout (give rows of subject ids under 'layout')")
                plan = GivenPlan(layout=plan["layout"], cot=plan.get("cot"))
            layout = check_layout(np.asarray(plan.layout).tolist(), len(images),
                                  self.generator.model.settings.grid, "plan")
            given = GivenPlan(layout=layout, cot=plan.cot)
        seed = generator if isinstance(generator, int) else generator.initial_seed() if generator is not None else 0
        result = self.generator.generate_images(images, prompt, branches, seed, progress=True, names=names,
                                                sample=sample_plans, given=given,
                                                progress_bar=self.progress_bar_config)
        record = result.plan()["branches"]
        return MusicPipelineOutput(
            images=[b.image for b in result.branches],
            plans=[{k: r[k] for k in ("text", "cot", "layout", "parsed")} for r in record],
            scores=[b.clip_score for b in result.branches], best=result.best, result=result)
