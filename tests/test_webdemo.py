"""The web demo's actions without a browser or gradio: the layout table read back cell by cell, and the plan a redraw
hands the pipeline for each checkpoint's `train.ablation` (the browser test is tests/e2e/test_web_demo.py)."""
import types

import numpy as np
import pytest

from music_dagster.model.generate import PlanError
from music_dagster.webdemo import WebDemo, layout_cells, parse_layout


class RecordingPipe:
    """What `WebDemo` reads of a `MusicPipeline`: its grid, its ablation, and a call (recorded, then refused)."""

    def __init__(self, ablation: str):
        self.ablation = ablation
        self.generator = types.SimpleNamespace(model=types.SimpleNamespace(settings=types.SimpleNamespace(grid=8)))
        self.plans = []

    def __call__(self, plan, **request):
        self.plans.append(plan)
        raise PlanError("recorded")


def _layout() -> np.ndarray:
    layout = np.zeros((8, 8), np.int64)
    layout[0, :2], layout[7, 7] = 1, 2
    return layout


def test_the_table_round_trips_and_a_bad_cell_is_one_line():
    cells = layout_cells(_layout())
    assert cells[0][:3] == ["1", "1", "0"] and all(isinstance(v, str) for row in cells for v in row)
    assert np.array_equal(parse_layout(cells, 2, 8), _layout())
    for value, message in (("x", r"cell \(row 0, column 0\) holds 'x', not a subject id"),
                           ("", r"cell \(row 0, column 0\) holds '', not a subject id"),
                           ("-1", r"holds '-1', not a subject id"),
                           ("3", r"cell \(row 0, column 0\) holds id 3, not among the 2 subject\(s\)")):
        bad = [row[:] for row in cells]
        bad[0][0] = value
        with pytest.raises(PlanError, match=message):
            parse_layout(bad, 2, 8)
    with pytest.raises(PlanError, match="the layout grid is 7x8, expected 8x8"):
        parse_layout(cells[:7], 2, 8)


@pytest.mark.parametrize("ablation, plan_keys", [("none", ["cot", "layout"]), ("no_cot", ["layout"])])
def test_a_redraw_gives_the_pipeline_the_parts_the_checkpoint_writes(ablation, plan_keys):
    pipe = RecordingPipe(ablation)
    with pytest.raises(PlanError, match="recorded"):
        WebDemo(pipe).redraw(["a.png", "b.png"], "a dog", 2, 0, "[1] a dog.", layout_cells(_layout()))
    (plan,) = pipe.plans
    assert sorted(plan) == plan_keys and plan["layout"] == _layout().tolist()
