"""`music demo web`: a Gradio page over `MusicPipeline` where the plan can be read, edited and redrawn.

Upload 1..12 subjects, write an instruction, pick a branch count and Generate: the page shows the kept branch's CoT,
its layout as a coloured 8x8 grid of subject ids, every branch with its CLIP score, and the kept image. Edit the
CoT, or reassign cells of the layout grid (an editable 8x8 table of subject ids, its coloured preview redrawn at
each edit), and "Redraw with this plan" draws that plan (`pipe(..., plan={"cot": ..., "layout": ...})`: planning
skipped; the layout alone for a checkpoint trained without the CoT). A bad request (not an image, 13 subjects, an
empty prompt, a cell that is not a subject id, a plan part the checkpoint was never trained to write) is shown as
its one-line `UserError` in the page, never a traceback.

gradio is the optional `demo` extra (`make demo-web` installs it) and is imported inside functions.
"""
from __future__ import annotations

import html
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from music_dagster.config import MAX_SUBJECTS, plan_parts
from music_dagster.errors import UserError
from music_dagster.model.generate import PlanError, check_layout

if TYPE_CHECKING:  # pragma: no cover
    from music_dagster.model.pipeline import MusicPipeline, MusicPipelineOutput

# One colour per subject id (0 = background), readable under black text; 12 subjects at most.
PALETTE = ["#e6e6e6", "#ff9f9f", "#9fd0ff", "#a8e6a1", "#ffd27f", "#d5a6ff", "#7fe0d8",
           "#ffb3e0", "#c9c27a", "#a0b4ff", "#ffc4a3", "#b8f09a", "#f0a0a0"]


class DemoError(UserError):
    """The web demo cannot start: gradio is not installed."""


def layout_cells(layout) -> list[list[str]]:
    """The grid as the page's editable table: rows of subject ids, as text (what the table edits)."""
    return [[str(int(v)) for v in row] for row in np.asarray(layout)]


def parse_layout(cells, subjects: int, grid: int) -> np.ndarray:
    """The page's table (rows of cells, each a subject id as text) as a checked `grid x grid` array
    (`check_layout`); a one-line PlanError otherwise."""
    rows = []
    for r, row in enumerate(cells or []):
        ids = []
        for c, cell in enumerate(row):
            text = str(cell).strip()
            if not (text.isascii() and text.isdigit()):
                raise PlanError(f"layout: cell (row {r}, column {c}) holds {text!r}, not a subject id "
                                f"(0 = background, 1..{subjects})")
            ids.append(int(text))
        rows.append(ids)
    return check_layout(rows, subjects, grid, "layout")


def grid_html(layout) -> str:
    """The layout as a table of coloured cells, each showing its subject id (`data-row`, `data-col`, `data-id`)."""
    cells = []
    for r, row in enumerate(np.asarray(layout)):
        tds = "".join(f'<td data-row="{r}" data-col="{c}" data-id="{int(v)}" style="background:'
                      f'{PALETTE[int(v) % len(PALETTE)]};width:2.2em;height:2.2em;text-align:center;'
                      f'color:#000;border:1px solid #fff">{int(v)}</td>' for c, v in enumerate(row))
        cells.append(f"<tr>{tds}</tr>")
    return f'<table class="layout-grid" style="border-collapse:collapse">{"".join(cells)}</table>'


def _message(text: str, error: bool = False) -> str:
    colour = "#b00020" if error else "#1b5e20"
    return f'<p class="demo-status" style="color:{colour}">{"Error: " if error else ""}{html.escape(text)}</p>'


def _paths(files) -> list[str]:
    """gradio's file values (paths, or objects with `.name`) as paths."""
    return [f if isinstance(f, (str, os.PathLike)) else f.name for f in (files or [])]


class WebDemo:
    """The page's two actions over one loaded pipeline. Each returns the page's outputs: status, CoT, layout
    table, coloured grid, branch gallery, kept image; on a UserError only the status changes."""

    def __init__(self, pipe: MusicPipeline):
        self.pipe = pipe
        self.grid = pipe.generator.model.settings.grid

    def blank(self) -> list[list[str]]:
        """The table before a layout exists: every cell background, for the user to paint subjects on."""
        return layout_cells(np.zeros((self.grid, self.grid), np.int64))

    def _show(self, out: MusicPipelineOutput) -> tuple:
        best = out.plans[out.best]
        layout = best["layout"]
        gallery = [(im, f"branch {i}: CLIP {score:.4f}{' (kept)' if i == out.best else ''}")
                   for i, (im, score) in enumerate(zip(out.images, out.scores))]
        status = f"Branch {out.best} of {len(out.images)} kept (plan: {out.result.plan_source})."
        if layout is None:
            status += (" Its layout did not parse: set subject ids in the grid and redraw."
                       if plan_parts(self.pipe.ablation)[1] else
                       f" This checkpoint (train.ablation {self.pipe.ablation}) writes no layout.")
        return (_message(status), best["cot"], layout_cells(layout) if layout is not None else self.blank(),
                grid_html(layout) if layout is not None else "", gallery, out.images[out.best])

    def _run(self, files, prompt: str, branches, seed, plan: dict | None) -> tuple:
        return self._show(self.pipe(subjects=_paths(files), prompt=prompt or "", branches=int(branches),
                                    plan=plan, generator=int(seed)))

    def generate(self, files, prompt, branches, seed) -> tuple:
        """The model's own plans."""
        return self._run(files, prompt, branches, seed, plan=None)

    def redraw(self, files, prompt, branches, seed, cot, layout) -> tuple:
        """The plan as edited on the page: the CoT box (unless the checkpoint writes no CoT: the layout is then
        the whole plan) and the layout table."""
        plan = {"layout": parse_layout(layout, len(_paths(files)), self.grid).tolist()}
        if plan_parts(self.pipe.ablation)[0]:
            plan["cot"] = cot or ""
        return self._run(files, prompt, branches, seed, plan=plan)

    def preview(self, files, layout) -> str:
        """The coloured grid for the layout table as it is edited (the problem instead while it does not fit)."""
        try:
            return grid_html(parse_layout(layout, len(_paths(files)), self.grid))
        except UserError as e:
            return _message(str(e), error=True)


