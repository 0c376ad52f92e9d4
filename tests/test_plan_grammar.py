"""MUSIC's own plan decoded under the plan's grammar (`model/plan_grammar.py`): the grammar admits the plans the
model learns and nothing malformed; an untrained tiny model's plans always parse; the decode is seeded."""
import re

import numpy as np
import pytest
import torch

from music_dagster.config import load_config
from music_dagster.model import plan_grammar
from music_dagster.model.music import MusicModel, MusicSettings, Sample, plan_text
from music_dagster.model.procedural import procedural_samples
from music_dagster.zoo.loaders import load_role

CONFIG = load_config(profile="tiny")
# The tiny profile's plan budget (what a tiny checkpoint records), small resamplers.
SETTINGS = MusicSettings(input_queries=4, image_queries=4, lora_rank=4, lora_alpha=8,
                         max_plan_tokens=CONFIG.profile.train.max_plan_tokens)


@pytest.fixture(scope="module")
def untrained(tiny_zoo):
    """A MUSIC model that was never trained (random LoRA, resamplers and queries over the tiny backbones)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load = lambda role: load_role(role, CONFIG.models[role], "cpu", "float32")  # noqa: E731
    return MusicModel(load("music_llm"), load("music_vision"), SETTINGS)


@pytest.fixture(scope="module")
def references():
    return [r for s in procedural_samples(6, seed=3) for r in s.references]


def _request(references, n: int) -> Sample:
    return Sample(instruction="place " + " and ".join(f"[{i}]" for i in range(1, n + 1)) + " on a table.",
                  references=references[:n])


def test_the_grammar_admits_the_plans_the_model_learns_and_nothing_malformed():
    for sample in procedural_samples(8, seed=1):
        n = len(sample.references)
        assert re.fullmatch(plan_grammar.plan_pattern(n, 8), plan_text(sample.cot, sample.layout))
    grid = np.zeros((8, 8), np.int64)
    grid[0, :2], grid[5, 5], grid[7, 7] = 1, 2, 12
    pattern = plan_grammar.plan_pattern(12, 8)
    # the data stages' CoT (one sentence per subject, may name others) and 12 subjects (id 12 is `c`)
    cot = " ".join(f"[{i}] sits, left of [{i % 12 + 1}] today." for i in range(1, 13))
    assert re.fullmatch(pattern, plan_text(cot, grid))
    two = plan_grammar.plan_pattern(2, 8)
    good = plan_text("[1] a dog. [2] a hat.", grid[:, :] % 3)
    assert re.fullmatch(two, good)
    bad = {
        "layout null": " [1] a dog. [2] a hat. layout: null",
        "control character": good.replace("dog", "d\x07g"),
        "an id beyond the subjects": good.replace("layout: 1", "layout: 3"),
        "seven rows": good.rsplit(" ", 1)[0],
        "a short row": good[:-1],
        "a colon in the CoT": good.replace("a dog", "a: dog"),
        "a sentence without a tag": good.replace("[2] a hat.", "a hat."),
        "a tag beyond the subjects": good.replace("[2]", "[3]"),
        "one sentence for two subjects": " [1] a dog. " + good.split(". ", 2)[-1],
    }
    for case, text in bad.items():
        assert not re.fullmatch(two, text), case


def test_each_ablations_grammar_admits_only_the_plan_it_was_trained_to_write():
    samples = procedural_samples(6, seed=1)
    written = ("none", "no_cot", "no_layout")  # the distinct non-empty plans (no_decimation writes none's)
    for ablation in (*written, "no_decimation"):
        for sample in samples:
            pattern = plan_grammar.plan_pattern(len(sample.references), 8, ablation)
            for other in written:
                text = plan_text(sample.cot, sample.layout, other)
                same = text == plan_text(sample.cot, sample.layout, ablation)
                assert bool(re.fullmatch(pattern, text)) == same, (ablation, other)
    with pytest.raises(ValueError, match="neither writes an empty plan"):
        plan_grammar.plan_pattern(2, 8, "neither")


def test_an_untrained_model_decodes_only_the_parts_its_ablation_writes(tiny_zoo, references):
    """A model's `settings.ablation` (what its checkpoint records) picks the grammar of its constrained decode."""
    from dataclasses import replace

    torch.set_num_threads(1)
    load = lambda role: load_role(role, CONFIG.models[role], "cpu", "float32")  # noqa: E731
    request = _request(references, 3)
    plans, full = {}, None
    for ablation in ("no_cot", "no_layout", "neither"):
        torch.manual_seed(0)
        model = MusicModel(load("music_llm"), load("music_vision"), replace(SETTINGS, ablation=ablation))
        plans[ablation] = model.plan([request], branches=3, sample=True, seed=1, constrained=True)[0]
        if ablation != "neither":
            shortest = plan_grammar.shortest_plan(model.tokenizer, 3, 8, ablation)
            full = full or plan_grammar.shortest_plan(model.tokenizer, 3, 8)
            assert shortest < full
    for plan in plans["no_cot"]:  # the layout alone, always parsing
        assert plan.parsed and plan.cot == "" and plan.text.strip().startswith("layout:"), plan.text
        assert plan.layout.shape == (8, 8) and plan.layout.max() <= 3
    for plan in plans["no_layout"]:  # the CoT alone: one tagged sentence per subject, no layout
        assert not plan.parsed and ":" not in plan.text and plan.text.isprintable(), plan.text
        assert len(re.findall(r"\[(\d+)\][^.]*\.", plan.cot)) == 3
    assert [(p.text, p.token_ids, p.layout) for p in plans["neither"]] == [("", (), None)] * 3  # nothing decoded


