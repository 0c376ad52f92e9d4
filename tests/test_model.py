"""MusicModel on the tiny zoo: losses, batched decoding, the adapter round trip, bad input."""
import numpy as np
import pytest
import torch

from music_dagster.config import load_config
from music_dagster.zoo.loaders import load_role
from music_dagster.model.music import (
    IGNORE, QUERY, CheckpointError, ModelInputError, MusicModel, MusicSettings, Sample, plan_text, split_plan,
)
from music_dagster.model.procedural import procedural_samples

SETTINGS = MusicSettings(input_queries=4, image_queries=4, lora_rank=4, lora_alpha=8, max_plan_tokens=12)


@pytest.fixture(scope="module")
def backbones(tiny_zoo):
    """Fresh-handle loaders (MusicModel injects LoRA into its LLM in place, so each model gets its own)."""
    torch.set_num_threads(1)
    config = load_config(profile="tiny")

    def load(role):
        return load_role(role, config.models[role], "cpu", "float32")
    return load


@pytest.fixture(scope="module")
def samples():
    return procedural_samples(4, seed=0)


def _model(backbones, settings=SETTINGS, seed=0):
    torch.manual_seed(seed)
    return MusicModel(backbones("music_llm"), backbones("music_vision"), settings)


def test_forward_losses_and_what_is_supervised(backbones, samples):
    model = _model(backbones)
    encoded = [model.encode(s) for s in samples]
    batch = model.collate(encoded)
    out = model(batch)
    assert torch.isfinite(out["L1"]) and torch.isfinite(out["L2"])
    assert out["loss"].item() == pytest.approx(0.5 * out["L1"].item() + 0.5 * out["L2"].item(), rel=1e-6)
    assert out["pred"].shape == (4, 4, 64)
    # only the plan (CoT + layout + eos) is supervised by L1
    for s, e in zip(samples, encoded):
        labelled = e["labels"][e["labels"] != IGNORE].tolist()
        assert model.tokenizer.decode(labelled[:-1]) == plan_text(s.cot, s.layout)
        assert labelled[-1] == model.tokenizer.eos_token_id
        assert int((e["kinds"] == QUERY).sum()) == 4
    out["loss"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_" in n for n in grads)
    assert {"image_queries", "image_markers"} <= grads
    assert any(n.startswith("input_resampler") for n in grads) and any(n.startswith("output_resampler") for n in grads)
    assert not any(n.startswith("vision.") for n in grads)


def test_tokens_are_what_encode_feeds_the_model(backbones, samples):
    model = _model(backbones)
    for sample in samples:
        for with_target in (True, False):
            tokens, encoded = model.tokens(sample, with_target), model.encode(sample, with_target)
            assert tokens["ids"] == encoded["ids"].tolist() and tokens["labels"] == encoded["labels"].tolist()
            assert tokens["kinds"] == encoded["kinds"].tolist() and tokens["prompt_len"] == encoded["prompt_len"]


def test_losses_do_not_depend_on_padding_side_or_batch_company(backbones, samples):
    model = _model(backbones).eval()
    encoded = [model.encode(s) for s in samples]
    with torch.no_grad():
        together = model(model.collate(encoded))["pred"]
        alone = torch.cat([model(model.collate([e]))["pred"] for e in encoded])
        left = model(model.collate(encoded, left_pad=True))["pred"]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together, left, atol=1e-5, rtol=1e-4)


def test_plan_batched_equals_single_and_sampling_is_seeded(backbones, samples):
    model = _model(backbones)
    batched = [p[0] for p in model.plan(samples[:3])]
    single = [model.plan([s])[0][0] for s in samples[:3]]
    assert [p.token_ids for p in batched] == [p.token_ids for p in single]
    a = model.plan(samples[:2], branches=3, sample=True, seed=7)
    b = model.plan(samples[:2], branches=3, sample=True, seed=7)
    assert [[p.token_ids for p in row] for row in a] == [[p.token_ids for p in row] for row in b]
    assert len(a) == 2 and all(len(row) == 3 for row in a)
    assert len({p.token_ids for p in a[0]}) > 1  # branches differ
    assert all(len(p.token_ids) <= SETTINGS.max_plan_tokens for row in a for p in row)
    tokens = model.image_tokens([samples[0]] * 3, a[0])
    one = model.image_tokens([samples[0]], a[0][1:2])
    assert tokens.shape == (3, 4, 64)
    torch.testing.assert_close(tokens[1:2], one, atol=1e-5, rtol=1e-4)


def test_split_plan():
    grid = np.zeros((8, 8), np.int64)
    grid[2:4, 1:3] = 1
    cot, layout = split_plan(plan_text("[1] is a red circle at the left.", grid), grid=8)
    assert cot == "[1] is a red circle at the left." and np.array_equal(layout, grid)
    assert split_plan("[1] is a red circle layout: 0011 01")[1] is None
    assert split_plan("no layout here") == ("no layout here", None)


