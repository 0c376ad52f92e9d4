"""`music bench zoo`: tiny-zoo build seconds and peak memory, per role and for the whole zoo.

Runs in a fresh process (peak RSS is a per-process high-water mark) that builds into a temporary folder twice:
the cold pass includes the libraries' lazy imports of each architecture's modules, the warm pass is the build
alone. Top-level library imports are timed apart. Prints a table; asserts nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

HEAVY = ("torch", "transformers", "diffusers", "open_clip", "tokenizers")


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed_build(root: str) -> tuple[float, dict]:
    from music_dagster.zoo.tiny import build_zoo

    per_role, last = {}, [time.perf_counter()]
    start = last[0]

    def progress(role, _entry):
        now = time.perf_counter()
        per_role[role] = {"s": now - last[0], "peak_rss_mib": _peak_rss_mib()}
        last[0] = now

    build_zoo(seed=0, root=root, progress=progress)
    return time.perf_counter() - start, per_role


def measure(root: str) -> dict:
    """Import the libraries, then build the whole zoo into `root` twice (cold, warm), in this process."""
    import importlib

    t0 = time.perf_counter()
    for name in HEAVY:
        importlib.import_module(name)
    import torch

    torch.set_num_threads(1)
    import_s, rss_after_imports = time.perf_counter() - t0, _peak_rss_mib()
    cold_s, cold = _timed_build(root)
    warm_s, warm = _timed_build(root)
    return {"import_s": import_s, "rss_after_imports_mib": rss_after_imports, "cold_s": cold_s, "warm_s": warm_s,
            "cold": cold, "warm": warm, "peak_rss_mib": _peak_rss_mib()}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="zoo-bench-") as root:
        code = f"import json; from music_dagster.bench.zoo import measure; print(json.dumps(measure({root!r})))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"music bench zoo: the build process failed: {last}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"imports (torch, transformers, diffusers, open_clip): {r['import_s']:.2f} s, "
          f"RSS after imports {r['rss_after_imports_mib']:.0f} MiB")
    print(f"{'role':<14}{'cold s':>8}{'warm s':>8}{'peak RSS MiB':>14}")
    for role, cold in r["cold"].items():
        print(f"{role:<14}{cold['s']:>8.2f}{r['warm'][role]['s']:>8.2f}{cold['peak_rss_mib']:>14.0f}")
    print(f"{'all roles':<14}{r['cold_s']:>8.2f}{r['warm_s']:>8.2f}{r['peak_rss_mib']:>14.0f}")
    print(f"`music zoo build` from a fresh process: about {r['import_s'] + r['cold_s']:.1f} s")


if __name__ == "__main__":
    main()
