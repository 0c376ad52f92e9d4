"""Stage 3, `target_images`: the T2I model (FluxPipeline) renders each caption at the profile's resolution."""
from __future__ import annotations

from music_dagster.synthesis.common import ShardContext, StageResult, batches, child, clip_prompts

STAGE = "target_images"


def cpu_generators(seeds: list[int]):
    """One CPU generator per sample: a sample's noise depends on its own seed only, on any device."""
    import torch

    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def target_images(t2i, ctx: ShardContext, data, records: list[dict]) -> StageResult:
    import torch

    pipe = t2i.pipe
    pipe.set_progress_bar_config(disable=True)
    size = data.image_size
    result = StageResult()
    for chunk in batches(records, data.batch_size):
        with torch.inference_mode():
            captions = [r["caption"] for r in chunk]
            images = pipe(
                prompt=clip_prompts(pipe, captions), prompt_2=captions, height=size, width=size,
                num_inference_steps=data.t2i_steps, guidance_scale=data.guidance_scale,
                generator=cpu_generators([ctx.seed_for(r["sample_id"]) for r in chunk]), output_type="pil",
            ).images
        for record, image in zip(chunk, images):
            name = f"{record['sample_id']}.png"
            result.images[name] = image.convert("RGB")
            result.records.append(child(record, image=ctx.ref(name), width=image.size[0], height=image.size[1]))
    return result
