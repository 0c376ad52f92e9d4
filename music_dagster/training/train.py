"""Training loops: MUSIC (`train_music`) and its de-tokenizer (`train_detokenizer`), with accelerate.

Both loops are the same shape (diffusers' dreambooth LoRA script style): an `Accelerator` (one process on the CPU
here; `accelerate launch` for many GPUs, each process taking its slice of every global batch), a seeded data order
that depends only on (seed, epoch), AdamW with linear warmup then a constant or linearly falling rate
(`lr_schedule`), gradient clipping, optionally a moving average of the weights as the result (`ema_decay`:
diffusers' `EMAModel`, as its training scripts' `--use_ema`), and `accelerator.save_state` every `checkpoint_every`
steps into `out_dir/checkpoints/checkpoint-<step>/` (written to a temporary folder, then renamed), with save/load
hooks that write only the trainable weights in safetensors (the frozen backbones are never copied).
A run finds the last complete checkpoint in `out_dir` and continues from it, with the same losses as an
uninterrupted run. The final weights go to `out_dir/model/` (MUSIC: peft adapter + resamplers, loadable with
`MusicModel.from_pretrained`; de-tokenizer: `Detokenizer.from_pretrained`), the per-step losses to
`out_dir/history.json`.

Training data: shard folders of training samples (the data assets' `training_samples`, or the procedural world
written by `procedural.write_procedural_shard`) and/or in-memory `Sample`s. MSIC hold-out samples
(`split == "msic"`) are never trained on; they are counted and skipped.

Note: accelerate keeps the optimizer, scheduler and RNG states of a resumable checkpoint as torch pickles
(`optimizer.bin`, `scheduler.bin`, `random_states_0.pkl`, with `ema_decay` the average as `custom_checkpoint_0.pkl`);
model weights are safetensors only.

This module imports torch at its top: import it inside asset functions.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from music_dagster.errors import UserError
from music_dagster.interrupts import raise_kept_interrupt
from music_dagster.model.music import IGNORE, MusicModel, MusicSettings, Sample, target_tokens
from music_dagster.model.runtime import device_of, flush_denormals, load_model
from music_dagster.training.records import StoredRecord, shard_records

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
MUSIC_METRICS = ("L1", "L2", "loss")  # what `run_loop` reports of each step
DETOKENIZER_METRICS = ("loss",)
HISTORY = "history.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

class TrainingError(UserError):
    """Training that cannot start: no training samples, a bad source, a checkpoint folder that does not fit."""


@dataclass
class TrainResult:
    """What a training run produced."""

    model_dir: Path  # the final weights (`save_pretrained` folder)
    steps: int  # optimizer steps done in total
    epochs: float
    samples: int  # training samples used (the de-tokenizer: distinct target images)
    skipped_msic: int  # MSIC hold-out samples seen in the sources and skipped
    resumed_from: int  # the checkpoint step this run started from (0: from scratch)
    history: list[dict] = field(repr=False, default_factory=list)  # {"step", "L1", "L2", "loss", "lr"} per step
    seconds: float = 0.0  # wall time of this run's steps (not counting loading)

    @property
    def steps_per_second(self) -> float:
        done = self.steps - self.resumed_from
        return done / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Samples
def _record_sample(stored: StoredRecord) -> tuple[Callable[[], Sample], Path]:
    """(the loader of the sample of a stored record, its target image's file); its image paths are resolved now,
    so a path outside the datasets root is refused before anything trains."""
    record, subjects = stored.fields, stored.subjects()
    references = [stored.resolve(s["reference"]) for s in subjects]
    target = stored.resolve(record["image"])

    def load() -> Sample:
        from music_dagster.images import read_image

        return Sample(
            instruction=record["instruction"], references=[read_image(p) for p in references],
            cot=record["cot"], layout=np.asarray(record["layout"], np.int64), target=read_image(target),
            id=record["sample_id"], meta={"split": record["split"], "shard": str(stored.shard),
                                          "subjects": [{k: s[k] for k in ("id", "category", "box")} for s in subjects]},
        )
    return load, target


def collect_samples(sources: Iterable, full_only: bool = False) -> tuple[list[Callable[[], Sample]], int]:
    """(loaders of the training samples, number of MSIC samples skipped) of `sources`: `training_samples` shard
    folders (str or PathLike; records validated against the asset's schema, image paths kept inside the datasets
    root), `Sample`s, or iterables of `Sample`s. Shard images are read when a sample is loaded."""
    found, skipped = _training_samples(sources, full_only)
    return [load for load, _ in found], skipped


def collect_targets(sources: Iterable) -> tuple[list[Callable], int]:
    """(loaders of the distinct target images of the training samples of `sources`, number of MSIC samples
    skipped), in the order of each image's first sample (`sources` as `collect_samples`'s). Decimation makes
    several samples of one target image; each image comes once: a stored sample's target is its image file (read
    each time its loader is called), an in-memory sample's is its pixels."""
    import hashlib

    from music_dagster.images import read_image

    found, skipped = _training_samples(sources)
    targets: dict[tuple, Callable] = {}
    for load, path in found:
        if path is not None:
            targets.setdefault(("file", path), lambda p=path: read_image(p))
        else:
            image = load().target
            pixels = (image.mode, image.size, hashlib.sha256(image.tobytes()).hexdigest())
            targets.setdefault(("pixels", pixels), lambda im=image: im)
    return list(targets.values()), skipped


