"""`train.ablation`: what each switch changes in the plan MUSIC learns and in the samples it trains on."""
import numpy as np
import pytest
import torch
import yaml

from music_dagster.config import ABLATIONS, PARAMS_FILE, ConfigError, load_config, parse_config
from music_dagster.model.layout import layout_to_text
from music_dagster.model.music import IGNORE, MusicSettings, plan_text, split_plan
from music_dagster.model.procedural import procedural_samples
from music_dagster.training.train import collect_samples, procedural_source

COT = "[1] is a red circle at the left."
LAYOUT = np.zeros((8, 8), np.int64)
LAYOUT[2:4, 0:2] = 1


def test_every_profile_spells_out_the_switch_and_a_bad_value_is_one_line():
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    for name in raw["profiles"]:
        assert load_config(profile=name).profile.train.ablation == "none"
    raw["profiles"]["full"]["train"]["ablation"] = "no_plan"
    with pytest.raises(ConfigError, match=r"^params.yaml: profiles\.full\.train\.ablation: Input should be 'none'"):
        parse_config(raw)
    del raw["profiles"]["full"]["train"]["ablation"]
    with pytest.raises(ConfigError, match=r"profiles\.full\.train\.ablation: key missing"):
        parse_config(raw)


def test_plan_text_per_ablation_and_what_inference_reads_back():
    layout = layout_to_text(LAYOUT)
    assert plan_text(COT, LAYOUT) == plan_text(COT, LAYOUT, "no_decimation") == f" {COT} {layout}"
    assert plan_text(COT, LAYOUT, "no_cot") == f" {layout}"
    assert plan_text(COT, LAYOUT, "no_layout") == f" {COT}"
    assert plan_text(COT, LAYOUT, "neither") == ""
    cot, parsed = split_plan(plan_text(COT, LAYOUT, "no_cot"), grid=8)
    assert cot == "" and (parsed == LAYOUT).all()
    cot, parsed = split_plan(plan_text(COT, LAYOUT, "no_layout"), grid=8)
    assert cot == COT and parsed is None


def test_neither_supervises_only_the_eos(tiny_zoo):
    from music_dagster.model.music import MusicModel
    from music_dagster.model.runtime import load_model

    torch.set_num_threads(1)
    config = load_config(profile="tiny")
    model = MusicModel(load_model(config, "music_llm"), load_model(config, "music_vision"),
                       MusicSettings(input_queries=4, image_queries=4, lora_rank=4, lora_alpha=8))
    sample = procedural_samples(1, seed=0)[0]
    for ablation in ABLATIONS:
        labels = model.encode(sample, ablation=ablation)["labels"]
        labelled = labels[labels != IGNORE].tolist()
        assert labelled[-1] == model.tokenizer.eos_token_id
        assert model.tokenizer.decode(labelled[:-1]) == plan_text(sample.cot, sample.layout, ablation)


def test_decimated_world_and_no_decimation_keeps_full_counts():
    full = procedural_samples(6, seed=0)
    both = procedural_samples(6, seed=0, decimated=True)
    assert [s.id for s in both if s.meta["source_subjects"] == len(s.references)] == [s.id for s in full]
    for s in both:
        n = len(s.references)
        assert 2 <= n <= s.meta["source_subjects"] and sorted(set(np.unique(s.layout)) - {0}) == list(range(1, n + 1))
        assert [m["id"] for m in s.meta["subjects"]] == list(range(1, n + 1))
    assert len(both) == sum(len(s.references) - 1 for s in full)  # N, N-1, ..., 2 subjects
    kept, _ = collect_samples([both], full_only=True)
    assert [load().id for load in kept] == [s.id for s in full]
    assert len(collect_samples([both])[0]) == len(both)
    config = load_config(profile="tiny").with_values("train", procedural_samples=6)
    assert [s.id for s in procedural_source(config)] == [s.id for s in both]
    off = config.with_values("train", ablation="no_decimation")
    assert [s.id for s in procedural_source(off)] == [s.id for s in full]