def test_adapter_round_trips_through_peft_with_identical_outputs(backbones, samples, tmp_path):
    from peft import PeftModel

    model = _model(backbones).eval()
    with torch.no_grad():  # make the adapter non-trivial (LoRA B starts at zero)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    saved = model.save_pretrained(tmp_path / "ckpt")
    names = {p.name for p in saved.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "music_modules.safetensors",
            "music_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)

    ids = torch.tensor([model.encode_ids("[1] is a red circle at the top. layout: 0000")])
    peft = PeftModel.from_pretrained(backbones("music_llm").model, str(saved)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, model.llm(input_ids=ids).logits, rtol=0, atol=0)

    loaded = MusicModel.from_pretrained(saved, backbones("music_llm"), backbones("music_vision"))
    batch = [model.encode(s) for s in samples]
    with torch.no_grad():
        a, b = model(model.collate(batch)), loaded(loaded.collate(batch))
    assert a["L1"].item() == b["L1"].item() and a["L2"].item() == b["L2"].item()
    plans = model.plan(samples[:2])
    assert [p[0].token_ids for p in loaded.plan(samples[:2])] == [p[0].token_ids for p in plans]
    assert torch.equal(model.image_tokens(samples[:2], [p[0] for p in plans]),
                       loaded.image_tokens(samples[:2], [p[0] for p in plans]))


def test_bad_checkpoints(backbones, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        MusicModel.from_pretrained(tmp_path / "nothing", backbones("music_llm"), backbones("music_vision"))
    model = _model(backbones)
    saved = model.save_pretrained(tmp_path / "ckpt")
    (saved / "music_modules.safetensors").unlink()
    with pytest.raises(CheckpointError, match="music_modules.safetensors is missing"):
        MusicModel.from_pretrained(saved, backbones("music_llm"), backbones("music_vision"))


def test_a_checkpoint_that_does_not_fit_loads_nothing_and_names_the_file(backbones, tmp_path):
    import json

    saved = _model(backbones).save_pretrained(tmp_path / "ckpt")
    config = saved / "music_config.json"
    meta = json.loads(config.read_text())
    meta["settings"]["input_queries"] = 9  # the config now describes another model than the weights hold
    config.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"music_modules.safetensors: tensor input_resampler.queries has shape "
                                              r"\[4, 128\], this model's is \[9, 128\]"):
        MusicModel.from_pretrained(saved, backbones("music_llm"), backbones("music_vision"))

    saved = _model(backbones).save_pretrained(tmp_path / "ckpt")
    weights = saved / "music_modules.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=f"{weights}: not a complete safetensors file"):
        MusicModel.from_pretrained(saved, backbones("music_llm"), backbones("music_vision"))


def test_a_checkpoint_records_its_ablation_and_one_saved_before_reads_as_none(backbones, tmp_path):
    import json
    from dataclasses import replace

    from music_dagster.model.music import check_checkpoint

    train = load_config(profile="tiny").with_values("train", ablation="no_layout").profile.train
    assert MusicSettings.from_config(train).ablation == "no_layout"  # what training builds its model with
    saved = _model(backbones, replace(SETTINGS, ablation="no_layout")).save_pretrained(tmp_path / "ckpt")
    config = saved / "music_config.json"
    meta = json.loads(config.read_text())
    assert meta["settings"]["ablation"] == "no_layout"
    assert MusicModel.from_pretrained(saved, backbones("music_llm"), backbones("music_vision")).settings.ablation \
        == "no_layout"
    del meta["settings"]["ablation"]  # a checkpoint saved before the ablation was recorded: the full plan
    config.write_text(json.dumps(meta))
    assert check_checkpoint(saved).settings.ablation == "none"
    meta["settings"]["ablation"] = "no_plan"
    config.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"music_config.json: .*ablation.*'no_plan'"):
        check_checkpoint(saved)


def test_bad_prompts(backbones, samples):
    model = _model(backbones)
    s = samples[0]
    with pytest.raises(ModelInputError, match="0 subjects"):
        model.encode(Sample(s.instruction, []), with_target=False)
    with pytest.raises(ModelInputError, match="13 subjects"):
        model.encode(Sample(s.instruction, [s.references[0]] * 13), with_target=False)
    with pytest.raises(ModelInputError, match="empty instruction"):
        model.encode(Sample("  ", s.references), with_target=False)
    with pytest.raises(ModelInputError, match="needs cot, layout and target"):
        model.encode(Sample(s.instruction, s.references))
    with pytest.raises(ModelInputError, match="branches"):
        model.plan([s], branches=0)
