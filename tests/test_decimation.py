"""Subject-count decimation: counts, removal order, ids consistent across subjects, instruction, CoT and layout."""
import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from music_dagster.errors import UserError
from music_dagster.model.layout import grid_layout
from music_dagster.synthesis.decimation import DecimationError, TAG, decimate, tags_in


def _sample():
    subjects = [
        {"id": 1, "category": "dog", "box": [0.0, 0.0, 0.5, 0.5], "reference": "ref/1.png"},  # area 0.25
        {"id": 2, "category": "ball", "box": [0.6, 0.6, 0.7, 0.7], "reference": "ref/2.png"},  # 0.01
        {"id": 3, "category": "tree", "box": [0.5, 0.0, 1.0, 0.8], "reference": "ref/3.png"},  # 0.40
        {"id": 4, "category": "cat", "box": [0.1, 0.6, 0.4, 0.9], "reference": "ref/4.png"},  # 0.09
    ]
    return {
        "sample_id": "s0",
        "subjects": subjects,
        "instruction": "Show [1] chasing [2] under [3], with [4] watching.",
        "cot": "[3] stands on the right. [1] runs after [2]; [4] sits at the bottom left and looks at [1].",
        "layout": grid_layout([s["box"] for s in subjects]).tolist(),
    }


def _untag(sample):
    """Both texts with every tag replaced by its subject's category: what decimation must preserve."""
    names = {s["id"]: s["category"] for s in sample["subjects"]}
    return tuple(TAG.sub(lambda m: names[int(m.group(1))], sample[k]) for k in ("instruction", "cot"))


def test_counts_and_removal_order():
    sample = _sample()
    out = decimate(sample)
    assert [len(o["subjects"]) for o in out] == [4, 3, 2]
    assert [[s["category"] for s in o["subjects"]] for o in out] == [
        ["dog", "ball", "tree", "cat"], ["dog", "tree", "cat"], ["dog", "tree"]]
    assert [len(o["subjects"]) for o in decimate(sample, min_subjects=1)] == [4, 3, 2, 1]
    assert decimate(sample, min_subjects=5) == []


def test_ids_renumbered_consistently():
    sample = _sample()
    three = decimate(sample)[1]  # ball (2) removed: dog 1, tree 3 -> 2, cat 4 -> 3
    assert [s["id"] for s in three["subjects"]] == [1, 2, 3]
    assert three["instruction"] == "Show [1] chasing ball under [2], with [3] watching."
    assert three["cot"] == "[2] stands on the right. [1] runs after ball; [3] sits at the bottom left and looks at [1]."
    assert [s["reference"] for s in three["subjects"]] == ["ref/1.png", "ref/3.png", "ref/4.png"]
    old, new = np.array(sample["layout"]), np.array(three["layout"])
    assert (new[old == 2] == 0).all()  # the removed subject's cells are background
    for o, n in ((1, 1), (3, 2), (4, 3)):
        np.testing.assert_array_equal(new == n, old == o)
    two = decimate(sample)[2]
    assert two["instruction"] == "Show [1] chasing ball under [2], with cat watching."
    assert set(np.unique(two["layout"])) <= {0, 1, 2}
    assert two["sample_id"] == "s0"  # other keys are carried over (the caller gives new ids)


def test_pure():
    sample = _sample()
    before = copy.deepcopy(sample)
    out = decimate(sample)
    out[0]["subjects"][0]["category"] = "changed"
    assert sample == before


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s["subjects"][1].update(id=7), "ids must be 1..4"),
    (lambda s: s.update(cot=s["cot"] + " [5]"), r"cot tags unknown subject \[5\]"),
    (lambda s: s["layout"][0].__setitem__(0, 9), "outside 0..4"),
    (lambda s: s["layout"].pop(), "square grid"),
    (lambda s: s["layout"][0].pop(), "square grid"),
    (lambda s: s["subjects"][0].update(box=[0, 0, "x", 1]), "box must be 4 numbers"),
    (lambda s: s["subjects"][0].update(category=""), "no category"),
    (lambda s: s.update(subjects=[]), "non-empty list"),
    (lambda s: s.update(instruction=None), "instruction must be a string"),
])
def test_bad_samples(mutate, match):
    sample = _sample()
    mutate(sample)
    with pytest.raises(DecimationError, match=match) as e:
        decimate(sample)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


_WORDS = st.sampled_from(["the", "left", "near", "above", "holds", "a", "bright", "."])


@st.composite
def _samples(draw):
    n = draw(st.integers(1, 12))
    subjects = []
    for i in range(1, n + 1):
        x1, y1 = draw(st.floats(0, 0.9)), draw(st.floats(0, 0.9))
        w, h = draw(st.floats(0.01, 1 - x1)), draw(st.floats(0.01, 1 - y1))
        subjects.append({"id": i, "category": draw(st.sampled_from(["dog", "cat", "cup", "vase", "hat"])),
                         "box": [x1, y1, x1 + w, y1 + h], "region": f"m/{i}.png"})
    texts = []
    for _ in range(2):
        tokens = draw(st.lists(st.one_of(_WORDS, st.integers(1, n).map(lambda i: f"[{i}]")), max_size=30))
        texts.append(" ".join(tokens))
    order = draw(st.permutations(subjects))  # list order must not matter, only ids
    layout = grid_layout([s["box"] for s in subjects]).tolist()
    return {"subjects": list(order), "instruction": texts[0], "cot": texts[1], "layout": layout}


@settings(max_examples=150, deadline=None)
@given(_samples(), st.integers(1, 3))
def test_decimation_invariants(sample, min_subjects):
    n = len(sample["subjects"])
    out = decimate(sample, min_subjects)
    assert [len(o["subjects"]) for o in out] == list(range(n, min_subjects - 1, -1))
    by_id = {s["id"]: s for s in sample["subjects"]}
    old_layout = np.array(sample["layout"])
    prev_regions = None
    for item in out:
        k = len(item["subjects"])
        assert [s["id"] for s in item["subjects"]] == list(range(1, k + 1))
        for key in ("instruction", "cot"):
            assert set(tags_in(item[key])) <= set(range(1, k + 1))
        assert _untag(item) == _untag(sample)  # every tag still names the same subject (or is its category)
        layout = np.array(item["layout"])
        assert layout.min() >= 0 and layout.max() <= k
        regions = {s["region"] for s in item["subjects"]}
        for s in item["subjects"]:
            old_id = int(s["region"][2:-4])
            assert s["category"] == by_id[old_id]["category"] and s["box"] == by_id[old_id]["box"]
            np.testing.assert_array_equal(layout == s["id"], old_layout == old_id)
        removed = [i for i in by_id if f"m/{i}.png" not in regions]
        assert all((layout[old_layout == i] == 0).all() for i in removed)
        if prev_regions is not None:
            # Exactly one subject left at this step, and none bigger than any kept one.
            gone = prev_regions - regions
            assert len(gone) == 1
            gone_area = _area(by_id[int(next(iter(gone))[2:-4])])
            assert all(_area(s) >= gone_area for s in item["subjects"])
        prev_regions = regions


def _area(s):
    x1, y1, x2, y2 = s["box"]
    return (x2 - x1) * (y2 - y1)