@pytest.mark.parametrize("n", [1, 3, 12])
def test_an_untrained_models_plan_always_parses(untrained, references, n):
    request = _request(references, n)
    limit = untrained.settings.max_plan_tokens
    assert plan_grammar.shortest_plan(untrained.tokenizer, n, 8) <= limit
    plans = untrained.plan([request], constrained=True)[0]  # greedy
    for seed in (0, 1, 2):
        plans += untrained.plan([request], branches=3, sample=True, seed=seed, constrained=True)[0]
    for plan in plans:
        assert plan.parsed, plan.text
        assert plan.layout.shape == (8, 8) and plan.layout.min() >= 0 and plan.layout.max() <= n
        assert len(plan.token_ids) <= limit and plan.text.isprintable()
        sentences = re.findall(r"\[(\d+)\][^.]*\.", plan.cot)
        assert len(sentences) == n and all(1 <= int(i) <= n for i in sentences)
    # unconstrained, the same untrained model does not write a layout that parses
    assert not any(p.parsed for p in untrained.plan([request], branches=3, sample=True, seed=0)[0])


def test_constrained_decoding_is_seeded_and_batched_rows_keep_their_own_grammar(untrained, references):
    one, three = _request(references, 1), _request(references, 3)
    first = untrained.plan([one, three], branches=2, sample=True, seed=5, constrained=True)
    again = untrained.plan([one, three], branches=2, sample=True, seed=5, constrained=True)
    other = untrained.plan([one, three], branches=2, sample=True, seed=6, constrained=True)
    ids = lambda plans: [[p.token_ids for p in row] for row in plans]  # noqa: E731
    assert ids(first) == ids(again) and ids(first) != ids(other)
    assert [int(row[0].layout.max()) <= n for row, n in zip(first, (1, 3))] == [True, True]
    assert all(p.parsed for row in first for p in row)


def test_a_limit_below_the_shortest_plan_stops_in_the_grammar_without_a_layout(untrained, references):
    request = _request(references, 2)
    shortest = plan_grammar.shortest_plan(untrained.tokenizer, 2, 8)
    plans = untrained.plan([request], branches=2, sample=True, seed=0, max_new_tokens=shortest - 1,
                           constrained=True)[0]
    for plan in plans:
        assert not plan.parsed and len(plan.token_ids) == shortest - 1 and plan.text.isprintable()
    exact = untrained.plan([request], branches=2, sample=True, seed=0, max_new_tokens=shortest,
                           constrained=True)[0]
    assert all(p.parsed for p in exact)


def test_the_index_and_budget_are_built_once_per_tokenizer_and_subject_count(untrained):
    from music_dagster.synthesis.structured import regex_index

    tokenizer = untrained.tokenizer
    first = plan_grammar.plan_processor(tokenizer, [2, 2, 4], 8, 100)
    second = plan_grammar.plan_processor(tokenizer, [4, 2], 8, 50)
    assert first.tables[0] is first.tables[1] is second.tables[1] and first.tables[2] is second.tables[0]
    pattern = plan_grammar.plan_pattern(2, 8)
    assert regex_index(tokenizer, pattern) is regex_index(tokenizer, pattern)
