"""Measured training memory, step time and MFU of MUSIC and its de-tokenizer at full size, and one N = 4 generation.

`python scripts/gpu_full_size_check.py` on a machine with one GPU of 80 GB or more (the full profile: a few steps of
each model and one generation, stopped at `--budget-s`, 450 s by default, with exit 1; not yet run on a GPU);
`--device cpu --profile tiny` runs the same steps at the tiny profile's sizes on a CPU in seconds (how
`tests/test_gpu_check.py` tests it). Nothing is downloaded; the weights are random:

- the de-tokenizer (SDXL's UNet, its token resampler and pooled projection, the frozen VAE and its own SigLIP tower)
  and MUSIC (Qwen3-8B with LoRA, SigLIP so400m, both resamplers) are built from the configs `music check full`
  reads (`configs/full/`; the tiny profile: its zoo folders' configs) straight on the device, with each library's
  random initialisation, each backbone in the dtype its loader gives it (`loaders.role_dtype`), through the training
  code's own constructors (`train.build_detokenizer`, given the VAE built here, and `train.build_model`: trainable
  parts in fp32, gradient checkpointing as the profile says);
- each runs `--steps` optimizer steps of the training loop itself (`train.run_loop`: accelerate at the section's
  `mixed_precision` from `train.make_accelerator`, AdamW, clipping, warm-up; with `out_dir=None`, so no checkpoint
  is written) of the trainers' own steps (`train.detokenizer_step`, `train.music_step`) at the section's
  `batch_size`, on synthetic samples of the shapes `music check full` steps: `data.max_subjects` references of
  `data.reference_size` px, an instruction of `dryrun.INSTRUCTION_TOKENS` tokens, a plan of `train.max_plan_tokens`
  tokens, targets of `data.image_size` px. Each step encodes its batch as the loops do (the de-tokenizer always;
  MUSIC unless `train.cache_features`, which keeps a sample's features after its first step: one batch of samples
  makes an epoch);
- it prints a row per model as soon as it is measured (the seconds its phase took, building included): the
  measured peak memory (on CUDA `max_memory_allocated` over the steps, less what was
  allocated before the model was built: the model's own; on a CPU, which keeps no allocator statistics, the
  process's peak RSS) beside `music check full`'s estimate for one process (its figure less DDP's buckets, which
  only several processes allocate); the mean step time after `--warmup` steps; model FLOPs per step and MFU;
- then one generation of `--branches` branches for `data.max_subjects` subjects, as `Generator.generate_images`
  runs it: plans sampled in one batch under the plan grammar, the image tokens of every branch in one forward, one
  batched DDIM decode (the de-tokenizer in fp32, as `Detokenizer.from_pretrained` loads it), each stage timed; the
  CLIP scoring of the branches (`select_clip`: a ViT-B/16 forward over N images) is left out. With random weights
  the plans and images are noise: only the times mean something.

Model FLOPs are every FLOP of one training step as the timed steps run it (what a step caches, cached), forward and
backward, the frozen encoders' no-grad forwards included and gradient checkpointing's recomputation not (it is
paused for the count): torch's `FlopCounterMode` on one sample's second step, times the batch (all samples have one
shape). MFU = model FLOPs per step / mean step time / the device's peak dense bf16 FLOPS (`PEAK_BF16_TFLOPS` by
device name, or `--peak-tflops`).

Stand-in: `configs/full/` keeps no tokenizer, so text is tokenised by the tiny zoo's MUSIC BPE (512 tokens, made in
memory, ids valid in Qwen's vocabulary). The training step's text has the real token counts; a decoded plan's
grammar runs over 512 tokens instead of Qwen's 151k, so its per-token mask costs less than a real decode's.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GIB = 2 ** 30
# Peak dense bf16 tensor-core TFLOPS (NVIDIA's data sheets), the first name found in the device's name wins.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
ROLES_BUILT = ("music_llm", "music_vision", "music_unet")


class TimeLimit(Exception):
    """The run passed `--budget-s`."""


@dataclass
class TrainingFigures:
    """One model's row of the table."""

    name: str
    batch: int
    sample: str  # a MUSIC sample's tokens, a de-tokenizer sample's pixels
    steps: int
    phase_s: float  # the whole phase: building, the FLOP count, the steps
    peak_gib: float
    estimate_gib: float
    step_s: float
    tflop_per_step: float
    mfu: float | None


