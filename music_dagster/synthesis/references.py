"""Stage 6, `reference_subjects`: each verified box is cropped and transformed by the I2I model
(FluxKontextPipeline, the nearest diffusers stand-in for the paper's UNO-FLUX) with an instruction for a new
viewpoint or appearance, so a reference is never a copy of the target crop (the paper's guard against copy-paste
learning). The crop is kept beside its reference so the guard can be checked."""
from __future__ import annotations

from music_dagster.synthesis import prompts, schemas
from music_dagster.synthesis.common import OpenImage, ShardContext, StageResult, batches, child, crop, square
from music_dagster.synthesis.targets import cpu_generators

STAGE = "reference_subjects"


def reference_subjects(i2i, ctx: ShardContext, data, records: list[dict], open_image: OpenImage) -> StageResult:
    import torch

    pipe = i2i.pipe
    pipe.set_progress_bar_config(disable=True)
    size = data.reference_size
    jobs = []  # (record index, subject index, crop, prompt, seed)
    for r, record in enumerate(records):
        image = open_image(record["image"])
        for s, subject in enumerate(record["subjects"]):
            seed = ctx.seed_for(record["sample_id"], s)
            prompt = prompts.reference_edit(schemas.phrase(subject["category"]), seed % len(prompts.REFERENCE_EDITS))
            jobs.append((r, s, square(crop(image, subject["box"]), size), prompt, seed))
    outputs = []
    for chunk in batches(jobs, data.batch_size):
        with torch.inference_mode():
            outputs += pipe(
                image=[j[2] for j in chunk], prompt=[j[3] for j in chunk], height=size, width=size,
                num_inference_steps=data.i2i_steps, guidance_scale=data.guidance_scale,
                generator=cpu_generators([j[4] for j in chunk]), max_area=size * size, _auto_resize=False,
                output_type="pil",
            ).images
    subjects = [[dict(s) for s in record["subjects"]] for record in records]
    result = StageResult()
    for (r, s, crop_image, prompt, _), reference in zip(jobs, outputs):
        stem = f"{records[r]['sample_id']}_{s + 1:02d}"
        result.images[f"{stem}_crop.png"] = crop_image
        result.images[f"{stem}_ref.png"] = reference.convert("RGB")
        subjects[r][s].update(crop=ctx.ref(f"{stem}_crop.png"), reference=ctx.ref(f"{stem}_ref.png"),
                              reference_prompt=prompt)
    result.records = [child(record, subjects=subs) for record, subs in zip(records, subjects)]
    return result
