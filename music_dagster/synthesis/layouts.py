"""Stage 8, `grid_layouts`: each subject's region (mask or box, as `subject_masks` chose) becomes cells of the
`data.grid` x `data.grid` layout with the dynamic threshold tau_i = lambda * mean IoU (`music_dagster.model.layout`);
the layout is stored as a grid of subject ids (1-based, subject order), as text, and as a PNG overlay."""
from __future__ import annotations

from music_dagster.model.layout import compute_layout, layout_to_text, render_overlay
from music_dagster.synthesis.common import OpenImage, ShardContext, StageResult, child

STAGE = "grid_layouts"


def read_mask(open_image: OpenImage, ref: str):
    """A stored mask PNG as a boolean array."""
    import numpy as np

    return np.asarray(open_image(ref))[..., 0] > 127


def grid_layouts(ctx: ShardContext, data, records: list[dict], open_image: OpenImage) -> StageResult:
    result = StageResult()
    for record in records:
        regions = [read_mask(open_image, s["mask"]) if s["region"] == "mask" else s["box"]
                   for s in record["subjects"]]
        layout = compute_layout(regions, grid=data.grid, lam=data.lam)
        name = f"{record['sample_id']}_layout.png"
        result.images[name] = render_overlay(open_image(record["image"]), layout.grid,
                                             [s["category"] for s in record["subjects"]])
        result.records.append(child(
            record, layout=layout.grid.tolist(), layout_text=layout_to_text(layout.grid), overlay=ctx.ref(name),
            tau=[round(float(t), 9) for t in layout.tau]))
    return result
