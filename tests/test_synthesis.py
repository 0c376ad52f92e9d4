"""Data-synthesis library, without models: categories, seeds, schemas, detection scoring, decimation stage, checks."""
import json
import re

import numpy as np
import pytest

from music_dagster.config import load_config
from music_dagster.synthesis import SynthesisError, checks, schemas
from music_dagster.synthesis.captions import missing_phrases
from music_dagster.synthesis.combos import load_categories, sample_candidates
from music_dagster.synthesis.common import (
    ShardContext, StageResult, check_subject_range, child, derive_seed, pixel_box, shard_seed,
)
from music_dagster.synthesis.detection import assign_boxes, phrase_scores, query_text
from music_dagster.synthesis.samples import is_msic_shard, training_samples
from music_dagster.synthesis.structured import AnswerError, ask, parse_answer

OBJECTS365 = load_config().paths.resolve("objects365")


# --- categories -------------------------------------------------------------------------------------------------
def test_objects365_names_are_stripped_and_complete():
    names = load_categories(OBJECTS365)
    raw = json.loads(OBJECTS365.read_text())
    assert len(names) == len(raw) == 365
    assert all(n == n.strip() and "  " not in n for n in names)
    assert "Cigar/Cigarette" in names  # stored as "Cigar/Cigarette " in the file


@pytest.mark.parametrize("content, message", [
    ("[]", "holds no categories"),
    ('{"name": "cat"}', "holds no categories"),
    ('[{"id": 1, "name": "Cat"}, {"id": 2}]', "entry 1 has no category name"),
    ('[{"id": 1, "name": "Cat"}, {"id": 2, "name": "  "}]', "entry 1 has no category name"),
    ('[{"id": 1, "name": "Cat"}, {"id": 2, "name": "Cat "}]', "appears twice"),
    ("not json", "not readable JSON"),
])
def test_bad_category_file_is_one_line_error(tmp_path, content, message):
    path = tmp_path / "objects365.json"
    path.write_text(content)
    with pytest.raises(SynthesisError, match=message) as e:
        load_categories(path)
    assert "\n" not in str(e.value)


def test_missing_category_file(tmp_path):
    with pytest.raises(SynthesisError, match="does not exist"):
        load_categories(tmp_path / "nope.json")


def test_category_subset():
    assert load_categories(OBJECTS365, ["Couch", " Person "]) == ["Person", "Couch"]
    with pytest.raises(SynthesisError, match="unknown Objects365 category 'Unicorn'"):
        load_categories(OBJECTS365, ["Couch", "Unicorn"])
    with pytest.raises(SynthesisError, match="data.categories is empty"):
        load_categories(OBJECTS365, [])


def test_sample_candidates_range_and_distinct():
    names = load_categories(OBJECTS365)
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(300):
        c = sample_candidates(rng, names, 2, 12)
        assert 2 <= len(c) <= 12 and len(set(c)) == len(c) and set(c) <= set(names)
        counts.add(len(c))
    assert counts == set(range(2, 13))
    assert sample_candidates(rng, ["a", "b", "c"], 2, 12) and len(sample_candidates(rng, ["a", "b"], 2, 12)) == 2


@pytest.mark.parametrize("lo, hi", [(0, 3), (2, 13), (5, 4), (-1, 2)])
def test_subject_range_outside_1_to_12(lo, hi):
    with pytest.raises(SynthesisError, match=r"outside 1\.\.12"):
        check_subject_range(lo, hi)
    with pytest.raises(SynthesisError):
        sample_candidates(np.random.default_rng(0), ["a", "b", "c"], lo, hi)


def test_too_few_categories_for_range():
    with pytest.raises(SynthesisError, match="cannot give"):
        sample_candidates(np.random.default_rng(0), ["a"], 2, 3)


# --- seeds and records ------------------------------------------------------------------------------------------
def test_seeds_depend_on_key_and_config_seed_only():
    assert shard_seed(0, "shard-00000") == shard_seed(0, "shard-00000")
    assert len({shard_seed(0, "shard-00000"), shard_seed(0, "shard-00001"), shard_seed(1, "shard-00000")}) == 3
    assert 0 <= derive_seed("x") < 2**63
    ctx = ShardContext("target_images", "shard-00003", 7)
    assert ctx.ref("a.png") == "target_images/shard-00003/a.png"
    assert ctx.seed_for("s", 1) != ShardContext("detected_boxes", "shard-00003", 7).seed_for("s", 1)


def test_child_record_keeps_id_and_links_parent():
    parent = {"sample_id": "shard-00000-00001", "parent_ids": [], "categories": ["Cat"]}
    c = child(parent, caption="A cat.")
    assert c == {"sample_id": "shard-00000-00001", "parent_ids": ["shard-00000-00001"], "categories": ["Cat"],
                 "caption": "A cat."}
    assert parent["parent_ids"] == []


