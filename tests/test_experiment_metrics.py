"""Ground-truth image metrics on hand-made images: a perfect image scores 1, a blank one 0, a swapped one low."""
import numpy as np
import pytest
from PIL import Image

from music_dagster.experiment.metrics import (
    across_runs, interval, paired_gap, score_image, score_plan, summarise,
)
from music_dagster.model.procedural import BACKGROUND, COLOURS, procedural_samples

# Three subjects on an 8x8 grid: ids 1..3 own a 2x2, a 3x3 and a 2x2 box.
LAYOUT = np.zeros((8, 8), np.int64)
LAYOUT[0:2, 0:2] = 1
LAYOUT[3:6, 3:6] = 2
LAYOUT[6:8, 6:8] = 3
SUBJECTS = [{"id": 1, "colour": "red", "texture": "plain", "category": "circle"},
            {"id": 2, "colour": "blue", "texture": "striped", "category": "square"},
            {"id": 3, "colour": "yellow", "texture": "plain", "category": "triangle"}]
TRUTH_COT = "[1] is a red circle at the top left. [2] is a blue square at the center. [3] is a yellow triangle."


def paint(layout, looks, size=64, background=BACKGROUND):
    """An image of `size` px: each subject's cells filled with its colour (dark every other row when striped)."""
    image = np.full((size, size, 3), background, np.float64)
    cell = size // layout.shape[0]
    for sid, (colour, texture) in looks.items():
        for r, c in zip(*np.nonzero(layout == sid)):
            block = np.ones((cell, cell, 3)) * np.asarray(COLOURS[colour], np.float64)
            if texture == "striped":
                block[1::2] *= 0.45
            image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = block
    return Image.fromarray(image.astype(np.uint8))


def looks_of(subjects):
    return {s["id"]: (s["colour"], s["texture"]) for s in subjects}


def scores(image, subjects=SUBJECTS, layout=LAYOUT):
    rows = score_image(image, layout, subjects)
    return {m: np.mean([r[m] for r in rows]) for m in ("placement", "identity", "hallucination")}


def test_perfect_image_scores_one_and_blank_scores_zero():
    assert scores(paint(LAYOUT, looks_of(SUBJECTS))) == {"placement": 1.0, "identity": 1.0, "hallucination": 0.0}
    assert scores(paint(LAYOUT, {})) == {"placement": 0.0, "identity": 0.0, "hallucination": 0.0}
    # Any resolution: the grid is mapped onto the image's own pixels.
    assert scores(paint(LAYOUT, looks_of(SUBJECTS), size=32))["placement"] == 1.0


def test_swapped_colours_score_low_and_a_wrong_texture_costs_identity_only():
    rotated = {1: ("blue", "striped"), 2: ("yellow", "plain"), 3: ("red", "plain")}  # each box has another's look
    assert scores(paint(LAYOUT, rotated))["placement"] == 0.0
    flipped = {1: ("red", "striped"), 2: ("blue", "plain"), 3: ("yellow", "plain")}
    got = scores(paint(LAYOUT, flipped))
    assert got["placement"] == 1.0 and got["identity"] == pytest.approx(1 / 3)


def test_subject_colour_outside_every_box_is_hallucination():
    stray = LAYOUT.copy()
    stray[0, 7] = stray[1, 7] = 9  # two background cells painted red
    looks = {**looks_of(SUBJECTS), 9: ("red", "plain")}
    rows = {r["subject"]: r for r in score_image(paint(stray, looks), LAYOUT, SUBJECTS)}
    background_cells = int((LAYOUT == 0).sum())
    assert rows[1]["hallucination"] == pytest.approx(2 / background_cells)
    assert rows[2]["hallucination"] == rows[3]["hallucination"] == 0.0
    assert rows[1]["placement"] == 1.0


def test_the_worlds_own_targets_score_perfectly():
    for sample in procedural_samples(30, seed=0):
        rows = score_image(sample.target, sample.layout, sample.meta["subjects"])
        assert [(r["placement"], r["identity"], r["hallucination"]) for r in rows] == [(1.0, 1.0, 0.0)] * len(rows)


def test_plan_scores():
    perfect = score_plan(TRUTH_COT, LAYOUT, LAYOUT, SUBJECTS)
    assert all(r["cot_colour"] == r["cot_shape"] == r["layout_cells"] == 1.0 for r in perfect)
    wrong = score_plan("[1] is a blue square. [2] is a red circle.", np.zeros((8, 8), np.int64), LAYOUT, SUBJECTS)
    assert all(r["cot_colour"] == r["cot_shape"] == r["layout_cells"] == 0.0 for r in wrong)
    unparsed = score_plan(TRUTH_COT, None, LAYOUT, SUBJECTS)
    assert [r["layout_cells"] for r in unparsed] == [0.0] * 3
    half = LAYOUT.copy()
    half[3:6, 3] = 0  # one column of subject 2's three lost
    assert score_plan(TRUTH_COT, half, LAYOUT, SUBJECTS)[1]["layout_cells"] == pytest.approx(2 / 3)
    no_layout = score_plan(TRUTH_COT, None, LAYOUT, SUBJECTS, writes_layout=False)
    assert all("layout_cells" not in r and r["cot_colour"] == 1.0 for r in no_layout)
    assert all(set(r) == {"subject", "layout_cells"} for r in score_plan("", LAYOUT, LAYOUT, SUBJECTS,
                                                                        writes_cot=False))


def test_intervals_and_summaries():
    assert interval([[1.0, 1.0], [1.0]]) == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 3}
    assert interval([]) == {"mean": None, "lo": None, "hi": None, "n": 0}
    mixed = interval([[1.0, 0.0], [1.0], [0.0, 0.0, 1.0]] * 10)
    assert mixed["mean"] == pytest.approx(0.5) and mixed["lo"] < 0.5 < mixed["hi"] and mixed["n"] == 60
    assert interval([[1.0, 0.0]] * 5, seed=1) == interval([[1.0, 0.0]] * 5, seed=1)
    rows = [{"sample": "a", "count": 2, "subject": 1, "placement": 1.0},
            {"sample": "a", "count": 2, "subject": 2, "placement": 0.0},
            {"sample": "b", "count": 3, "subject": 1, "placement": 1.0, "cot_colour": 1.0}]
    summary = summarise(rows)
    assert set(summary) == {"placement", "cot_colour"}
    assert summary["placement"]["overall"]["mean"] == pytest.approx(2 / 3)
    assert summary["placement"]["by_count"]["2"]["mean"] == 0.5 and summary["placement"]["by_count"]["3"]["n"] == 1
    better = [{**r, "placement": 1.0} for r in rows]
    gap = paired_gap(better, rows, "placement")
    assert gap["mean"] == pytest.approx(1 / 3) and gap["n"] == 3


def test_an_interval_over_runs_is_students_t():
    """Three runs 0.1, 0.2, 0.3: mean 0.2, standard deviation 0.1, t(0.975, 2 df) = 4.30265, so the interval is
    0.2 -+ 4.30265 * 0.1 / sqrt(3) = 0.2 -+ 0.24841. One run has no interval."""
    pooled = across_runs([0.1, 0.2, 0.3])
    assert pooled["n"] == 3 and pooled["mean"] == pytest.approx(0.2)
    assert (pooled["lo"], pooled["hi"]) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    assert across_runs([0.4]) == {"mean": 0.4, "lo": None, "hi": None, "n": 1}
