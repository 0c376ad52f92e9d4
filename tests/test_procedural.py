"""The procedural world: seeded, consistent ground truth, references that are not copies, the shard format."""
import hashlib

import numpy as np
import pytest

from music_dagster.model.music import Plan, plan_text, split_plan
from music_dagster.model.procedural import (
    COLOURS, REGIONS, ProceduralError, WorldSettings, make_sample, procedural_samples, score_plans, stated_looks,
    write_procedural_shard,
)


def _bytes(image) -> bytes:
    return np.asarray(image).tobytes()


def test_same_seed_same_samples_and_each_sample_depends_only_on_its_index():
    a = procedural_samples(6, seed=3)
    b = procedural_samples(6, seed=3)
    tail = procedural_samples(2, seed=3, start=4)
    for x, y in zip(a, b):
        assert x.instruction == y.instruction and x.cot == y.cot
        assert _bytes(x.target) == _bytes(y.target)
        assert [_bytes(r) for r in x.references] == [_bytes(r) for r in y.references]
    assert [s.id for s in tail] == [s.id for s in a[4:]]
    assert _bytes(tail[1].target) == _bytes(a[5].target)
    other = procedural_samples(6, seed=4)
    assert [s.cot for s in other] != [s.cot for s in a]


def test_ground_truth_is_consistent():
    world = WorldSettings()
    for i in range(40):
        raw = make_sample(0, i, world)
        n = len(raw["subjects"])
        assert world.min_subjects <= n <= world.max_subjects
        grid = np.asarray(raw["layout"])
        for s in raw["subjects"]:
            x1, y1, x2, y2 = (round(v * world.grid) for v in s["box"])
            # every subject owns exactly the cells of its (non-overlapping) box
            owned = np.argwhere(grid == s["id"])
            assert len(owned) == (x2 - x1) * (y2 - y1)
            assert owned[:, 0].min() == y1 and owned[:, 1].min() == x1
            tagged = f"[{s['id']}] {s['attributes']['size']} at the {s['attributes']['region']}"
            assert tagged in raw["instruction"]
            assert stated_looks(raw["cot"])[s["id"]] == (s["attributes"]["colour"], s["category"])
            # the shape is drawn in the target with its colour (stripes darken, never lighten)
            cell = world.image_size // world.grid
            target = np.asarray(raw["target"], np.float32)[y1 * cell:y2 * cell, x1 * cell:x2 * cell]
            rgb = np.asarray(COLOURS[s["attributes"]["colour"]], np.float32)
            assert (np.abs(target - rgb).sum(-1) < 3).sum() >= 4
        assert (grid == 0).sum() + sum((grid == s["id"]).sum() for s in raw["subjects"]) == grid.size
        assert {s["attributes"]["region"] for s in raw["subjects"]} <= set(REGIONS)


def test_references_are_transformed_not_copies():
    world = WorldSettings()
    for i in range(10):
        raw = make_sample(1, i, world)
        target = np.asarray(raw["target"], np.float32)
        cell = world.image_size // world.grid
        for s in raw["subjects"]:
            ref = np.asarray(s["reference"], np.float32)
            assert ref.shape == target.shape
            x1, y1, x2, y2 = (round(v * world.grid) * cell for v in s["box"])
            crop = target[y1:y2, x1:x2]
            side = y2 - y1
            # no window of the reference at the crop's size equals the crop
            best = min(np.abs(ref[r:r + side, c:c + side] - crop).mean()
                       for r in range(0, ref.shape[0] - side + 1, 2) for c in range(0, ref.shape[1] - side + 1, 2))
            assert best > 2.0


def test_shard_round_trip_is_byte_identical_and_reads_back(tmp_path):
    from music_dagster.training.train import collect_samples

    def digest(folder):
        h = hashlib.sha256()
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
        return h.hexdigest()

    a = write_procedural_shard(tmp_path / "a" / "training_samples" / "shard-0", 3, seed=5)
    b = write_procedural_shard(tmp_path / "b" / "training_samples" / "shard-0", 3, seed=5)
    assert digest(a) == digest(b)
    held = write_procedural_shard(tmp_path / "a" / "training_samples" / "shard-1", 2, seed=5, start=3, split="msic")
    loaders, skipped = collect_samples([a, str(held)])
    assert (len(loaders), skipped) == (3, 2)
    memory = procedural_samples(3, seed=5)
    for load, mem in zip(loaders, memory):
        got = load()
        assert (got.instruction, got.cot, got.id) == (mem.instruction, mem.cot, mem.id)
        assert np.array_equal(got.layout, mem.layout)
        assert _bytes(got.target) == _bytes(mem.target)
        assert [_bytes(r) for r in got.references] == [_bytes(r) for r in mem.references]


@pytest.mark.parametrize("kwargs", [dict(image_size=60), dict(min_subjects=3, max_subjects=2), dict(max_subjects=10)])
def test_bad_world_settings(kwargs):
    with pytest.raises(ProceduralError):
        WorldSettings(**kwargs)


def test_empty_shard_refused(tmp_path):
    with pytest.raises(ProceduralError, match="at least one sample"):
        write_procedural_shard(tmp_path / "x" / "s", 0, seed=0)
    assert not (tmp_path / "x" / "s").exists()


def test_score_plans_of_truth_and_of_nonsense():
    samples = procedural_samples(5, seed=2)

    def as_plan(text):
        cot, layout = split_plan(text)
        return Plan(text, cot, layout, ())

    truth = [as_plan(plan_text(s.cot, s.layout)) for s in samples]
    assert score_plans(samples, truth) == {"parsed": 1.0, "cell_acc": 1.0, "subject_cell_acc": 1.0,
                                           "colour_acc": 1.0, "shape_acc": 1.0}
    junk = score_plans(samples, [as_plan("[1] is a") for _ in samples])
    assert junk["parsed"] == junk["subject_cell_acc"] == junk["colour_acc"] == 0.0
    # a layout of the right size but all background: parses, owns no subject cell
    empty = [as_plan(s.cot + " layout: " + " ".join(["00000000"] * 8)) for s in samples]
    scored = score_plans(samples, empty)
    assert scored["parsed"] == 1.0 and scored["subject_cell_acc"] == 0.0 and scored["colour_acc"] == 1.0
