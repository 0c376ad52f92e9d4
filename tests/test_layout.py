"""The grid layout of DESIGN "grid_layouts": hand-computed cases, the real boxes of shared/data/scenes, invariants."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from music_dagster.errors import UserError
from music_dagster.model.layout import (
    LayoutError, compute_layout, grid_layout, layout_from_text, layout_to_text, render_overlay,
)

SCENES = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenes" / "manifest.json"


def _ref_box_iou(box, grid):
    """Independent IoU: loops over patches with plain floats."""
    x1, y1, x2, y2 = box
    out = np.zeros((grid, grid))
    for r in range(grid):
        for c in range(grid):
            px1, py1, px2, py2 = c / grid, r / grid, (c + 1) / grid, (r + 1) / grid
            iw = max(0.0, min(x2, px2) - max(x1, px1))
            ih = max(0.0, min(y2, py2) - max(y1, py1))
            inter = iw * ih
            out[r, c] = inter / ((x2 - x1) * (y2 - y1) + (px2 - px1) * (py2 - py1) - inter)
    return out


def test_one_box_covering_a_quadrant():
    res = compute_layout([(0.0, 0.0, 0.5, 0.5)])
    expected = np.zeros((8, 8), int)
    expected[:4, :4] = 1
    np.testing.assert_array_equal(res.grid, expected)
    # 16 patches with IoU (1/64) / (1/4) = 1/16, the rest 0: tau = 0.05 * 16 * (1/16) / 64.
    assert res.ious[0, 0, 0] == pytest.approx(1 / 16)
    assert res.tau[0] == pytest.approx(0.05 / 64)
    assert res.rescued == ()


def test_two_overlapping_boxes_conflict_goes_to_highest_iou():
    # A = top-left quadrant; B = the 2x2 patches at its inner corner: there B's IoU is 1/4, A's is 1/16.
    grid = grid_layout([(0.0, 0.0, 0.5, 0.5), (0.25, 0.25, 0.5, 0.5)])
    expected = np.zeros((8, 8), int)
    expected[:4, :4] = 1
    expected[2:4, 2:4] = 2
    np.testing.assert_array_equal(grid, expected)


def test_equal_boxes_overlap_tie_goes_to_lower_id_when_areas_equal():
    grid = grid_layout([(0.0, 0.0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)])
    expected = np.zeros((8, 8), int)
    expected[2:6, 2:6] = 2
    expected[:4, :4] = 1  # the shared 2x2 block: both IoU 1/16, same area -> lower id
    np.testing.assert_array_equal(grid, expected)


@pytest.mark.parametrize("flip", [False, True])
def test_iou_tie_goes_to_the_smaller_subject(flip):
    # In patch units (1/8): A = [0,4]x[0,4] covers patch (3,3) fully: IoU 1/16. B = [3.5,6]x[3.5,4.8] (area 3.25)
    # covers a quarter of it: 0.25 / (3.25 + 1 - 0.25) = 1/16 as well. B is smaller, so B gets it in either order.
    a, b = (0.0, 0.0, 0.5, 0.5), (3.5 / 8, 3.5 / 8, 6 / 8, 4.8 / 8)
    res = compute_layout([b, a] if flip else [a, b])
    ib, ia = (0, 1) if flip else (1, 0)
    assert res.ious[ia, 3, 3] == res.ious[ib, 3, 3] == pytest.approx(1 / 16)
    assert res.grid[3, 3] == ib + 1


def test_tiny_box_inside_a_patch_still_owns_its_best_cell():
    tiny = (0.30, 0.30, 0.32, 0.32)  # inside patch (2, 2); IoU 0.0256 < the quadrant's 1/16 there
    res = compute_layout([(0.0, 0.0, 0.5, 0.5), tiny])
    assert res.grid[2, 2] == 2
    assert (res.grid == 2).sum() == 1
    assert res.rescued == ((2, 2, 2),)
    assert (res.grid == 1).sum() == 15


def test_rescue_never_takes_the_only_cell_of_another_subject():
    # Two tiny boxes in the same patch: the one with the larger IoU keeps the patch, the other takes its next best.
    res = compute_layout([(0.30, 0.30, 0.34, 0.34), (0.31, 0.31, 0.32, 0.32)])
    assert res.grid[2, 2] == 1
    assert (res.grid == 2).sum() == 1
    r, c = np.argwhere(res.grid == 2)[0]
    assert abs(r - 2) + abs(c - 2) == 1  # a neighbour, the nearest patch centre among the zero-IoU patches


def test_mask_uses_pixel_iou():
    mask = np.zeros((64, 64), bool)
    mask[10:30, 40:60] = True  # 400 px, patches are 8x8 px
    res = compute_layout([mask, (0.0, 0.0, 1.0, 1.0)])
    assert res.ious[0, 2, 6] == pytest.approx(64 / 400)  # patch fully inside
    assert res.ious[0, 1, 5] == pytest.approx(48 / (400 + 64 - 48))  # rows 10..15, cols 40..47
    assert res.ious[0, 3, 7] == pytest.approx(24 / (400 + 64 - 24))  # rows 24..29, cols 56..59
    expected = np.full((8, 8), 2)
    expected[1:4, 5:8] = 1
    np.testing.assert_array_equal(res.grid, expected)


def _scenes():
    data = json.loads(SCENES.read_text())
    for img in data["images"]:
        w, h = img["width"], img["height"]
        boxes = []
        for obj in img["objects"]:
            x1, y1, x2, y2 = obj["bbox_xyxy"]
            boxes.append((max(0.0, x1 / w), max(0.0, y1 / h), min(1.0, x2 / w), min(1.0, y2 / h)))
        yield img["file"], [b for b in boxes if b[2] > b[0] and b[3] > b[1]]


@pytest.mark.skipif(not SCENES.exists(), reason="shared/data/scenes not present")
def test_real_scene_boxes():
    lam = 0.05
    for name, boxes in _scenes():
        res = compute_layout(boxes, grid=8, lam=lam)
        n = len(boxes)
        assert set(np.unique(res.grid)) - {0} == set(range(1, n + 1)), name  # every subject owns >= 1 cell
        ref = np.stack([_ref_box_iou(b, 8) for b in boxes])
        np.testing.assert_allclose(res.ious, ref, atol=1e-9)
        np.testing.assert_allclose(res.tau, lam * ref.reshape(n, -1).mean(axis=1), rtol=1e-9)
        areas = np.array([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes])
        rescued = {(r, c): sid for sid, r, c in res.rescued}
        for r in range(8):
            for c in range(8):
                owner = res.grid[r, c]
                cands = [i for i in range(n) if ref[i, r, c] > res.tau[i] + 1e-12]
                if (r, c) in rescued:
                    assert rescued[(r, c)] == owner
                    continue
                if not cands:
                    assert owner == 0, (name, r, c)
                    continue
                best = max(ref[i, r, c] for i in cands)
                assert ref[owner - 1, r, c] == pytest.approx(best, abs=1e-9), (name, r, c)
                tied = [i for i in cands if abs(ref[i, r, c] - best) < 1e-9]
                assert areas[owner - 1] == min(areas[i] for i in tied)
        for sid, r, c in res.rescued:
            # A rescued subject had no cell of its own: it takes its best patch unless that was another's only cell.
            best = ref[sid - 1].max()
            if ref[sid - 1, r, c] < best - 1e-9:
                for rr, cc in np.argwhere(np.isclose(ref[sid - 1], best)):
                    other = res.grid[rr, cc]
                    assert other != sid and (res.grid == other).sum() == 1


@st.composite
def _regions(draw):
    grid = draw(st.integers(2, 8))
    n = draw(st.integers(1, min(12, grid * grid)))
    regions = []
    for _ in range(n):
        if draw(st.booleans()):
            x1, x2 = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2, unique=True)))
            y1, y2 = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2, unique=True)))
            assume(x2 - x1 > 1e-6 and y2 - y1 > 1e-6)
            regions.append((x1, y1, x2, y2))
        else:
            size = 16
            r1, r2 = sorted(draw(st.lists(st.integers(0, size), min_size=2, max_size=2, unique=True)))
            c1, c2 = sorted(draw(st.lists(st.integers(0, size), min_size=2, max_size=2, unique=True)))
            mask = np.zeros((size, size), bool)
            mask[r1:r2, c1:c2] = True
            regions.append(mask)
    return grid, regions


@settings(max_examples=150, deadline=None)
@given(_regions(), st.randoms(use_true_random=False))
def test_layout_invariants(case, rnd):
    grid, regions = case
    n = len(regions)
    res = compute_layout(regions, grid=grid)
    out = res.grid
    assert out.shape == (grid, grid) and np.issubdtype(out.dtype, np.integer)
    assert out.min() >= 0 and out.max() <= n
    assert set(np.unique(out)) - {0} == set(range(1, n + 1))
    np.testing.assert_array_equal(out, grid_layout(regions, grid=grid))  # deterministic
    # Input order only relabels (when no two regions have the same area, the only order-dependent tie-break).
    assume(len(set(np.round(res.areas, 12))) == n)
    perm = list(range(n))
    rnd.shuffle(perm)
    permuted = grid_layout([regions[i] for i in perm], grid=grid)
    relabel = np.zeros(n + 1, int)
    for new, old in enumerate(perm):
        relabel[new + 1] = old + 1
    np.testing.assert_array_equal(relabel[permuted], out)


@given(st.integers(1, 10).flatmap(lambda g: st.lists(st.lists(st.integers(0, 15), min_size=g, max_size=g),
                                                    min_size=g, max_size=g)))
def test_text_round_trip(rows):
    arr = np.array(rows)
    text = layout_to_text(arr)
    assert text.startswith("layout: ") and "\n" not in text
    np.testing.assert_array_equal(layout_from_text(text), arr)
    np.testing.assert_array_equal(layout_from_text(text.removeprefix("layout:")), arr)


def test_text_form():
    arr = np.zeros((8, 8), int)
    arr[0, 2:4] = 1
    arr[7, 7] = 12
    assert layout_to_text(arr) == "layout: 00110000 " + "00000000 " * 6 + "0000000c"


@pytest.mark.parametrize("text", ["", "layout:", "layout: 012 01", "layout: 0g 00", "layout: 00 00 00"])
def test_bad_text(text):
    with pytest.raises(LayoutError):
        layout_from_text(text)


def test_text_size_check_and_id_limit():
    with pytest.raises(LayoutError, match="expected 8x8"):
        layout_from_text("layout: 00 00", grid=8)
    with pytest.raises(LayoutError):
        layout_to_text(np.full((2, 2), 16))


@pytest.mark.parametrize("regions, match", [
    ([], "no regions"),
    ([(0.5, 0.1, 0.4, 0.9)], "region 1"),
    ([(0, 0, 1, 1), (0, 0, 1.2, 1)], "region 2"),
    ([(0, 0, float("nan"), 1)], "region 1"),
    ([np.zeros((16, 16), bool)], "mask is empty"),
    ([np.ones((4, 4), bool)], "smaller than"),
    ([np.ones((16, 16), np.uint8)], "boolean"),
    ([(0, 0, 1, 1)] * 65, "cannot each own"),
])
def test_bad_regions(regions, match):
    with pytest.raises(LayoutError, match=match) as e:
        grid_layout(regions)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_render_overlay():
    img = Image.new("RGB", (64, 48), (0, 0, 0))
    grid = grid_layout([(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)])
    out = render_overlay(img, grid, ["dog", "cat"])
    assert out.mode == "RGB" and out.size == img.size
    px = np.asarray(out).astype(int)
    assert px[20, 20].sum() > 0  # tinted (subject 1 cell, away from text)
    assert tuple(px[15, 60]) == (0, 0, 0)  # background cell interior (off the grid lines) stays untouched
    assert tuple(px[20, 20]) != tuple(px[44, 60])  # different subjects, different colours

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    assert png(out) == png(render_overlay(img, grid, ["dog", "cat"]))