def _training_samples(sources: Iterable, full_only: bool = False) -> tuple[list[tuple[Callable, Path | None]], int]:
    """`collect_samples`, with each loader's target image file (None for a sample in memory)."""
    from jsonschema import Draft202012Validator

    from music_dagster.storage import read_shard, schema_problem
    from music_dagster.synthesis.schemas import RECORDS

    validator = Draft202012Validator(RECORDS["training_samples"])
    items, skipped = [], 0

    def add(sample: Sample):
        nonlocal skipped
        if sample.meta.get("split") == "msic":
            skipped += 1
        elif not (full_only and sample.meta.get("source_subjects", len(sample.references)) > len(sample.references)):
            items.append((lambda s=sample: s, None))

    for source in sources:
        if isinstance(source, (str, os.PathLike)):
            shard = read_shard(source)
            for stored in shard_records(shard):
                record = stored.fields
                problem = schema_problem(validator, record)
                if problem is not None:
                    raise TrainingError(f"{shard.path}: record {stored.line - 1}: {problem}")
                loaded = _record_sample(stored)  # every row's paths checked, MSIC ones too
                if record["split"] == "msic":
                    skipped += 1
                elif full_only and record["num_subjects"] < record["source_subjects"]:
                    continue  # `full_only` (the no_decimation ablation): full subject counts only
                else:
                    items.append(loaded)
        elif isinstance(source, Sample):
            add(source)
        else:
            for sample in source:
                if not isinstance(sample, Sample):
                    raise TrainingError(f"a sample source yielded {type(sample).__name__}, not a Sample")
                add(sample)
    return items, skipped


def procedural_source(config, n: int | None = None, start: int = 0) -> list[Sample]:
    """The procedural world a config selects (`train.procedural_*`, seed `config.seed`), in memory: `n` world
    samples, each decimated as the data assets decimate (unless `train.ablation` is `no_decimation`)."""
    from music_dagster.model.procedural import WorldSettings, procedural_samples

    return procedural_samples(n or config.profile.train.procedural_samples, config.seed,
                              WorldSettings.from_config(config), start=start,
                              decimated=config.profile.train.ablation != "no_decimation")


# ---------------------------------------------------------------------------------------------------------------
# The loop shared by both trainers (and `scripts/gpu_full_size_check.py`)
def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    folder = out_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def make_accelerator(config, mixed_precision: str, device: str | None = None):
    """A training run's accelerator (one process, or this process of an `accelerate launch`) at `mixed_precision`
    on `device` (default: the configured one), with the torch threads and seeds set."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import set_seed

    torch.set_num_threads(config.profile.torch_threads)  # float sums differ with the thread count
    # accelerate holds one mixed precision per process and refuses another; a process trains several models (the
    # experiment: MUSIC at the profile's, then its selection CLIP at "no"), so a change starts the state again
    # (the process group, in PartialState, is kept)
    if is_initialized() and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()
    # One scheduler step per optimizer step: a step already consumes the global batch of every process.
    # cpu: the configured device, not whatever accelerate finds (under `accelerate launch` on CPUs: gloo processes)
    accelerator = Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
                              cpu=(device or device_of(config)) == "cpu")
    set_seed(config.seed)
    return accelerator


def _start(config, items: list, skipped: int, mixed_precision: str):
    """`make_accelerator`, once there is something to train on (`items`; `skipped` MSIC samples)."""
    if not items:
        raise TrainingError(f"no training samples (skipped {skipped} MSIC hold-out samples)")
    return make_accelerator(config, mixed_precision)


GROUPED_BATCHES = 50  # global batches sorted together by `epoch_order` (transformers' megabatch)


def epoch_order(seed: int, epoch: int, n_items: int, global_batch: int,
                lengths: Sequence[int] | None = None) -> np.ndarray:
    """The items of one epoch in training order, a function of (seed, epoch) only: a permutation; with `lengths`
    (each item's tokens) grouped by length as transformers' `LengthGroupedSampler` does, so a batch pads little:
    each run of `GROUPED_BATCHES` global batches of the permutation is sorted longest first and cut into batches,
    and those batches are shuffled (a short last batch stays last, where the epoch drops it)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_items)
    if lengths is None:
        return order
    span = GROUPED_BATCHES * global_batch
    grouped = []
    for start in range(0, n_items, span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])  # stable: ties keep their order
        full = len(chunk) // global_batch * global_batch
        batches = [chunk[j:j + global_batch] for j in range(0, full, global_batch)]
        for b in rng.permutation(len(batches)):
            grouped += batches[b]
        grouped += chunk[full:]
    return np.asarray(grouped, dtype=order.dtype)


