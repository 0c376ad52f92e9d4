"""`music bench train`: optimizer steps per second of MUSIC's LoRA training and of the de-tokenizer's, on the
configured profile and device (procedural samples, features cached, the config's batch sizes). Asserts nothing."""
from __future__ import annotations

import os

STEPS, WARMUP = 20, 3


def measure_training_speed(config, steps: int = 20, warmup: int = 3, out_dir: str | os.PathLike | None = None) -> dict:
    """Optimizer steps per second of `train_music` and `train_detokenizer` on the procedural world with the
    config's batch sizes and backbones. Each trainer runs `warmup` untimed steps (one epoch: every sample's
    features are encoded and cached) and then `steps` timed ones (checkpointing off)."""
    import tempfile
    import time
    from pathlib import Path

    import torch

    from music_dagster.model.runtime import device_of
    from music_dagster.training.train import procedural_source, train_detokenizer, train_music

    figures = {}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        for name, fn, section in (("music", train_music, "train"), ("detokenizer", train_detokenizer, "detokenizer")):
            batch = getattr(config.profile, section).batch_size
            extra = {"cache_features": True} if section == "train" else {}
            cfg = config.with_values(section, epochs=10 ** 6, max_steps=warmup + steps, checkpoint_every=10 ** 9,
                                     **extra)
            stamps = []
            fn(cfg, [procedural_source(config, batch * max(1, warmup))], Path(tmp) / name, resume=False,
               on_step=lambda s, _m, stamps=stamps: stamps.append(time.perf_counter()))
            timed = stamps[warmup - 1:] if warmup else stamps
            figures[f"{name}_steps_per_s"] = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else 0.0
            figures[f"{name}_batch_size"] = batch
    figures.update(device=device_of(config), threads=torch.get_num_threads())
    return figures


def main() -> None:
    import torch

    from music_dagster.config import default_config

    config = default_config()
    torch.set_num_threads(config.profile.torch_threads)
    config.check_models(("music_llm", "music_vision", "music_unet"))
    figures = measure_training_speed(config, steps=STEPS, warmup=WARMUP)
    print(f"training speed: profile {config.profile_name}, device {figures['device']}, "
          f"{figures['threads']} torch thread(s), {STEPS} timed steps after {WARMUP} warm-up steps")
    print(f"{'model':<12} {'batch':>5} {'steps/s':>8} {'samples/s':>9}")
    for name in ("music", "detokenizer"):
        rate, batch = figures[f"{name}_steps_per_s"], figures[f"{name}_batch_size"]
        print(f"{name:<12} {batch:>5} {rate:>8.2f} {rate * batch:>9.1f}")