def test_stage_result_records_drop_reasons():
    result = StageResult()
    result.drop({"sample_id": "a", "parent_ids": ["a"]}, "scene_captions", "llm_answer", "not JSON")
    result.drop({"sample_id": "b", "parent_ids": ["b"]}, "scene_captions", "llm_answer")
    assert result.reasons() == {"llm_answer": 2}
    assert result.dropped[0] == {"sample_id": "a", "parent_ids": ["a"], "stage": "scene_captions",
                                 "reason": "llm_answer", "detail": "not JSON"}


def test_pixel_box_is_inside_and_non_empty():
    assert pixel_box([0.0, 0.0, 1.0, 1.0], 64, 48) == (0, 0, 64, 48)
    assert pixel_box([0.5, 0.5, 0.5, 0.5], 64, 64) == (32, 32, 33, 33)
    assert pixel_box([0.99, 0.99, 1.0, 1.0], 10, 10) == (9, 9, 10, 10)


# --- answer schemas ---------------------------------------------------------------------------------------------
def test_caption_pattern_demands_every_category_in_order():
    pattern = re.compile(schemas.caption_pattern(["cat", "cabinet/shelf", "remote control"]))
    assert pattern.match("A cat sits by the cabinet/shelf near a remote control.")
    assert pattern.match("The cat cabinet/shelf remote control.")
    assert not pattern.match("A cat sits by the remote control.")  # a category missing
    assert not pattern.match("A cabinet/shelf and a cat near a remote control.")  # out of order
    assert not pattern.match("A cat sat there for a very long time by the cabinet/shelf near a remote control.")


def test_instruction_and_cot_patterns_use_subject_tags():
    instruction = re.compile(schemas.instruction_pattern(3))
    assert instruction.match("Put [1] next to [2] under [3].")
    assert not instruction.match("Put [1] next to [3].")
    cot = re.compile(schemas.cot_pattern(2, 8))
    assert cot.match("[1] is a cat on the left of [2]. [2] is the sofa in the centre.")
    assert not cot.match("[1] is a cat next to [3]. [2] is the sofa.")  # [3] is not a subject
    assert not cot.match("[2] is the sofa. [1] is a cat.")


