"""`music bench data`: seconds per sample and samples per hour of every data-synthesis stage on the configured
profile, with batch size 1 and with the configured `data.batch_size`, printed as a table.

The stages run in this process on the profile's models, the way the assets run them (shards written with the
atomic shard writer into a temporary folder). A warm-up shard first pays the one-off costs (model loading, first
calls), so the timed shards measure steady state. Both timed runs use the same shard key, hence the same inputs,
and time it as a training shard (never an MSIC hold-out). Asserts nothing.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path


def run_shard(handles: dict, config, data, key: str, root: Path) -> dict[str, tuple[float, int, int]]:
    """Every stage of the stage table (`synthesis.stages.STAGES`) on one shard, in order: stage -> (seconds, input
    samples, output records). Each stage's `prepare` and the writing are not timed."""
    from music_dagster.images import read_image
    from music_dagster.storage import ShardWriter, read_shard
    from music_dagster.synthesis.common import ShardContext, shard_seed
    from music_dagster.synthesis.schemas import RECORDS
    from music_dagster.synthesis.stages import STAGES, ShardInputs

    def open_image(ref: str):
        return read_image(root / ref)

    out, written = {}, {}
    for stage in STAGES:
        ctx = ShardContext(stage.name, key, shard_seed(config.seed, key))
        parents = written[stage.parent] if stage.parent else []
        inputs = ShardInputs(ctx, config, data, parents, open_image, handles.__getitem__,
                             stage.prepare(config, data) if stage.prepare else None, held_out=False)
        start = time.perf_counter()
        result = stage.compute(inputs)
        seconds = time.perf_counter() - start
        with ShardWriter(root / stage.name / key, RECORDS[stage.name]) as writer:
            for image_name, image in result.images.items():
                writer.add_image(image_name, image)
            for record in result.records:
                writer.add_record(record)
        written[stage.name] = read_shard(root / stage.name / key).records
        out[stage.name] = (seconds, len(parents) if stage.parent else data.shard_size, len(written[stage.name]))
    return out


def _per_sample(seconds: float, n: int) -> str:
    return f"{seconds / n:.3f}" if n else "-"


def _per_hour(seconds: float, n: int) -> str:
    return f"{3600 * n / seconds:,.0f}" if n and seconds > 0 else "-"


def main() -> None:
    import torch

    from music_dagster.config import default_config
    from music_dagster.synthesis.stages import STAGE_NAMES, STAGE_ROLES
    from music_dagster.zoo.loaders import load_role

    config = default_config()
    profile = config.profile
    torch.set_num_threads(profile.torch_threads)
    config.check_models(STAGE_ROLES)
    base = profile.data
    data = base.model_copy(update={"shard_size": max(base.shard_size, 2 * base.batch_size)})
    start = time.perf_counter()
    handles = {role: load_role(role, config.models[role], profile.device, profile.dtype) for role in STAGE_ROLES}
    load_s = time.perf_counter() - start
    device = next(iter(handles.values())).device
    with tempfile.TemporaryDirectory(prefix="music-bench-data-") as tmp:
        root = Path(tmp)
        run_shard(handles, config, data, "warmup", root / "warmup")
        runs = {size: run_shard(handles, config, data.model_copy(update={"batch_size": size}), "bench-00000",
                                root / f"batch-{size}")
                for size in dict.fromkeys((1, base.batch_size))}
    sizes = list(runs)
    print(f"data synthesis, profile {config.profile_name} on {device} ({profile.torch_threads} torch threads), "
          f"{data.shard_size} samples per shard, models loaded in {load_s:.1f} s")
    header = ["stage", "in", "out"]
    for size in sizes:
        header += [f"s/sample b={size}", f"samples/h b={size}"]
    if len(sizes) == 2:
        header.append("speed-up")
    rows = [header]
    totals = {size: 0.0 for size in sizes}
    for name in STAGE_NAMES:
        seconds, n_in, n_out = runs[sizes[-1]][name]
        row = [name, str(n_in), str(n_out)]
        for size in sizes:
            s, n, _ = runs[size][name]
            totals[size] += s
            row += [_per_sample(s, n), _per_hour(s, n)]
        if len(sizes) == 2:
            row.append(f"{runs[1][name][0] / seconds:.2f}x" if seconds > 0 else "-")
        rows.append(row)
    final = {size: runs[size][STAGE_NAMES[-1]][2] for size in sizes}
    total = ["whole graph", str(data.shard_size), str(final[sizes[-1]])]
    for size in sizes:
        total += [_per_sample(totals[size], data.shard_size), _per_hour(totals[size], data.shard_size)]
    if len(sizes) == 2:
        total.append(f"{totals[1] / totals[sizes[-1]]:.2f}x")
    rows.append(total)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for size in sizes:
        print(f"b={size}: {_per_hour(totals[size], final[size])} training samples per hour "
              f"({final[size]} from {data.shard_size} synthesized samples)")
