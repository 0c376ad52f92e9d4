"""Data-synthesis stages on the tiny zoo (real model classes, random weights): constrained decoding, retries and
drops, the stage chain on a small shard with every stage's invariants."""
import math
import shutil

import numpy as np
import pytest

from music_dagster.config import load_config
from music_dagster.synthesis import (
    captions, checks, combos, cot, detection, layouts, masks, references, samples, schemas, targets, verification,
)
from music_dagster.synthesis.common import ShardContext, shard_seed
from music_dagster.synthesis.structured import AnswerError, generate_constrained, parse_answer
from music_dagster.synthesis.verification import yes_probability

CONFIG = load_config(profile="tiny")
DATA = CONFIG.profile.data.model_copy(update={"shard_size": 2})


@pytest.fixture(scope="module")
def handles(tiny_zoo):
    from music_dagster.zoo.loaders import load_role

    return {role: load_role(role, CONFIG.models[role], "cpu", "float32")
            for role in ("llm", "vlm", "t2i", "i2i", "detector", "segmenter", "clip")}


def _ctx(asset, key="shard-00000"):
    return ShardContext(asset, key, shard_seed(CONFIG.seed, key))


def _llm_inputs(llm, prompts):
    from music_dagster.synthesis.prompts import chat_text

    return llm.tokenizer([chat_text(llm.tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                         padding_side="left")


def test_each_row_follows_its_own_schema(handles):
    llm = handles["llm"]
    row_schemas = [schemas.category_filter(["Cat", "Couch", "Lamp", "Cabinet/shelf"], 2),
                   schemas.caption(["cat", "cabinet/shelf"]), schemas.VERIFY, schemas.annotation(2, DATA.cot_words_per_subject)]
    enc = _llm_inputs(llm, ["pick", "caption", "verify", "annotate"])
    runs = [generate_constrained(llm.model, llm.tokenizer, enc, row_schemas, max_new_tokens=700, seed=seed,
                                 temperature=1.0).texts for seed in (0, 1, 0)]
    for texts in runs:
        for text, schema in zip(texts, row_schemas):
            parse_answer(text, schema)
    assert runs[0] == runs[2] and runs[0] != runs[1]  # seeded sampling
    free = llm.model.generate(**enc, max_new_tokens=30, do_sample=False)
    texts = llm.tokenizer.batch_decode(free[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    with pytest.raises(AnswerError):  # unconstrained random output is not the schema's JSON
        parse_answer(texts[2], schemas.VERIFY)


def test_vlm_answers_with_images_in_a_batch(handles):
    from PIL import Image

    from music_dagster.synthesis.structured import ask_vlm

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in [(30, 50, 3), (64, 64, 3)]]
    answers = ask_vlm(handles["vlm"], ["verify a cat", "verify a couch"], images, [schemas.VERIFY] * 2,
                      batch_size=2, max_retries=0, max_new_tokens=40, temperature=0.0, seed=0,
                      score=lambda tokens, scores: {"p_yes": yes_probability(
                          handles["vlm"].processor.tokenizer, tokens, scores)})
    for answer in answers:
        assert answer.ok and answer.value["answer"] in ("yes", "no")
        assert 0.0 <= answer.extra["p_yes"] <= 1.0


def test_yes_probability_from_the_deciding_step(handles):
    import torch

    tok = handles["vlm"].processor.tokenizer
    prefix = tok.encode('{"answer": "', add_special_tokens=False)
    y, n, space = (tok.encode(t, add_special_tokens=False)[0] for t in ("yes", "no", " "))
    tail = tok.encode('es"}', add_special_tokens=False)
    tokens = prefix + [y] + tail
    vocab = len(tok)
    scores = []
    for step, token in enumerate(tokens):
        s = torch.full((vocab,), float("-inf"))
        s[token] = 0.0
        if step == len(prefix):  # the deciding step: yes (logit 1), no (logit 0), a neutral space (logit 5)
            s[y], s[n], s[space] = 1.0, 0.0, 5.0
        scores.append(s)
    assert yes_probability(tok, tokens, scores) == pytest.approx(math.e / (math.e + 1))
    assert math.isnan(yes_probability(tok, prefix, scores[: len(prefix)]))


def test_unusable_answers_are_retried_then_dropped_with_reason(handles):
    record = {"sample_id": "shard-00000-00000", "parent_ids": [], "shard": "shard-00000",
              "candidates": ["Cat", "Couch"], "categories": ["Cat", "Couch"], "scene": "a room",
              "combo_attempts": 1}
    short = DATA.model_copy(update={"max_new_tokens": 4})  # no caption fits: every answer is cut off
    result = captions.scene_captions(handles["llm"], _ctx("scene_captions"), short, [record])
    assert result.records == []
    assert result.dropped[0]["reason"] == "llm_answer" and "not JSON" in result.dropped[0]["detail"]
    assert result.dropped[0]["parent_ids"] == []


def test_category_combos_are_seeded_by_shard(handles):
    names = combos.load_categories(CONFIG.paths.resolve("objects365"))
    a = combos.category_combos(handles["llm"], _ctx("category_combos"), DATA, names)
    b = combos.category_combos(handles["llm"], _ctx("category_combos"), DATA, names)
    c = combos.category_combos(handles["llm"], _ctx("category_combos", "shard-00001"), DATA, names)
    assert a.records == b.records and a.records
    assert [r["candidates"] for r in a.records] != [r["candidates"] for r in c.records]
    assert [r["sample_id"] for r in a.records] == ["shard-00000-00000", "shard-00000-00001"]
    assert checks.categories_valid(a.records, set(names), DATA.min_categories, DATA.max_subjects,
                                   DATA.min_categories).passed


def test_stage_chain_keeps_samples_and_invariants(handles, tmp_path):
    """Every stage on a 2-sample shard; outputs are written and read back like the assets do."""
    from music_dagster.images import read_image
    from music_dagster.storage import ShardWriter, read_shard

    def open_image(ref):
        return read_image(tmp_path / ref)

    def publish(asset, result):
        with ShardWriter(tmp_path / asset / "shard-00000", schemas.RECORDS[asset]) as writer:
            for name, image in result.images.items():
                writer.add_image(name, image)
            for record in result.records:
                writer.add_record(record)
        records = read_shard(tmp_path / asset / "shard-00000").records
        assert records, f"{asset} kept nothing: {result.dropped}"
        return records

    h = handles
    names = combos.load_categories(CONFIG.paths.resolve("objects365"))
    r = publish("category_combos", combos.category_combos(h["llm"], _ctx("category_combos"), DATA, names))
    r = publish("scene_captions", captions.scene_captions(h["llm"], _ctx("scene_captions"), DATA, r))
    assert checks.captions_mention_categories(r).passed
    r = publish("target_images", targets.target_images(h["t2i"], _ctx("target_images"), DATA, r))
    assert checks.images_have_size(r, DATA.image_size, open_image).passed
    r = publish("detected_boxes", detection.detected_boxes(h["detector"], _ctx("detected_boxes"), DATA, r,
                                                           open_image))
    assert checks.box_area_filter(r, DATA.min_box_area, DATA.min_subjects).passed
    r = publish("verified_boxes", verification.verified_boxes(h["vlm"], _ctx("verified_boxes"), DATA, r,
                                                              open_image))
    assert checks.verified_above_threshold(r, DATA.verify_threshold, DATA.min_subjects).passed
    assert all(0 <= s["p_yes"] <= 1 for rec in r for s in rec["subjects"])
    r = publish("reference_subjects", references.reference_subjects(h["i2i"], _ctx("reference_subjects"), DATA,
                                                                    r, open_image))
    assert checks.references_not_copies(r, open_image).passed
    assert all(open_image(s["reference"]).size == (DATA.reference_size,) * 2 for rec in r for s in rec["subjects"])
    r = publish("subject_masks", masks.subject_masks(h["segmenter"], h["clip"], _ctx("subject_masks"), DATA, r,
                                                     open_image))
    assert checks.regions_valid(r, open_image).passed
    r = publish("grid_layouts", layouts.grid_layouts(_ctx("grid_layouts"), DATA, r, open_image))
    assert checks.every_subject_owns_a_cell(r, DATA.grid).passed
    r = publish("cot_annotations", cot.cot_annotations(h["vlm"], _ctx("cot_annotations"), DATA, r, open_image))
    assert checks.annotation_tags_valid(r, DATA.cot_words_per_subject).passed
    out = samples.training_samples(_ctx("training_samples"), DATA, r, held_out=True)
    assert checks.decimation_consistent(out.records, r, samples.MSIC_MIN_SUBJECTS).passed
    assert min(s["num_subjects"] for s in out.records) == 1
    shutil.rmtree(tmp_path)


def test_verification_threshold_drops_with_reason(handles, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    from music_dagster.images import read_image

    record = {"sample_id": "s-0", "parent_ids": [], "image": "t.png", "missing": [],
              "subjects": [{"category": "Cat", "box": [0, 0, 0.5, 0.5], "score": 0.9},
                           {"category": "Couch", "box": [0.4, 0.4, 1, 1], "score": 0.8}]}
    strict = DATA.model_copy(update={"verify_threshold": 0.999})
    result = verification.verified_boxes(handles["vlm"], _ctx("verified_boxes"), strict, [record],
                                         lambda ref: read_image(tmp_path / ref))
    assert result.records == [] and result.dropped[0]["reason"] == "too_few_verified"
    lenient = verification.verified_boxes(handles["vlm"], _ctx("verified_boxes"), DATA, [record],
                                          lambda ref: read_image(tmp_path / ref))
    assert [s["category"] for s in lenient.records[0]["subjects"]] == ["Cat", "Couch"]


def test_an_empty_parent_shard_gives_empty_stages(handles):
    def no_image(ref):
        raise AssertionError(f"opened {ref}")

    h = handles
    results = [
        captions.scene_captions(h["llm"], _ctx("scene_captions"), DATA, []),
        targets.target_images(h["t2i"], _ctx("target_images"), DATA, []),
        detection.detected_boxes(h["detector"], _ctx("detected_boxes"), DATA, [], no_image),
        verification.verified_boxes(h["vlm"], _ctx("verified_boxes"), DATA, [], no_image),
        references.reference_subjects(h["i2i"], _ctx("reference_subjects"), DATA, [], no_image),
        masks.subject_masks(h["segmenter"], h["clip"], _ctx("subject_masks"), DATA, [], no_image),
        layouts.grid_layouts(_ctx("grid_layouts"), DATA, [], no_image),
        cot.cot_annotations(h["vlm"], _ctx("cot_annotations"), DATA, [], no_image),
        samples.training_samples(_ctx("training_samples"), DATA, [], held_out=False),
    ]
    assert all(r.records == [] and r.images == {} and r.dropped == [] for r in results)


def test_long_captions_reach_clip_cut_on_purpose_and_t5_whole(handles, caplog):
    """A caption past CLIP's 77 tokens renders without diffusers' per-call truncation warning: the CLIP prompt is
    cut to the window (a prefix of the caption), T5 gets the whole caption."""
    import logging

    from music_dagster.synthesis.common import clip_prompts

    import random

    pipe = handles["t2i"].pipe
    long = " ".join(["a red teapot beside a blue backpack on a wooden floor"] * 12)
    (cut,) = clip_prompts(pipe, [long])
    assert long.startswith(cut) and len(cut) < len(long)
    # a random tiny LLM's captions are letter soup, whose cut text can re-encode longer than it was cut
    rng = random.Random(0)
    soup = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz .,") for _ in range(rng.randint(1, 12)))
                     for _ in range(rng.randint(5, 60))) for _ in range(200)]
    for text in clip_prompts(pipe, [long, *soup]):
        assert len(pipe.tokenizer(text, verbose=False).input_ids) <= pipe.tokenizer_max_length, text
    record = {"sample_id": "s0", "caption": long, "parent_ids": []}
    with caplog.at_level(logging.WARNING):
        result = targets.target_images(handles["t2i"], _ctx("target_images"), DATA, [record])
    assert len(result.records) == 1
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


def test_an_interrupt_dropped_during_a_batch_stops_the_stage_before_its_next(handles, raising_handlers):
    """A SIGTERM whose exception a weakref callback drops while the T2I model renders the first batch, inside
    `interrupts_kept` (every model step's: `step_devices`), stops the stage before its second batch."""
    import signal
    from types import SimpleNamespace

    from music_dagster.interrupts import interrupts_kept
    from signals import Interrupted, signal_inside_a_weakref_callback

    pipe, calls = handles["t2i"].pipe, []

    class Rendering:  # the real pipeline, with a signal arriving inside a callback during its first call
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, **kwargs):
            calls.append(kwargs["prompt_2"])
            if len(calls) == 1:
                signal_inside_a_weakref_callback(signal.SIGTERM)
            return pipe(**kwargs)

    records = [{"sample_id": f"s{i}", "caption": f"a red cup and a blue ball, take {i}"} for i in range(3)]
    data = DATA.model_copy(update={"batch_size": 1})
    with interrupts_kept(), pytest.raises(Interrupted, match="SIGTERM"):
        targets.target_images(SimpleNamespace(pipe=Rendering()), _ctx("target_images"), data, records)
    assert calls == [[records[0]["caption"]]]
