"""`music bench metrics`: DreamBench-style scoring throughput (images scored per second) on the configured
encoders, with reference embeddings cached across images and with them recomputed for every image.

Each subject's real photos (the configured DreamBench copy) are the references; every generated
image is scored against all of them, as DreamBench does. Prints a table; asserts nothing.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

SUBJECTS = 4
IMAGES_PER_SUBJECT = 8
REPEATS = 3


def _workload(config, folder: Path):
    """A DreamBench subset and generated images (seeded noise) for it, written under `folder`."""
    import numpy as np
    from PIL import Image

    from music_dagster.evaluation.dreambench import DreamItem, load_dreambench

    bench = load_dreambench(config.dreambench_dir, config.profile.eval.dreambench_live_classes)
    bench = bench.subset(SUBJECTS, 1)
    rng = np.random.default_rng(0)
    items = []
    for s in bench.subjects:
        for i in range(IMAGES_PER_SUBJECT):
            path = folder / f"{s.name}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
            items.append(DreamItem(f"{s.name}/{i}", s.name, s.prompts[0], path))
    return bench, items


def _rate(bench, items, embedder) -> float:
    from music_dagster.evaluation.dreambench import score_dreambench

    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = score_dreambench(bench, items, embedder)
        best = min(best, time.perf_counter() - start)
        assert not result["failures"]
    return len(items) / best


def main() -> None:
    import torch

    from music_dagster.config import default_config
    from music_dagster.evaluation.metrics import Embedder
    from music_dagster.zoo.loaders import load_role

    config = default_config()
    torch.set_num_threads(config.profile.torch_threads)
    config.check_models(("dino", "eval_clip"))
    dino = load_role("dino", config.models["dino"], config.profile.device, config.profile.dtype)
    clip = load_role("eval_clip", config.models["eval_clip"], config.profile.device, config.profile.dtype)
    batch = config.profile.eval.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        bench, items = _workload(config, Path(tmp))
        refs = sum(len(s.images) for s in bench.subjects)
        cached = Embedder(dino, clip, config.models["dino"].id, batch_size=batch)
        cached.references([p for s in bench.subjects for p in s.images])  # warm: the steady state of a long run
        rows = [("cached references", _rate(bench, items, cached)),
                ("recomputed references", _rate(bench, items, Embedder(dino, clip, config.models["dino"].id,
                                                                       batch_size=batch, cache=False)))]
    print(f"profile {config.profile_name}, device {dino.device}, {config.profile.torch_threads} thread(s), "
          f"batch {batch}: {len(items)} generated images, {len(bench.subjects)} subjects, {refs} reference photos")
    print(f"dino {config.models['dino'].id}, clip {clip.name}")
    print(f"{'reference embeddings':<24}{'images/s':>10}")
    for name, rate in rows:
        print(f"{name:<24}{rate:>10.2f}")
    print(f"speed-up from the cache: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