def _detailed_sentence(i: int, words: int) -> str:
    # appearance, pose, position and relations, cycled to exactly `words` words (the last one refers to [1])
    text = ("is a small brown dog with a red collar, sitting upright with its head turned, placed in the lower "
            "left of the frame, just in front of the sofa and left of").split()
    return f"[{i}] " + " ".join((text * (words // len(text) + 1))[:words - 1] + ["[1]"]) + "."


@pytest.mark.parametrize("profile", ["tiny", "full"])
def test_cot_pattern_admits_the_configured_length_and_refuses_one_more(profile):
    words = load_config(profile=profile).profile.data.cot_words_per_subject
    pattern = re.compile(schemas.cot_pattern(3, words))
    assert pattern.fullmatch(" ".join(_detailed_sentence(i, words) for i in (1, 2, 3)))
    longer = [_detailed_sentence(1, words), _detailed_sentence(2, words + 1), _detailed_sentence(3, words)]
    assert not pattern.fullmatch(" ".join(longer))
    schema = schemas.annotation(3, words)  # the VLM's answer schema, as the stage builds it
    value = {"instruction": "Put [1] next to [2] under [3].", "cot": " ".join(_detailed_sentence(i, words)
                                                                            for i in (1, 2, 3))}
    assert parse_answer(json.dumps(value), schema) == value
    with pytest.raises(AnswerError):
        parse_answer(json.dumps(dict(value, cot=" ".join(longer))), schema)
    assert not checks.annotation_tags_valid([dict(_annotated(3), cot=" ".join(longer))], words).passed


def test_full_profile_asks_for_the_detailed_cot_and_tiny_keeps_the_short_one():
    from music_dagster.synthesis import prompts

    tiny = prompts.annotation(["cat", "sofa"], load_config(profile="tiny").profile.data.cot_words_per_subject)
    full_words = load_config(profile="full").profile.data.cot_words_per_subject
    full = prompts.annotation(["cat", "sofa"], full_words)
    assert full_words >= prompts.DETAILED_COT_WORDS and f"at most {full_words} words" in full
    assert all(w in full for w in ("appearance", "pose", "placed", "relations"))
    assert "appearance" not in tiny and "its role in the scene" in tiny


def test_regex_literal_escapes_punctuation():
    assert re.fullmatch(schemas.regex_literal("cabinet/shelf (x)."), "cabinet/shelf (x).")
    assert schemas.phrase("  Tape Measur/ Ruler ") == "tape measur/ ruler"


def test_parse_answer_validates_against_schema():
    schema = schemas.category_filter(["Cat", "Sofa", "Lamp"], 2)
    assert parse_answer('{"keep": ["Cat", "Sofa"], "scene": "a living room"}', schema)["keep"] == ["Cat", "Sofa"]
    for text, where in [('{"keep": ["Cat"], "scene": "a room"}', "keep"),
                        ('{"keep": ["Cat", "Dog"], "scene": "a room"}', "keep.1"),
                        ('{"keep": ["Cat", "Sofa"]}', "answer"),
                        ('{"keep": ["Cat", "Sofa"], "scene": "a room"', "not JSON")]:
        with pytest.raises(AnswerError, match=re.escape(where)):
            parse_answer(text, schema)


def test_ask_retries_failures_then_gives_up_with_reason():
    schema = schemas.VERIFY
    replies = {0: ['{"answer": "yes"}'], 1: ["garbage", '{"answer": "no"}'], 2: ["x", "y", "z"]}
    calls = []

    def run(items, attempt):
        calls.append((list(items), attempt))
        return [replies[i][attempt] for i in items]

    answers = ask(run, [schema] * 3, max_retries=2)
    assert calls == [([0, 1, 2], 0), ([1, 2], 1), ([2], 2)]
    assert [a.ok for a in answers] == [True, True, False]
    assert [a.attempts for a in answers] == [1, 2, 3]
    assert answers[1].value == {"answer": "no"} and "not JSON" in answers[2].error


def test_ask_semantic_check_triggers_retry():
    def check(item, value):
        if value["answer"] != "yes":
            raise AnswerError("said no")

    answers = ask(lambda items, attempt: ['{"answer": "no"}'] * len(items), [schemas.VERIFY], 1, check)
    assert not answers[0].ok and answers[0].error == "said no" and answers[0].attempts == 2


# --- detection scoring ------------------------------------------------------------------------------------------
def test_query_text_spans():
    text, spans = query_text(["cat", "remote control"])
    assert text == "cat. remote control."
    assert [text[a:b] for a, b in spans] == ["cat", "remote control"]


def test_phrase_scores_average_the_phrase_tokens():
    import torch

    # tokens: [CLS] cat . remote control . [SEP]
    offsets = [(0, 0), (0, 3), (3, 4), (5, 11), (12, 19), (19, 20), (0, 0)]
    probs = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.4, 0.1, 0.9],
                          [0.1, 0.2, 0.1, 0.6, 1.0, 0.1, 0.1]])
    mean, top = phrase_scores(probs, offsets, [(0, 3), (5, 19)])
    assert torch.allclose(mean, torch.tensor([[0.8, 0.3], [0.2, 0.8]]))
    assert torch.allclose(top, torch.tensor([[0.8, 0.4], [0.2, 1.0]]))


def test_assign_boxes_best_per_category_unique_and_area_filtered():
    import torch

    scores = torch.tensor([[0.9, 0.8, 0.1],   # query 0: best for both 0 and 1 -> goes to phrase 0
                           [0.2, 0.7, 0.1],   # query 1: phrase 1's next best
                           [0.1, 0.1, 0.95]])  # query 2: phrase 2, but its box is too small
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.05, 0.05]]
    chosen, too_small = assign_boxes(scores, scores, boxes, 0.0, 0.0, 0.01)
    assert {j: q for j, (q, _) in chosen.items()} == {0: 0, 1: 1}
    assert too_small == {2}
    chosen, _ = assign_boxes(scores, scores, boxes, 0.75, 0.0, 0.01)  # box threshold
    assert {j: q for j, (q, _) in chosen.items()} == {0: 0}


def test_missing_phrases_whole_words():
    assert missing_phrases("A cat and a sofa.", ["cat", "sofa", "dog"]) == ["dog"]
    assert missing_phrases("A catalogue.", ["cat"]) == ["cat"]


# --- MSIC hold-out and decimation -------------------------------------------------------------------------------
def test_msic_holdout_share_is_fixed_and_seeded():
    keys = [f"shard-{i:05d}" for i in range(100)]
    for every in (2, 10):
        held = [k for k in keys if is_msic_shard(k, 0, every)]
        assert len(held) == 100 // every
        assert held != [k for k in keys if is_msic_shard(k, 1, every)]  # the seed moves the share
    assert [is_msic_shard(f"shard-{i:05d}", 0, 2) for i in range(4)] == [True, False, True, False]
    other = [is_msic_shard(f"extra-{i}", 0, 4) for i in range(400)]
    assert 50 < sum(other) < 150 and other == [is_msic_shard(f"extra-{i}", 0, 4) for i in range(400)]


