"""`music demo web`: a Gradio page over `MusicPipeline` where the plan can be read, edited and redrawn.

Upload 1..12 subjects, write an instruction, pick a branch count and Generate: the page shows the kept branch's CoT,
its layout as a coloured 8x8 grid of subject ids, every branch with its CLIP score, and the kept image. Edit the
CoT or the layout (one text row per grid row, ids separated by spaces) and "Redraw with this plan" draws that plan
(`pipe(..., plan={"cot": ..., "layout": ...})`: planning skipped). A bad request (not an image, 13 subjects, an
empty prompt, a layout that does not fit) is shown as its one-line `UserError` in the page, never a traceback.

gradio is the optional `demo` extra (`make demo-web` installs it) and is imported inside functions.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from music_dagster.config import MAX_SUBJECTS
from music_dagster.errors import UserError
from music_dagster.model.generate import PlanError, check_layout

if TYPE_CHECKING:  # pragma: no cover
    from music_dagster.model.pipeline import MusicPipeline, MusicPipelineOutput

# One colour per subject id (0 = background), readable under black text; 12 subjects at most.
PALETTE = ["#e6e6e6", "#ff9f9f", "#9fd0ff", "#a8e6a1", "#ffd27f", "#d5a6ff", "#7fe0d8",
           "#ffb3e0", "#c9c27a", "#a0b4ff", "#ffc4a3", "#b8f09a", "#f0a0a0"]


class DemoError(UserError):
    """The web demo cannot start: gradio is not installed."""


def layout_text(layout) -> str:
    """The grid as the page's editable text: one line per row, ids separated by spaces."""
    return "\n".join(" ".join(str(int(v)) for v in row) for row in np.asarray(layout))


def parse_layout(text: str, subjects: int, grid: int) -> np.ndarray:
    """The page's layout text as a checked `grid x grid` array (`check_layout`); a one-line PlanError otherwise."""
    rows = []
    for r, line in enumerate(line for line in text.strip().splitlines() if line.strip()):
        cells = line.replace(",", " ").split()
        bad = [c for c in cells if not c.isdigit()]
        if bad:
            raise PlanError(f"layout: row {r} holds {bad[0]!r}, not a subject id (0 = background, 1..{subjects})")
        rows.append([int(c) for c in cells])
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
    text, coloured grid, branch gallery, kept image; on a UserError only the status changes."""

    def __init__(self, pipe: MusicPipeline):
        self.pipe = pipe

    def _show(self, out: MusicPipelineOutput) -> tuple:
        best = out.plans[out.best]
        layout = best["layout"]
        gallery = [(im, f"branch {i}: CLIP {score:.4f}{' (kept)' if i == out.best else ''}")
                   for i, (im, score) in enumerate(zip(out.images, out.scores))]
        status = (f"Branch {out.best} of {len(out.images)} kept (plan: {out.result.plan_source})."
                  + ("" if layout is not None else " Its layout did not parse: write one and redraw."))
        return (_message(status), best["cot"], layout_text(layout) if layout is not None else "",
                grid_html(layout) if layout is not None else "", gallery, out.images[out.best])

    def _run(self, files, prompt: str, branches, seed, plan: dict | None) -> tuple:
        return self._show(self.pipe(subjects=_paths(files), prompt=prompt or "", branches=int(branches),
                                    plan=plan, generator=int(seed)))

    def generate(self, files, prompt, branches, seed) -> tuple:
        """The model's own plans."""
        return self._run(files, prompt, branches, seed, plan=None)

    def redraw(self, files, prompt, branches, seed, cot, layout) -> tuple:
        """The plan as edited on the page: the CoT box and the layout text."""
        grid = self.pipe.generator.model.settings.grid
        plan = {"cot": cot or "", "layout": parse_layout(layout or "", len(_paths(files)), grid).tolist()}
        return self._run(files, prompt, branches, seed, plan=plan)

    def preview(self, files, layout) -> str:
        """The coloured grid for the layout text as it is typed (the problem instead while it does not fit)."""
        try:
            return grid_html(parse_layout(layout or "", len(_paths(files)), self.pipe.generator.model.settings.grid))
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
                    "Subject ids follow the upload order (1 = first file). Edit the CoT or the layout grid "
                    "(one line per row, 0 = background) and redraw.")
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
                cot = gr.Textbox(label="CoT (editable)", lines=4, elem_id="cot")
                layout = gr.Textbox(label="Layout (editable: 8 rows of subject ids)", lines=8, elem_id="layout")
                preview = gr.HTML(elem_id="layout-preview")  # the layout as typed; #grid is the one drawn
                redraw = gr.Button("Redraw with this plan", elem_id="redraw")
            with gr.Column():
                grid = gr.HTML(label="Layout drawn", elem_id="grid")
                chosen = gr.Image(label="Kept image", type="pil", elem_id="chosen", interactive=False, height=320)
                gallery = gr.Gallery(label="Branches (CLIP score)", columns=4, elem_id="branches-gallery")
        outputs = [status, cot, layout, grid, gallery, chosen]
        generate.click(_guarded(demo.generate, len(outputs)), [files, prompt, branches, seed], outputs)
        redraw.click(_guarded(demo.redraw, len(outputs)), [files, prompt, branches, seed, cot, layout], outputs)
        layout.input(demo.preview, [files, layout], preview)
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