def _guarded(action, outputs: int):
    """`action` with a UserError shown as the status line and every other output left as it is."""
    import gradio as gr

    def run(*args):
        try:
            return action(*args)
        except UserError as e:
            return (_message(str(e), error=True),) + tuple(gr.skip() for _ in range(outputs - 1))
    return run


def _gradio():
    try:
        import gradio
    except ImportError:
        raise DemoError("the web demo needs gradio: run `make demo-web` (pip install -e '.[demo]')") from None
    return gradio


def build_app(pipe: MusicPipeline):
    """The Gradio Blocks of the demo."""
    gr = _gradio()
    demo = WebDemo(pipe)
    with gr.Blocks(title="MUSIC web demo") as app:
        gr.Markdown("# MUSIC: multi-subject generation with a plan you can edit\n"
                    "Subject ids follow the upload order (1 = first file). Edit the CoT, or double-click a cell of "
                    "the layout grid and type another subject id (0 = background), then redraw.")
        with gr.Row():
            with gr.Column():
                files = gr.File(label=f"Subjects (1-{MAX_SUBJECTS} images)", file_count="multiple", type="filepath",
                                elem_id="subjects")
                prompt = gr.Textbox(label="Instruction", placeholder="put the hat [2] on the dog [1]",
                                    elem_id="prompt")
                with gr.Row():
                    branches = gr.Slider(1, 8, value=2, step=1, label="Branches", elem_id="branches")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.HTML(elem_id="status")
                writes_cot = plan_parts(pipe.ablation)[0]
                cot = gr.Textbox(label="CoT (editable)" if writes_cot else
                                 f"CoT (none: the checkpoint was trained with train.ablation {pipe.ablation})",
                                 lines=4, interactive=writes_cot, elem_id="cot")
                with warnings.catch_warnings():
                    # A fixed grid x grid table: gradio 6's table honours only the (count, "fixed") form, which it
                    # marks deprecated for rows (its `row_limits` is "not yet implemented").
                    warnings.filterwarnings("ignore", "Passing a tuple to 'row_count'", DeprecationWarning)
                    layout = gr.Dataframe(value=demo.blank(), headers=[str(c) for c in range(demo.grid)],
                                          row_count=(demo.grid, "fixed"), column_count=(demo.grid, "fixed"),
                                          datatype="str", type="array", interactive=True, elem_id="layout",
                                          label="Layout (double-click a cell, type a subject id, Enter)")
                preview = gr.HTML(elem_id="layout-preview")  # the layout as edited; #grid is the one drawn
                redraw = gr.Button("Redraw with this plan", elem_id="redraw")
            with gr.Column():
                grid = gr.HTML(label="Layout drawn", elem_id="grid")
                chosen = gr.Image(label="Kept image", type="pil", elem_id="chosen", interactive=False, height=320)
                gallery = gr.Gallery(label="Branches (CLIP score)", columns=4, elem_id="branches-gallery")
        outputs = [status, cot, layout, grid, gallery, chosen]
        generate.click(_guarded(demo.generate, len(outputs)), [files, prompt, branches, seed], outputs)
        redraw.click(_guarded(demo.redraw, len(outputs)), [files, prompt, branches, seed, cot, layout], outputs)
        layout.change(demo.preview, [files, layout], preview)
    return app


def cli_demo_web(args) -> None:
    """`music demo web`: load the checkpoint (one line if it is missing or damaged), then serve the page on
    127.0.0.1 until Ctrl-C."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reporting
    import torch

    from music_dagster.config import default_config
    from music_dagster.model.pipeline import MusicPipeline
    from music_dagster.model.runtime import lora_dir

    config = default_config()
    _gradio()  # checked before the models load
    torch.set_num_threads(config.profile.torch_threads)
    checkpoint = Path(args.checkpoint) if args.checkpoint else lora_dir(config)
    pipe = MusicPipeline.from_pretrained(checkpoint, config)
    pipe.set_progress_bar_config(disable=True)
    app = build_app(pipe)
    print(f"music demo web: serving {checkpoint} on http://127.0.0.1:{args.port} (Ctrl-C stops)", flush=True)
    app.launch(server_name="127.0.0.1", server_port=args.port, share=False, inbrowser=False, quiet=True)