# ---------------------------------------------------------------------------------------------------------------
# Building at full size with random weights
def build_role(config, role: str, device, **handle):
    """`role`'s model built from its config (`dryrun.config_folder`) on `device` with random weights, in the dtype
    its loader gives it, as a `ModelHandle` with `handle`'s extra attributes (tokenizer, processor)."""
    from music_dagster.zoo import dryrun
    from music_dagster.zoo.loaders import ModelHandle, role_dtype

    dtype = role_dtype(role, config.profile.dtype, device)
    model = dryrun.build(dryrun.config_folder(config.models[role]), role, dtype=dtype, device=device).eval()
    if role == "music_unet":
        return ModelHandle(role, device, dtype, unet=model.to(dtype))
    return ModelHandle(role, device, dtype, model=model, **handle)


def vision_role(config, device):
    """`music_vision` with SigLIP's image processor at the tower's size (what the checkpoints' preprocessor configs
    hold: bicubic resize, rescale, normalise to [-1, 1])."""
    from transformers import SiglipImageProcessor

    handle = build_role(config, "music_vision", device)
    size = handle.model.config.image_size
    handle.processor = SiglipImageProcessor(size={"height": size, "width": size})
    return handle


def plan_tokenizer():
    """The tiny zoo's MUSIC tokenizer (`zoo/tiny.py`'s `music_llm`), made in memory: a Qwen2Tokenizer over a
    512-token BPE, whose ids are valid in either profile's vocabulary."""
    from music_dagster.zoo.tiny import MUSIC_SPECIALS, make_qwen_tokenizer

    return make_qwen_tokenizer(MUSIC_SPECIALS, 512, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                               unk_token=None, extra_special_tokens=["<img>", "</img>"])