def run_loop(*, accelerator, model, n_items: int, cfg, seed: int, out_dir: Path | None, step_fn: Callable,
             metric_names: Sequence[str], resume: bool = True, on_step=None, lengths: Sequence[int] | None = None):
    """The training loop over `n_items` items, `cfg` a `train`, `detokenizer` or `selection` section: its
    `batch_size`, `epochs`, `max_steps`, `lr`, `warmup_steps`, the optimizer keys the three share
    (`config._Optimized`), and with an `out_dir` its `checkpoint_every` and `checkpoints_kept`. `step_fn(model, indices)
    -> dict of scalar tensors with "loss"` (`music_step`, `detokenizer_step`); `lengths`: each item's length, to
    batch items of about one length together (`epoch_order`). Checkpoints (the model's trainable
    weights through its `save_pretrained` / `load_trainable`, accelerate's states, the history) go to
    `out_dir/checkpoints/`, a run resuming from the last one unless `resume` is false; `out_dir=None`: none read or
    written (a measurement, as `scripts/gpu_full_size_check.py`'s). Returns (unwrapped model, history, total
    steps, resumed-from step, seconds, epochs)."""
    from accelerate.utils import set_seed

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.batch_size * world
    per_epoch = max(1, n_items // global_batch)
    total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.epochs * per_epoch, cfg.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = cfg.warmup_steps

    def rate(s: int) -> float:
        """The factor on `cfg.lr` at (0-based) step `s`: a linear warmup, then constant or falling linearly to 0
        at the run's end."""
        ramp = min(1.0, (s + 1) / (warm + 1))
        return ramp if cfg.lr_schedule == "constant" else ramp * max(0.0, 1.0 - s / total)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = None  # the moving average of the trained weights (`ema_decay`), kept in the checkpoints
    if cfg.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
        accelerator.register_for_checkpointing(ema)

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            for m in models:
                accelerator.unwrap_model(m).save_pretrained(Path(folder) / MODEL_DIR)
        while weights:
            weights.pop()

    def load_hook(models, folder):
        while models:
            accelerator.unwrap_model(models.pop()).load_trainable(Path(folder) / MODEL_DIR)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    found = []  # the checkpoints to resume from
    if out_dir is not None:
        ckpt_root = out_dir / CHECKPOINTS
        if accelerator.is_main_process:
            for p in ckpt_root.glob(".checkpoint-*.tmp"):  # leftovers of a killed save
                shutil.rmtree(p, ignore_errors=True)
            if not resume:
                shutil.rmtree(ckpt_root, ignore_errors=True)
        accelerator.wait_for_everyone()
        if resume:
            found = _checkpoints(out_dir)
    history: list[dict] = []
    start = 0
    if found:
        start, path = found[-1]
        if start > total:
            raise TrainingError(f"{path}: checkpoint at step {start} is past this run's {total} steps")
        accelerator.load_state(str(path))
        history = json.loads((path / HISTORY).read_text())
    else:
        # the RNG stream of a fresh run (a resumed one gets its saved RNG states), seed + rank: each process draws
        # its own noise and timesteps (rank 0, and so a one-process run, the stream it always had)
        set_seed(seed, device_specific=True)

    order: dict[int, np.ndarray] = {}
    model.train()
    t0 = time.perf_counter()
    for step in range(start, total):
        raise_kept_interrupt()  # one that arrived while the models loaded, or in a callback that dropped it
        epoch, k = divmod(step, per_epoch)
        if epoch not in order:
            order.clear()
            order[epoch] = epoch_order(seed, epoch, n_items, global_batch, lengths)
        batch = order[epoch][k * global_batch:(k + 1) * global_batch]
        out = step_fn(model, batch[rank::world].tolist())
        accelerator.backward(out["loss"])
        accelerator.clip_grad_norm_(params, cfg.grad_clip)
        lr = float(scheduler.get_last_lr()[0])  # the rate this step used
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.step(params)
        optimizer.zero_grad(set_to_none=True)
        values = accelerator.reduce(torch.stack([out[n].detach().float() for n in metric_names]), "mean")
        entry = {"step": step + 1, **{n: float(v) for n, v in zip(metric_names, values)}, "lr": lr}
        history.append(entry)
        if on_step is not None and accelerator.is_main_process:
            on_step(step + 1, {k: v for k, v in entry.items() if k != "step"})
        if out_dir is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total):
            # the last one makes a re-run a no-op
            _save_checkpoint(accelerator, ckpt_root, step + 1, history, cfg.checkpoints_kept)
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)  # the averaged weights are the run's result (the checkpoints keep the trained ones)
    return accelerator.unwrap_model(model), history, total, start, seconds, total / per_epoch


