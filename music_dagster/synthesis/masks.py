"""Stage 7, `subject_masks`: SAM2 segments each box (box prompt); CLIP scores the masked region and the unmasked box
against the category text; the subject's region is its mask when Sim_mask > Sim_unmask, else its box."""
from __future__ import annotations

from music_dagster.synthesis import schemas
from music_dagster.synthesis.common import OpenImage, ShardContext, StageResult, batches, child, pixel_box
from music_dagster.zoo.clip_similarity import image_text_scores

STAGE = "subject_masks"
BACKGROUND = (127, 127, 127)  # what the masked crop shows outside the mask


def segment(segmenter, images: list, boxes: list[list[list[float]]], batch_size: int) -> list[list]:
    """Per image, one boolean HxW numpy mask per normalised box (SAM2, box prompts, single-mask output).

    SAM2's processor wants as many boxes in every image of a batch: shorter lists are padded with their own first
    box and the extra masks discarded."""
    import torch

    model, processor = segmenter.model, segmenter.processor
    out_masks: list[list] = []
    for chunk in batches(list(range(len(images))), batch_size):
        width = max(len(boxes[i]) for i in chunk)
        prompts = []
        for i in chunk:
            w, h = images[i].size
            px = [list(pixel_box(b, w, h)) for b in boxes[i]]
            prompts.append(px + [px[0]] * (width - len(px)))
        inputs = processor(images=[images[i] for i in chunk], input_boxes=prompts, return_tensors="pt")
        with torch.inference_mode():
            out = model(pixel_values=inputs["pixel_values"].to(segmenter.device, dtype=segmenter.dtype),
                        input_boxes=inputs["input_boxes"].to(segmenter.device),  # pixel coordinates stay float32
                        multimask_output=False)
        masks = processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"])
        for row, i in enumerate(chunk):
            out_masks.append([masks[row][b, 0].numpy().astype(bool) for b in range(len(boxes[i]))])
    return out_masks


def masked_crop(image, mask, box):
    """The box crop of `image` with everything outside `mask` replaced by a neutral grey."""
    import numpy as np
    from PIL import Image

    x1, y1, x2, y2 = pixel_box(box, *image.size)
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[~mask] = BACKGROUND
    return Image.fromarray(pixels[y1:y2, x1:x2])


def clip_text(category: str) -> str:
    return f"a photo of a {schemas.phrase(category)}"


def subject_masks(segmenter, clip, ctx: ShardContext, data, records: list[dict], open_image: OpenImage) -> StageResult:
    from PIL import Image

    images = [open_image(r["image"]) for r in records]
    masks = segment(segmenter, images, [[s["box"] for s in r["subjects"]] for r in records], data.batch_size)
    crops, texts, where = [], [], []
    for r, record in enumerate(records):
        for s, subject in enumerate(record["subjects"]):
            crops += [masked_crop(images[r], masks[r][s], subject["box"]), images[r].crop(
                pixel_box(subject["box"], *images[r].size))]
            texts += [clip_text(subject["category"])] * 2
            where.append((r, s))
    # normalised in the CLIP model's own dtype, as open_clip's `normalize=True` does (`clip_similarity`)
    sims = image_text_scores(clip, crops, texts, data.batch_size)
    result = StageResult()
    subjects = [[dict(s) for s in record["subjects"]] for record in records]
    for k, (r, s) in enumerate(where):
        sim_mask, sim_unmask = sims[2 * k], sims[2 * k + 1]
        mask = masks[r][s]
        name = f"{records[r]['sample_id']}_{s + 1:02d}_mask.png"
        result.images[name] = Image.fromarray(mask.astype("uint8") * 255)  # mode L
        # An empty mask cannot be a region, whatever CLIP says.
        region = "mask" if mask.any() and sim_mask > sim_unmask else "box"
        subjects[r][s].update(mask=ctx.ref(name), sim_mask=round(sim_mask, 6), sim_unmask=round(sim_unmask, 6),
                              region=region)
    result.records = [child(record, subjects=subs) for record, subs in zip(records, subjects)]
    return result