def noise_image(size: int, seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def filler_words(encode, make, tokens: int) -> int:
    """The k for which `encode(make(k))` is `tokens` tokens long, `make(k)` holding k filler words of one token."""
    k = 1 + tokens - len(encode(make(1)))
    if k < 1 or len(encode(make(k))) != tokens:
        raise RuntimeError(f"no text of {tokens} tokens: the filler word is not one token")
    return k


def synthetic_samples(model, config, count: int) -> list:
    """`count` MUSIC training samples of the longest shape the profile trains (`music check full`'s step): an
    instruction of `dryrun.INSTRUCTION_TOKENS` tokens, `data.max_subjects` references, a plan of
    `train.max_plan_tokens` tokens with its eos (the CoT's length chosen for it, as `plan_text` writes the plan; an
    ablation without a CoT keeps its plan's own length) and a target. Random pixels, one set for every sample."""
    import numpy as np

    from music_dagster.config import plan_parts
    from music_dagster.model.music import Sample, plan_text
    from music_dagster.zoo.dryrun import INSTRUCTION_TOKENS

    data, train = config.profile.data, config.profile.train
    n, grid = data.max_subjects, data.grid
    layout = (np.arange(grid * grid) % (n + 1)).reshape(grid, grid)  # every subject owns cells

    def words(k):
        return " ".join(["a"] * k)

    def sentence(k):
        return words(k) + "."

    instruction = words(filler_words(model.encode_ids, words, INSTRUCTION_TOKENS))
    cot = sentence(1)
    writes_cot, _ = plan_parts(train.ablation)
    if writes_cot:
        cot = sentence(filler_words(model.encode_ids, lambda k: plan_text(sentence(k), layout, train.ablation),
                                    train.max_plan_tokens - 1))  # the eos is the plan's last token
    references = [noise_image(data.reference_size, i) for i in range(n)]
    target = noise_image(data.image_size, n)
    return [Sample(instruction=instruction, references=references, cot=cot, layout=layout, target=target,
                   id=f"synthetic-{i}") for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# Measuring
class PeakMemory:
    """A phase's peak memory in GiB: on CUDA `max_memory_allocated` since `restart`, less what was allocated when
    the phase began when `own` (the phase's own tensors); on a CPU, which keeps no allocator statistics, the
    process's peak RSS."""

    def __init__(self, device, own: bool = True):
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        self.base = torch.cuda.memory_allocated(device) if self.cuda and own else 0
        self.started = time.perf_counter()

    def restart(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def gib(self) -> float:
        import torch

        if self.cuda:
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def recomputation_paused(model):
    """Gradient checkpointing off inside the block (transformers' layers and diffusers' blocks read their
    `gradient_checkpointing` flag at each call), on again after: a FLOP count then holds each FLOP of the step
    once, not its recomputation as well."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def step_flops(model, step, batch: int) -> float:
    """Model FLOPs of one training step at `batch`, as the loop runs it from its second step on (what the step
    caches, `train.cache_features`, cached by a first call): one sample's forward and backward counted, times
    `batch`."""
    from torch.utils.flop_counter import FlopCounterMode

    with recomputation_paused(model):
        step(model, [0])["loss"].backward()
        with FlopCounterMode(display=False) as counter:
            step(model, [0])["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) * batch


def peak_tflops(device, given: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOPS, where the figure comes from): `--peak-tflops`, else `PEAK_BF16_TFLOPS` by name."""
    import torch

    if given is not None:
        return given, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops, f"the table's {key}"
    return None, "unknown: pass --peak-tflops for MFU"


def train_steps(config, section, accelerator, model, step, metric_names, args, device) -> list[float]:
    """`args.steps` optimizer steps of the training loop (`train.run_loop`, no checkpoints) at `section.batch_size`,
    over one batch of samples, an epoch each (what a loop caches is cached from the second step on, as in a long
    run); the seconds of each step after the first `args.warmup` (the first also holds the loop's set-up)."""
    from music_dagster.model.runtime import flush_denormals
    from music_dagster.training.train import run_loop

    stamps = [time.perf_counter()]

    def on_step(_step, _values):  # after the step's losses are reduced to floats: its kernels have run
        synchronize(device)
        stamps.append(time.perf_counter())

    with flush_denormals():
        run_loop(accelerator=accelerator, model=model, n_items=section.batch_size,
                 cfg=section.model_copy(update={"epochs": args.steps, "max_steps": args.steps}), seed=config.seed,
                 out_dir=None, step_fn=step, metric_names=metric_names, on_step=on_step)
    accelerator.free_memory()
    gc.collect()  # the optimizer's states (the de-tokenizer's: 21 GB) go before the next model is built
    return [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]


def figures(name, batch, sample, args, memory, estimate_gib, times, flops, peak) -> TrainingFigures:
    step_s = sum(times) / len(times)
    return TrainingFigures(name, batch, sample, args.steps, time.perf_counter() - memory.started, memory.gib(),
                           estimate_gib, step_s, flops / 1e12, flops / step_s / (peak * 1e12) if peak else None)


# ---------------------------------------------------------------------------------------------------------------
# The phases
def measure_detokenizer(config, device, args, estimate_gib, peak):
    """The de-tokenizer built and trained for `args.steps` steps: (the model, its figures)."""
    from music_dagster.training.train import (DETOKENIZER_METRICS, build_detokenizer, detokenizer_step,
                                              make_accelerator)
    from music_dagster.zoo import dryrun

    section = config.profile.detokenizer
    memory = PeakMemory(device)
    vision = vision_role(config, device)  # its own tower, as `train_detokenizer` loads one
    vae = None
    if section.vae is not None:
        vae = dryrun.build(dryrun.config_folder(section.vae), device=device).eval().requires_grad_(False)
    detok = build_detokenizer(config, unet=build_role(config, "music_unet", device), vision=vision, vae=vae)
    images = [noise_image(config.profile.data.image_size, i) for i in range(section.batch_size)]
    step = detokenizer_step(detok, vision, images.__getitem__, config.profile.train.image_queries)
    accelerator = make_accelerator(config, section.mixed_precision, device.type)
    flops = step_flops(detok, step, section.batch_size)
    memory.restart()
    times = train_steps(config, section, accelerator, detok, step, DETOKENIZER_METRICS, args, device)
    return detok, figures("de-tokenizer", section.batch_size, f"{detok.image_size}px", args, memory, estimate_gib,
                          times, flops, peak)


def measure_music(config, device, tokenizer, args, estimate_gib, peak):
    """MUSIC built and trained for `args.steps` steps: (the model, its figures)."""
    from music_dagster.training.train import MUSIC_METRICS, build_model, make_accelerator, music_step

    train = config.profile.train
    memory = PeakMemory(device)
    model = build_model(config, build_role(config, "music_llm", device, tokenizer=tokenizer),
                        vision_role(config, device))
    samples = synthetic_samples(model, config, train.batch_size)
    tokens = len(model.encode(samples[0], ablation=train.ablation)["ids"])
    accelerator = make_accelerator(config, train.mixed_precision, device.type)
    step = music_step(model, samples.__getitem__, train, accelerator)
    flops = step_flops(model, step, train.batch_size)
    memory.restart()
    times = train_steps(config, train, accelerator, model, step, MUSIC_METRICS, args, device)
    return model, figures("MUSIC", train.batch_size, f"{tokens}tok", args, memory, estimate_gib, times, flops, peak)


def measure_generation(model, detok, config, device, branches: int) -> str:
    """One request of `data.max_subjects` subjects and `branches` branches through MUSIC and the de-tokenizer as
    `Generator.generate_images` runs them; one line of times."""
    from music_dagster.model.music import Sample
    from music_dagster.model.runtime import flush_denormals

    gen, data = config.profile.generate, config.profile.data
    references = [noise_image(data.reference_size, 100 + i) for i in range(data.max_subjects)]
    request = Sample(instruction="put " + " and ".join(f"[{i}]" for i in range(1, data.max_subjects + 1)) +
                     " on a table", references=references)
    memory = PeakMemory(device, own=False)
    memory.restart()
    with flush_denormals():
        t0 = time.perf_counter()
        encoded = [model.encode(request, with_target=False)]
        plans = model.plan([request], branches=branches, sample=branches > 1, temperature=gen.temperature,
                           top_k=gen.top_k, max_new_tokens=gen.max_plan_tokens, seed=config.seed, encoded=encoded,
                           constrained=True)[0]
        synchronize(device)
        t1 = time.perf_counter()
        tokens = model.image_tokens([request] * branches, plans, encoded=encoded * branches)
        synchronize(device)
        t2 = time.perf_counter()
        detok.decode(tokens, seed=config.seed, steps=gen.decode_steps)  # PIL images: the kernels have run
        t3 = time.perf_counter()
    longest = max(len(p.token_ids) for p in plans)
    steps = gen.decode_steps or detok.settings.decode_steps
    return (f"generation, {branches} branches of {data.max_subjects} subjects: plan {t1 - t0:.2f} s ({longest} "
            f"tokens), image tokens {t2 - t1:.2f} s, decode {t3 - t2:.2f} s ({steps} steps); total {t3 - t0:.2f} s; "
            f"peak {memory.gib():.3g} GiB, both models included (random weights: the plans and images are noise)")


# ---------------------------------------------------------------------------------------------------------------
HEADER = (f"{'model':<14}{'batch':>6}{'sample':>9}{'steps':>6}{'phase s':>9}{'peak GiB':>10}{'est. GiB':>10}"
          f"{'step s':>9}{'TFLOP/step':>12}{'MFU':>8}")


def row(r: TrainingFigures) -> str:
    mfu = f"{100 * r.mfu:.3g}%" if r.mfu is not None else "n/a"
    return (f"{r.name:<14}{r.batch:>6}{r.sample:>9}{r.steps:>6}{r.phase_s:>9.3g}{r.peak_gib:>10.3g}"
            f"{r.estimate_gib:>10.3g}{r.step_s:>9.3g}{r.tflop_per_step:>12.4g}{mfu:>8}")


def check(args) -> None:
    import torch

    from music_dagster.config import load_config
    from music_dagster.zoo import dryrun

    config = load_config(profile=args.profile)
    config.check_models(ROLES_BUILT)
    device = torch.device(args.device)
    torch.set_num_threads(config.profile.torch_threads)  # as the training loops set it
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{device_name}, torch {torch.__version__}; profile {args.profile}; peak bf16 "
          f"{f'{peak:g} TFLOPS' if peak else 'n/a'} ({peak_source})", flush=True)

    t0 = time.perf_counter()
    with dryrun.quiet_libraries():
        music_estimate, _ = dryrun.music_step(config)
        detok_estimate = dryrun.detokenizer_step(config)
    train, detok_cfg = config.profile.train, config.profile.detokenizer
    estimates = {name: (mem.total(ckpt) - mem.buckets) / GIB for name, mem, ckpt in (
        ("MUSIC", music_estimate, train.gradient_checkpointing),
        ("de-tokenizer", detok_estimate, detok_cfg.gradient_checkpointing))}
    print(f"music check full's estimates in {time.perf_counter() - t0:.0f} s", flush=True)

    print(HEADER, flush=True)
    with dryrun.quiet_libraries():
        detok, detok_figures = measure_detokenizer(config, device, args, estimates["de-tokenizer"], peak)
        print(row(detok_figures), flush=True)
        model, music_figures = measure_music(config, device, plan_tokenizer(), args, estimates["MUSIC"], peak)
        print(row(music_figures), flush=True)
        measured = "each model's own tensors (max_memory_allocated)" if device.type == "cuda" else "the process's RSS"
        print(f"(peak: {measured}; est.: music check full for one process, without DDP buckets; step s: mean after "
              f"{args.warmup} warm-up step(s); checkpointing: MUSIC {'on' if train.gradient_checkpointing else 'off'}, "
              f"de-tokenizer {'on' if detok_cfg.gradient_checkpointing else 'off'}; mixed precision: "
              f"{train.mixed_precision}, {detok_cfg.mixed_precision})", flush=True)
        generation = measure_generation(model, detok, config, device, args.branches)
    print(generation)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", choices=["full", "tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per model (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the mean (default 2)")
    parser.add_argument("--branches", type=int, default=4, help="branches of the generation (default 4)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOPS, for MFU")
    parser.add_argument("--budget-s", type=int, default=450, help="stop, exit 1, past this many seconds (450)")
    args = parser.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps (the first step also holds the loop's set-up)")
    if args.branches < 1 or (args.peak_tflops is not None and args.peak_tflops <= 0):
        parser.error("--branches and --peak-tflops must be positive")

    import torch

    from music_dagster.console import quiet_third_party
    from music_dagster.errors import UserError

    quiet_third_party()

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_full_size_check: no CUDA device here (--device cpu --profile tiny runs the same steps on a CPU)",
              file=sys.stderr)
        return 1

    def out_of_time(signum, frame):
        raise TimeLimit

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(args.budget_s)
    try:
        check(args)
    except TimeLimit:
        print(f"gpu_full_size_check: stopped at the time guard ({args.budget_s} s, --budget-s)", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"gpu_full_size_check: {e}", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
