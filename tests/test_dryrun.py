"""`music check full`: every full-profile role built without weights from the repository's copies of the Hub
configs, sizes against the published ones, MUSIC and the de-tokenizer stepped at full size on the meta device."""
import dataclasses
import json
import re
import subprocess
import sys

import pytest

from music_dagster.config import ROLES, load_config
from music_dagster.zoo.dryrun import (
    CONFIGS, GIB, DryRunError, SavedTensors, build_role, check_budgets, check_full, check_sizes, compute_dtype,
    detokenizer_step, format_report, quiet_libraries, read_sources,
)
from music_dagster.zoo.loaders import HF_MODEL_CLASSES, PIPELINE_CLASSES

# Published sizes, from the model cards and reports (independent of configs/full/sources.json).
PUBLISHED = {
    "Qwen/Qwen3-8B": 8.19e9,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8.29e9,
    "black-forest-labs/FLUX.1-dev/transformer": 11.9e9,
    "black-forest-labs/FLUX.1-dev/text_encoder_2": 4.76e9,  # T5-XXL encoder
    "black-forest-labs/FLUX.1-dev/text_encoder": 123e6,  # CLIP-L text
    "black-forest-labs/FLUX.1-Kontext-dev/transformer": 11.9e9,
    "IDEA-Research/grounding-dino-base": 233e6,
    "facebook/sam2.1-hiera-large": 224.4e6,  # with its video memory (the compared column)
    "timm/vit_large_patch14_clip_224.openai": 427.6e6,
    "timm/vit_base_patch16_clip_224.openai": 149.6e6,  # select_clip
    "timm/vit_small_patch16_224.dino": 21.7e6,
    "google/siglip-so400m-patch14-384": 878e6,  # both towers (the compared column)
    "stabilityai/stable-diffusion-xl-base-1.0/unet": 2.57e9,
}
# The class each role's handle holds (CONTRIBUTING.md, "Model handles").
CLASSES = {
    "llm": "Qwen3ForCausalLM", "vlm": "Qwen2_5_VLForConditionalGeneration", "detector": "GroundingDinoForObjectDetection",
    "segmenter": "Sam2Model", "clip": "CLIP", "dino": "VisionTransformer", "eval_clip": "CLIP",
    "music_llm": "Qwen3ForCausalLM", "music_vision": "SiglipVisionModel", "music_unet": "UNet2DConditionModel",
    "select_clip": "CLIP",
}
LAST_LINE = re.compile(r"^full profile: (\d+) roles built without weights; MUSIC training at batch (\d+) needs "
                       r"(\d+\.\d) GiB per GPU \(fits 80 GiB: (yes|no)\)$")
DETOKENIZER_LINE = re.compile(r"^de-tokenizer training at batch (\d+) needs (\d+\.\d) GiB per GPU "
                              r"\(fits 80 GiB: (yes|no)\)$")


@pytest.fixture(scope="module")
def report():
    import torch

    torch.set_num_threads(1)
    return check_full(load_config(profile="full"))


def _count(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1e9, "M": 1e6}[unit]


def test_the_plan_budget_holds_the_full_profiles_detailed_cot():
    config = load_config(profile="full")
    data, train = config.profile.data, config.profile.train
    plan, answer = check_budgets(config)
    assert data.cot_words_per_subject >= 40 and plan <= train.max_plan_tokens and answer <= data.max_new_tokens
    assert plan > 12 * data.cot_words_per_subject  # the CoT is most of the plan
    longer = config.with_values("data", cot_words_per_subject=data.cot_words_per_subject + 16)
    with pytest.raises(DryRunError, match=rf"^train\.max_plan_tokens \({train.max_plan_tokens}\) is shorter than"):
        check_budgets(longer)
    with pytest.raises(DryRunError, match=r"^data\.max_new_tokens \(1024\) is shorter than the VLM's longest"):
        check_budgets(config.with_values("data", max_new_tokens=1024))
    assert check_budgets(longer.with_values("train", max_plan_tokens=2048))[0] > plan


def test_the_report_names_the_plan_budget(report):
    data, train = load_config(profile="full").profile.data, load_config(profile="full").profile.train
    line = next(line for line in format_report(report) if line.startswith("MUSIC's plan budget"))
    assert f"{train.max_plan_tokens} tokens" in line and f"{data.cot_words_per_subject} CoT words" in line
    assert report.music_tokens > train.max_plan_tokens  # the step is measured at the budget


