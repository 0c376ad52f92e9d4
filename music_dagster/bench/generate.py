"""`music bench generate`: wall time and peak memory of one generation with N = 1, 2, 4, 8 test-time branches
(MUSIC*), and the ratio of the batched N-branch run to N sequential 1-branch runs. Asserts nothing.

All runs sample their plans (so a 1-branch run does the same work as one branch of N) with the profile's
`generate` settings, from the project's checkpoint (`models/lora`, `models/detokenizer`) when both exist, else from
a throwaway checkpoint trained two steps on the procedural world (timing does not depend on training).
Peak memory: CUDA's peak allocation on a GPU; on the CPU, the peak rise of the process's resident memory (sampled
every 2 ms, after returning freed heap memory to the OS so that reused memory counts).
"""
from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from pathlib import Path

BRANCHES = (1, 2, 4, 8)
REPEATS = 2  # best of, after one warm-up run


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), else memory reused from earlier runs never shows in RSS."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: str):
    """Yields a dict whose "mib" is, on exit, the peak memory this block added (see the module doc)."""
    import torch

    out = {"mib": 0.0}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    import psutil

    _trim_heap()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["mib"] = (max(peak[0], proc.memory_info().rss) - base) / 2**20


def _throwaway_checkpoint(config, folder: Path) -> tuple[Path, Path]:
    from music_dagster.training.train import procedural_source, train_detokenizer, train_music

    cfg = config.with_values("train", max_steps=2, checkpoint_every=10**9)
    cfg = cfg.with_values("detokenizer", max_steps=2, checkpoint_every=10**9)
    samples = procedural_source(cfg, max(cfg.profile.train.batch_size, cfg.profile.detokenizer.batch_size) * 2)
    detok = train_detokenizer(cfg, [samples], folder / "detok", resume=False)
    lora = train_music(cfg, [samples], folder / "lora", resume=False)
    return lora.model_dir, detok.model_dir


def _timed(pipe, refs, prompt, branches: int, seed: int, device: str) -> tuple[float, float]:
    import torch

    with peak_memory(device) as mem:
        start = time.perf_counter()
        pipe(refs, prompt, branches, generator=seed, sample_plans=True)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, mem["mib"]


def main() -> None:
    import torch

    from music_dagster.config import default_config
    from music_dagster.model.pipeline import MusicPipeline
    from music_dagster.model.runtime import detokenizer_dir, device_of, lora_dir
    from music_dagster.training.train import procedural_source

    config = default_config()
    torch.set_num_threads(config.profile.torch_threads)
    device = device_of(config)
    sample = procedural_source(config, 1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        if lora_dir(config).is_dir() and detokenizer_dir(config).is_dir():
            checkpoint, detok, source = lora_dir(config), detokenizer_dir(config), "project checkpoint"
        else:
            checkpoint, detok = _throwaway_checkpoint(config, Path(tmp))
            source = "throwaway 2-step checkpoint"
        pipe = MusicPipeline.from_pretrained(checkpoint, config, detok)
        pipe.set_progress_bar_config(disable=True)
        refs, prompt = sample.references, sample.instruction
        _timed(pipe, refs, prompt, 1, 0, device)  # warm-up: lazy inits, allocator
        rows = []
        for n in BRANCHES:
            batched, sequential = [], []
            for r in range(REPEATS):  # interleaved, so both see the same machine load
                batched.append(_timed(pipe, refs, prompt, n, r, device))
                # the same N plans one at a time: seeds differ, so plan lengths do too (sampling stops at eos)
                singles = [_timed(pipe, refs, prompt, 1, r * n + i, device) for i in range(n)]
                sequential.append((sum(t for t, _ in singles), max(m for _, m in singles)))
            rows.append((n, min(t for t, _ in batched), max(m for _, m in batched),
                         min(t for t, _ in sequential), max(m for _, m in sequential)))
    model, detok_steps = pipe.generator.model, pipe.generator.detokenizer.settings.decode_steps
    gen = config.profile.generate
    print(f"generation: profile {config.profile_name}, device {device}, {torch.get_num_threads()} torch thread(s), "
          f"{source}; {len(refs)} subjects, plans up to "
          f"{gen.max_plan_tokens or model.settings.max_plan_tokens} tokens, "
          f"{gen.decode_steps or detok_steps} decode steps; best of {REPEATS}")
    print(f"{'N':>2} {'batched s':>10} {'peak MiB':>9} {'N x 1-branch s':>15} {'peak MiB (1)':>12} "
          f"{'batched / sequential':>21}")
    for n, seconds, mib, sequential, mib1 in rows:
        print(f"{n:>2} {seconds:>10.2f} {mib:>9.1f} {sequential:>15.2f} {mib1:>12.1f} {seconds / sequential:>21.2f}")
