"""`scripts/gpu_full_size_check.py`: its CPU mode (the tiny profile's sizes, the same steps as on a GPU) prints a row
per model with positive figures and a timed generation; model FLOPs leave gradient checkpointing's recomputation
out, and a step's cache is not counted again; without a GPU the GPU mode is one line and a non-zero exit."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from music_dagster.config import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "gpu_full_size_check.py"


def run_script(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gpu_full_size_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_cpu_mode_prints_each_models_figures_and_a_generation(tiny_zoo, make_project):
    # checkpointing on, as the full profile has it: the FLOP count pauses it, the steps use it
    project = make_project(train={"gradient_checkpointing": True}, detokenizer={"gradient_checkpointing": True})
    config = project.get()
    done = run_script("--device", "cpu", "--profile", "tiny", "--steps", "3", "--warmup", "1",
                      "--peak-tflops", "0.05", env=project.environment())
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split() == ["model", "batch", "sample", "steps", "phase", "s", "peak", "GiB", "est.", "GiB",
                                     "step", "s", "TFLOP/step", "MFU"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1:header + 3]}
    assert rows.keys() == {"de-tokenizer", "MUSIC"}
    sizes = {"de-tokenizer": (config.profile.detokenizer.batch_size, "32px"),
             "MUSIC": (config.profile.train.batch_size, None)}
    for name, (batch, sample, steps, phase_s, peak, estimate, step_s, tflop, mfu) in rows.items():
        assert int(batch) == sizes[name][0] and int(steps) == 3
        assert sample == sizes[name][1] if sizes[name][1] else re.fullmatch(r"\d+tok", sample)
        assert mfu.endswith("%")
        figures = [float(v) for v in (phase_s, peak, estimate, step_s, tflop, mfu.rstrip("%"))]
        assert float(phase_s) > 2 * float(step_s)  # the phase holds the steps
        assert all(v > 0 for v in figures), (name, figures)
    # the plan holds train.max_plan_tokens: the sequence is at least that long
    assert int(rows["MUSIC"][1].removesuffix("tok")) > config.profile.train.max_plan_tokens
    assert "checkpointing: MUSIC on, de-tokenizer on" in done.stdout
    generation = next(line for line in lines if line.startswith("generation, 4 branches of 12 subjects"))
    seconds = [float(v) for v in re.findall(r"([\d.]+) s\b", generation)]
    assert len(seconds) == 4 and all(v > 0 for v in seconds)
    assert seconds[3] >= max(seconds[:3])  # the total


def test_model_flops_leave_out_gradient_checkpointings_recomputation(tiny_zoo, script):
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_zoo["music_unet"]).train()
    x, cond = torch.randn(1, 3, 32, 32), torch.randn(1, 4, unet.config.cross_attention_dim)

    def step(model, indices):
        return {"loss": model(x, torch.tensor([10]), encoder_hidden_states=cond).sample.square().mean()}

    plain = script.step_flops(unet, step, batch=3)
    unet.enable_gradient_checkpointing()
    checkpointed = script.step_flops(unet, step, batch=3)
    assert checkpointed == plain > 0
    assert unet.is_gradient_checkpointing  # on again after the count
    assert all(p.grad is None for p in unet.parameters())  # the count leaves no gradient behind
    with FlopCounterMode(display=False) as counter:  # what the hardware does: the blocks' forward again
        step(unet, [0])["loss"].backward()
    assert counter.get_total_flops() * 3 > plain


def test_model_flops_count_a_step_whose_cache_is_filled(script):
    """As the timed steps run: what a step caches (`train.cache_features`) is not counted again."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 8), torch.randn(4, 8)
    cache = []

    def cached(model, indices):  # its first call encodes (a matmul), the later ones read the cache
        if not cache:
            cache.append(torch.randn(4, 64) @ torch.randn(64, 8))
        return {"loss": model(cache[0]).sum()}

    def plain(model, indices):
        return {"loss": model(x).sum()}

    with FlopCounterMode(display=False) as first:
        cached(layer, [0])["loss"].backward()
    cache.clear()
    layer.zero_grad(set_to_none=True)
    assert script.step_flops(layer, cached, batch=2) == script.step_flops(layer, plain, batch=2) > 0
    assert first.get_total_flops() * 2 > script.step_flops(layer, plain, batch=2)


def test_peak_flops_come_from_the_table_or_the_option(script, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert script.peak_tflops(torch.device("cuda"), None) == (756.0, "the table's H100 PCIe")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert script.peak_tflops(torch.device("cuda"), None)[0] == 989.0
    assert script.peak_tflops(torch.device("cuda"), 500.0) == (500.0, "--peak-tflops")
    assert script.peak_tflops(torch.device("cpu"), None)[0] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_mode_without_a_gpu_is_one_line_and_exit_1():
    done = run_script()
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "gpu_full_size_check: no CUDA device here (--device cpu --profile tiny runs the same steps on a CPU)"]