def _save_checkpoint(accelerator, root: Path, step: int, history: list[dict], kept: int) -> None:
    """`save_state` into a temporary folder renamed into place; then drop the oldest beyond `kept`."""
    tmp = root / f".checkpoint-{step}.tmp"
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / HISTORY).write_text(json.dumps(history, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in _checkpoints(root.parent)[:-kept]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _finish(accelerator, out_dir: Path, history: list[dict], save: Callable) -> Path:
    target = out_dir / MODEL_DIR
    if accelerator.is_main_process:
        save(target)
        from music_dagster.storage import atomic_write_text

        atomic_write_text(out_dir / HISTORY, json.dumps(history, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    return target


# ---------------------------------------------------------------------------------------------------------------
# MUSIC
def build_model(config, llm=None, vision=None, models=None) -> MusicModel:
    """A fresh MusicModel from the given backbone handles, else fresh ones from their resources (`models`, role
    -> `ModelResource`, else the config's: `runtime.load_model`), and the `train` settings."""
    llm = llm or load_model(config, "music_llm", models)
    vision = vision or load_model(config, "music_vision", models)
    settings = MusicSettings.from_config(config.profile.train, grid=config.profile.data.grid)
    model = MusicModel(llm, vision, settings, base_model_name=config.models["music_llm"].id)
    if config.profile.train.gradient_checkpointing:  # each decoder layer recomputed in backward: memory for time
        model.llm.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    return model


def music_step(model: MusicModel, load: Callable[[int], Sample], train, accelerator) -> Callable:
    """`run_loop`'s step of MUSIC (`train`: the `train` section): the samples `load(i)` gives, each encoded at its
    step (and kept after its first one when `train.cache_features`), collated and run; L = w1 L1 + w2 L2."""
    cache: dict[int, dict] = {}

    def encoded(i: int) -> dict:
        if i in cache:
            return cache[i]
        e = model.encode(load(i), ablation=train.ablation)
        if train.cache_features:
            cache[i] = e
        return e

    def step(wrapped, indices):
        batch = model.collate([encoded(i) for i in indices])
        out = wrapped(batch)
        if accelerator.num_processes > 1:
            # L1 is a mean over this process's plan tokens; weighted by its share of the global batch's tokens, the
            # averaged gradient is the one of a single process holding the whole global batch
            tokens = (batch["labels"][:, 1:] != IGNORE).sum()
            share = tokens * accelerator.num_processes / accelerator.reduce(tokens.clone(), "sum")
            out["L1"] = out["L1"] * share
            out["loss"] = train.w1 * out["L1"] + train.w2 * out["L2"]
        return out
    return step


def train_music(config, sample_sources: Iterable, out_dir: str | os.PathLike, resume: bool = True,
                on_step: Callable[[int, dict], None] | None = None, llm=None, vision=None,
                models=None) -> TrainResult:
    """Train MUSIC on `sample_sources` (see `collect_samples`) into `out_dir` (see the module doc).

    L = w1 L1 + w2 L2 per step; `on_step(step, {"L1", "L2", "loss", "lr"})` after every optimizer step (main
    process). `llm` / `vision`: backbone handles to use instead of loading fresh ones (the LLM is modified in place);
    `models`: the backbones' resources (role -> `ModelResource`) to load them from instead of the config's.
    """
    train = config.profile.train
    out_dir = Path(out_dir)
    items, skipped = collect_samples(sample_sources, full_only=train.ablation == "no_decimation")
    accelerator = _start(config, items, skipped, train.mixed_precision)
    model = build_model(config, llm, vision, models)

    # L2 standardisation from a seeded subset of the training targets (overwritten by a resumed checkpoint).
    pick = np.random.default_rng([config.seed, 1 << 20]).permutation(len(items))[:train.feature_stats_samples]
    targets = [items[i]().target for i in pick]
    with torch.no_grad():
        model.set_feature_stats(torch.cat([
            target_tokens(model.vision, model.processor, targets[j:j + 32], train.image_queries)
            for j in range(0, len(targets), 32)]))

    # tokens per sample from the text alone (no image encoded); each sample is loaded once more for it
    lengths = [len(model.tokens(load(), ablation=train.ablation)["ids"]) for load in items] \
        if train.group_by_length else None
    with flush_denormals():
        core, history, steps, start, seconds, epochs = run_loop(
            accelerator=accelerator, model=model, n_items=len(items), cfg=train, seed=config.seed, out_dir=out_dir,
            step_fn=music_step(model, lambda i: items[i](), train, accelerator), metric_names=MUSIC_METRICS,
            resume=resume, on_step=on_step, lengths=lengths)
    target = _finish(accelerator, out_dir, history, core.save_pretrained)
    return TrainResult(target, steps, epochs, len(items), skipped, start, history, seconds)


# ---------------------------------------------------------------------------------------------------------------
# De-tokenizer
def build_detokenizer(config, unet=None, vision=None, models=None, vae=None):
    """A fresh Detokenizer from the given `music_unet` handle, else a fresh one from its resource (`models`, else
    the config's), and the `detokenizer` settings. `vae`: the frozen VAE to use instead of loading
    `detokenizer.vae` (none when that is null)."""
    from music_dagster.model.detokenizer import Detokenizer, DetokenizerSettings, load_vae

    unet = unet or load_model(config, "music_unet", models)
    vision = vision or load_model(config, "music_vision", models)
    detok = config.profile.detokenizer
    if vae is None and detok.vae is not None:
        vae = load_vae(detok.vae, device_of(config))
    settings = DetokenizerSettings.from_config(detok, vision.model.config.hidden_size)
    if detok.gradient_checkpointing:  # each UNet block recomputed in backward: memory for time
        unet.unet.enable_gradient_checkpointing()
    return Detokenizer(unet.unet.float(), settings, vae=vae)


def detokenizer_step(detok, vision, load: Callable, queries: int) -> Callable:
    """`run_loop`'s step of the de-tokenizer: the target images `load(i)` gives (PIL), each made into its pixels
    and its own visual tokens (`vision`'s features pooled to `queries`), and their denoising loss."""

    def encoded(i: int):
        # read and encoded for its batch only, never kept: at 1024 px a target's pixels are 12 MiB, so keeping
        # every target would grow host memory with the data set. Tokens image by image: a batch changes no bit.
        image = load(i)
        return detok.preprocess([image])[0], target_tokens(vision.model, vision.processor, [image], queries)[0]

    def step(wrapped, indices):
        pixels, tokens = zip(*(encoded(i) for i in indices))
        return {"loss": wrapped(torch.stack(pixels), torch.stack(tokens))}
    return step


def train_detokenizer(config, sample_sources: Iterable, out_dir: str | os.PathLike, resume: bool = True,
                      on_step: Callable[[int, dict], None] | None = None, unet=None, vision=None,
                      models=None) -> TrainResult:
    """Train the de-tokenizer by reconstruction on the distinct target images of `sample_sources`
    (`collect_targets`: each image once per epoch, however many decimated samples share it): DDPM noise prediction
    conditioned on each image's own visual tokens (vision features pooled to `train.image_queries`).
    `on_step(step, {"loss", "lr"})`. Same checkpointing and resuming as `train_music`; the final folder loads
    with `Detokenizer.from_pretrained`; `TrainResult.samples` counts target images. `unet` / `vision` / `models`:
    as `train_music`'s backbones."""
    detok_cfg = config.profile.detokenizer
    out_dir = Path(out_dir)
    targets, skipped = collect_targets(sample_sources)
    accelerator = _start(config, targets, skipped, detok_cfg.mixed_precision)
    vision = vision or load_model(config, "music_vision", models)
    detok = build_detokenizer(config, unet, vision, models)
    step = detokenizer_step(detok, vision, lambda i: targets[i](), config.profile.train.image_queries)

    with flush_denormals():
        core, history, steps, start, seconds, epochs = run_loop(
            accelerator=accelerator, model=detok, n_items=len(targets), cfg=detok_cfg, seed=config.seed,
            out_dir=out_dir, step_fn=step, metric_names=DETOKENIZER_METRICS, resume=resume, on_step=on_step)
    target = _finish(accelerator, out_dir, history, core.save_pretrained)
    return TrainResult(target, steps, epochs, len(targets), skipped, start, history, seconds)