def test_every_role_matches_its_published_size(report):
    lines = format_report(report)
    compared = {}
    for line in lines[1:]:
        cells = re.split(r" {2,}", line.strip())
        if len(cells) == 7 and cells[0] in ROLES:
            compared[cells[1]] = _count(cells[4])
    assert set(PUBLISHED) <= set(compared)
    for part, published in PUBLISHED.items():
        assert abs(compared[part] / published - 1) <= 0.02, part
    assert sorted(report.roles) == sorted(ROLES)


def test_last_line_says_music_fits_with_the_profiles_checkpointing(report):
    train = load_config(profile="full").profile.train
    last = format_report(report)[-1]
    m = LAST_LINE.match(last)
    assert m, last
    roles, batch, gib, fits = m.groups()
    assert (int(roles), int(batch), fits) == (len(ROLES), train.batch_size, "yes")
    assert train.gradient_checkpointing and float(gib) < 80
    # The same step without checkpointing keeps every layer's activations: it does not fit.
    off = format_report(dataclasses.replace(report, music_checkpointing=False))[-1]
    assert LAST_LINE.match(off).group(4) == "no"
    assert report.music.activations > 4 * report.music.activations_checkpointed
    assert report.detokenizer.total(True) < report.detokenizer.total(False)


def test_memory_terms_follow_the_formula(report):
    full = load_config(profile="full").profile
    assert full.train.num_processes > 1 and full.detokenizer.num_processes > 1
    assert full.train.mixed_precision == full.detokenizer.mixed_precision == "bf16"
    for mem in (report.music, report.detokenizer):
        # fp32 master weights' gradients, DDP's all-reduce buckets (8 processes), AdamW's two fp32 moments
        assert (mem.gradients, mem.buckets, mem.optimizer) == (4 * mem.trainable, 4 * mem.trainable, 8 * mem.trainable)
        # bf16 autocast: a 2-byte copy of every trainable matrix, convolution and bias (not the norms' scales,
        # the queries and markers)
        assert 0.99 * 2 * mem.trainable < mem.casts < 2 * mem.trainable
        assert mem.total(True) == (mem.weights + mem.gradients + mem.buckets + mem.optimizer + mem.casts
                                   + mem.activations_checkpointed)
    music = report.music
    # bf16 frozen backbones (Qwen3-8B + SigLIP vision) plus fp32 trainables
    assert music.weights == 2 * music.frozen + 4 * music.trainable
    # LoRA r=64 on every projection of 36 layers (174.6 M) plus the two resamplers
    assert 0.5e9 < music.trainable < 0.7e9
    detok = report.detokenizer
    assert detok.trainable > 2.56e9  # the whole SDXL UNet trains, with its resampler and pooled projection
    # frozen: the SDXL VAE in fp32 (83.7 M) and SigLIP's vision tower in bf16 (428.2 M)
    assert detok.weights == 4 * detok.trainable + 4 * 83_653_863 + 2 * (detok.frozen - 83_653_863)


def _autocast_step(device: str, mixed_precision: str):
    """Saved bytes of a small fp32 step, each weight used twice: on `device` "cpu" under torch's own autocast (CPU),
    on "meta" under the dry run's CUDA rules (which agree with the CPU's for linear, GELU and MSE)."""
    import torch
    import torch.nn.functional as F

    first, second = torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(64, 32, bias=False)
    model = torch.nn.Sequential(first, torch.nn.GELU(), second).to(device)
    saved = SavedTensors(model, [], compute_dtype(mixed_precision) if device == "meta" else None)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=device == "cpu" and mixed_precision == "bf16")
    with autocast, saved.counting():
        h = second(first(model(torch.ones(8, 32, device=device))))
        loss = F.mse_loss(h, torch.zeros(8, 32, device=device))
    loss.backward()
    return saved