def _annotated(n=4):
    subjects = [{"category": c, "box": b, "reference": f"r/{i}.png", "mask": f"m/{i}.png", "region": "box"}
                for i, (c, b) in enumerate(zip(["Person", "Dog", "Cup", "Chair"][:n],
                                               [[0, 0, 0.9, 0.9], [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6],
                                                [0.6, 0.1, 0.9, 0.5]][:n]))]
    layout = np.zeros((8, 8), dtype=int)
    for i, s in enumerate(subjects, start=1):
        x1, y1, x2, y2 = (int(v * 8) for v in s["box"])
        layout[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] = i
    return {"sample_id": "shard-00000-00000", "parent_ids": ["shard-00000-00000"], "shard": "shard-00000",
            "image": "t.png", "caption": "A photo.", "scene": "a room", "subjects": subjects,
            "instruction": "Show " + " and ".join(f"[{i}]" for i in range(1, n + 1)) + ".",
            "cot": " ".join(f"[{i}] is near [{n + 1 - i}]." for i in range(1, n + 1)), "layout": layout.tolist()}


class _Data:
    min_subjects = 2


@pytest.mark.parametrize("held_out, counts", [(False, [4, 3, 2]), (True, [4, 3, 2, 1])])
def test_training_samples_decimate_and_mark_split(held_out, counts):
    source = _annotated()
    result = training_samples(ShardContext("training_samples", "shard-00000", 0), _Data, [source], held_out)
    assert [r["num_subjects"] for r in result.records] == counts
    assert {r["split"] for r in result.records} == {"msic" if held_out else "train"}
    assert all(r["parent_ids"] == [source["sample_id"]] for r in result.records)
    assert len({r["sample_id"] for r in result.records}) == len(counts)
    two = next(r for r in result.records if r["num_subjects"] == 2)
    assert [s["category"] for s in two["subjects"]] == ["Person", "Chair"]  # the two largest boxes
    assert "Dog" in two["cot"] and "Cup" in two["cot"]  # removed tags became plain names
    verdict = checks.decimation_consistent(result.records, [source], counts[-1])
    assert verdict.passed, verdict.detail
    assert not checks.decimation_consistent(result.records[:-1], [source], counts[-1]).passed


# --- checks catch broken records --------------------------------------------------------------------------------
def test_checks_flag_broken_records():
    good = _annotated(3)
    good["subjects"] = [dict(s, score=0.5, p_yes=0.7, answer="yes") for s in good["subjects"]]
    good["rejected"] = []
    assert checks.box_area_filter([good], 0.01, 2).passed
    small = dict(good, subjects=[*good["subjects"][:2], dict(good["subjects"][2], box=[0.5, 0.5, 0.55, 0.55])])
    assert "fails the 0.01 filter" in checks.box_area_filter([small], 0.01, 2).detail
    assert not checks.box_area_filter([dict(good, subjects=good["subjects"][:1])], 0.01, 2).passed
    assert checks.verified_above_threshold([good], 0.5, 2).passed
    assert not checks.verified_above_threshold([good], 0.8, 2).passed
    assert checks.every_subject_owns_a_cell([good], 8).passed
    lost = dict(good, layout=[[0 if v == 3 else v for v in row] for row in good["layout"]])
    assert "subject 3 owns no cell" in checks.every_subject_owns_a_cell([lost], 8).detail
    assert checks.annotation_tags_valid([good], 8).passed
    assert not checks.annotation_tags_valid([dict(good, instruction="Show [1] and [2].")], 8).passed
    assert not checks.annotation_tags_valid([dict(good, cot="[1] is next to [7].")], 8).passed
    assert not checks.annotation_tags_valid([good], 2).passed  # "[1] is near [3]." is three words


# --- previews ---------------------------------------------------------------------------------------------------
def test_previews_show_boxes_layouts_and_tables():
    from PIL import Image

    from music_dagster.synthesis import preview

    record = _annotated(3)
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    opened = []

    def open_image(ref):
        opened.append(ref)
        return image

    boxes = preview.sheet("detected_boxes", [record], open_image)
    assert boxes.size == (512, 128) and opened == ["t.png"]
    assert np.asarray(boxes)[:, :128].max() > 0  # the numbered boxes are drawn on the black image
    layout = preview.sheet("training_samples", [record], open_image)
    assert np.asarray(layout)[:, :128].std() > 0
    assert preview.sheet("scene_captions", [{"sample_id": "x", "caption": "A cat."}], open_image) is None
    assert preview.subject_counts([record, _annotated(2)]) == {2: 1, 3: 1}
    table = preview.sample_table([record], ("instruction", "scene"))
    assert table.splitlines()[0] == "| sample | instruction | scene |" and "[1] and [2]" in table
    dropped = [{"sample_id": f"s{i}", "reason": "llm_answer", "detail": "a | b"} for i in range(10)]
    drops = preview.drop_table(dropped)
    assert "a \\| b" in drops and "2 more" in drops
