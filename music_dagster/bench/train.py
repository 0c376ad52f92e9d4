"""`music bench train`: optimizer steps per second of MUSIC's LoRA training and of the de-tokenizer's, on the
configured profile and device (procedural samples, features cached, the config's batch sizes). Asserts nothing."""
from __future__ import annotations

STEPS, WARMUP = 20, 3


def main() -> None:
    import torch

    from music_dagster.config import default_config
    from music_dagster.training import measure_training_speed

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