def test_the_meta_steps_mixed_precision_saves_what_autocast_saves():
    cpu, meta = _autocast_step("cpu", "bf16"), _autocast_step("meta", "bf16")
    weights = 32 * 64 + 64 * 32
    # each weight cast to bf16 once per forward (autocast's cache), though used twice; on the CPU its copy is among
    # what the matmuls save, in the dry run it is its own term
    assert meta.casts == 2 * weights and cpu.casts == 0
    assert cpu.total == meta.total + meta.casts
    # activations: the matmuls' 4 inputs and GELU's in bf16 (the first input cast), MSE's two operands in fp32
    assert meta.total == 2 * (2 * 8 * 32 + 3 * 8 * 64) + 4 * 2 * 8 * 32
    # mixed_precision "no": everything in fp32, nothing cast
    plain, meta_plain = _autocast_step("cpu", "no"), _autocast_step("meta", "no")
    assert meta_plain.casts == 0 and meta_plain.total == plain.total > meta.total


def test_the_detokenizer_estimate_follows_its_precision_and_process_count(report):
    import torch

    torch.set_num_threads(1)
    config = load_config(profile="full").with_values("detokenizer", mixed_precision="no", num_processes=1)
    with quiet_libraries():
        plain = detokenizer_step(config)
    mixed = report.detokenizer
    assert (plain.trainable, plain.weights, plain.optimizer) == (mixed.trainable, mixed.weights, mixed.optimizer)
    assert plain.casts == plain.buckets == 0
    # fp32 activations: more than bf16's, though autocast keeps the norms' inputs and outputs in fp32 too
    assert 1.3 * mixed.activations < plain.activations < 2 * mixed.activations
    assert 1.3 * mixed.activations_checkpointed < plain.activations_checkpointed
    line = next(line for line in format_report(report) if line.startswith("de-tokenizer training"))
    batch, gib, fits = DETOKENIZER_LINE.match(line).groups()
    assert (int(batch), fits) == (report.detokenizer_batch, "yes")
    assert float(gib) == round(mixed.total(True) / GIB, 1) and mixed.total(False) / GIB > 80


def test_cli_prints_the_table_and_the_last_line(report):
    out = subprocess.run([sys.executable, "-m", "music_dagster.cli", "check", "full"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == format_report(report)[-1]
    assert any(line.startswith("music_llm ") and "Qwen/Qwen3-8B" in line for line in lines)
    assert "Traceback" not in out.stderr


def test_full_specs_class_and_revision_offline(report):
    """Each full-profile spec names a repository whose config is kept here, its revision is the one recorded
    with that config, and the class the loader builds from it is the handle's class."""
    config = load_config(profile="full")
    sources = read_sources()
    for role in ROLES:
        spec = config.models[role]
        repo = spec.id.removeprefix("hf-hub:")
        assert repo in sources["repos"], role
        assert spec.revision == sources["repos"][repo]["revision"], role
        if role in PIPELINE_CLASSES:
            index = json.loads((CONFIGS / repo / "model_index.json").read_text())
            assert index["_class_name"] == PIPELINE_CLASSES[role]
            assert {p.cls for p in report.roles[role]} == {"FluxTransformer2DModel", "AutoencoderKL", "CLIPTextModel",
                                                           "T5EncoderModel"}
        else:
            assert [p.cls for p in report.roles[role]] == [CLASSES[role]], role
    # every part's class is the one sources.json records for its folder
    for parts in report.roles.values():
        for part in parts:
            assert sources["parts"][part.folder]["class"] == part.cls, part.folder
    assert set(HF_MODEL_CLASSES) | set(PIPELINE_CLASSES) | {"clip", "eval_clip", "dino", "music_unet",
                                                           "select_clip"} == set(ROLES)
    # each open_clip config asks for OpenAI's QuickGELU, as the checkpoints were trained with
    for role in ("clip", "eval_clip", "select_clip"):
        folder = CONFIGS / config.models[role].id.removeprefix("hf-hub:")
        assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is True, role
    # MUSIC*'s selection encoder is not the CLIP that scores CLIP-T; dino is pinned to a full commit hash
    assert config.models["select_clip"].id != config.models["eval_clip"].id
    assert re.fullmatch(r"[0-9a-f]{40}", config.models["dino"].revision)


def test_a_size_far_from_the_published_is_one_line():
    sources = read_sources()
    spec = load_config(profile="full").models["dino"]
    parts = build_role("dino", spec, sources)
    check_sizes("dino", parts)
    parts[0].published *= 1.05
    with pytest.raises(DryRunError) as e:
        check_sizes("dino", parts)
    assert "\n" not in str(e.value) and "timm/vit_small_patch16_224.dino" in str(e.value) and "-4.9%" in str(e.value)
