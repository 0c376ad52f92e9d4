"""What an evaluation run reports: the summary that goes to `metrics/<benchmark>.json` (DVC metrics), the table and
the plot by subject count, the output files, the range check of every score, and the evaluation MLflow run."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from music_dagster.evaluation.metrics import METRICS

LABELS = {"music": "MUSIC", "music_star": "MUSIC*", "music_star_eval_clip": "MUSIC* (eval CLIP)",
          "real_vs_real": "real vs real"}
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}


def summary(report: dict) -> dict:
    """What goes to `metrics/<benchmark>.json` (DVC metrics): overall scores per method (MSIC: also by subject
    count), failure counts, the encoders, the branch count and which encoder chose MUSIC*'s branch for each of its
    two rows."""
    out = {"benchmark": report["benchmark"], "encoders": report["encoders"], "branches": report["branches"],
           "selected_by": report["selected_by"]}
    for method, result in report["methods"].items():
        entry = {**result["overall"], "failures": len(result["failures"])}
        if "by_subject_count" in result:
            entry = {"overall": entry, "by_subject_count": result["by_subject_count"]}
        out[method] = entry
    if "real_vs_real" in report:
        out["real_vs_real"] = report["real_vs_real"]["overall"]
    return out


def by_subject_count(report: dict) -> dict[str, dict[int, dict]]:
    """method -> subject count -> summary (DreamBench: every image has one subject)."""
    out = {}
    for method, result in report["methods"].items():
        rows = result.get("by_subject_count")
        out[method] = {int(n): v for n, v in rows.items()} if rows is not None else {1: result["overall"]}
    return out


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def table_markdown(report: dict) -> str:
    """Scores by subject count (rows) for each method (column groups), with an overall row; DreamBench adds the
    real-vs-real row."""
    counts = by_subject_count(report)
    methods = list(report["methods"])
    keys = (*METRICS, "found_rate") if report["benchmark"] == "msic" else METRICS
    cols = [(m, k) for m in methods for k in keys]
    head = "| subjects | " + " | ".join(f"{LABELS[m]} {METRIC_LABELS.get(k, 'found')}" for m, k in cols) + " | n |"
    lines = [head, "|" + " --- |" * (len(cols) + 2)]
    for n in sorted({n for c in counts.values() for n in c}):
        cells = [_cell(counts[m].get(n, {}).get(k)) for m, k in cols]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {counts[methods[0]].get(n, {}).get('n', 0)} |")
    overall = [_cell(report["methods"][m]["overall"].get(k)) for m, k in cols]
    lines.append("| all | " + " | ".join(overall) + f" | {report['methods'][methods[0]]['overall']['n']} |")
    if "real_vs_real" in report:
        real = report["real_vs_real"]["overall"]
        cells = [_cell(real.get(k)) if m == methods[0] else "" for m, k in cols]
        lines.append("| real vs real | " + " | ".join(cells) + f" | {real['n']} pairs |")
    return "\n".join(lines)


def plot_png(report: dict) -> bytes:
    """Each metric against subject count, one line per method (PNG bytes, matplotlib's Agg backend)."""
    import io

    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    counts = by_subject_count(report)
    fig = Figure(figsize=(12, 3.6), dpi=100)
    axes = fig.subplots(1, len(METRICS))
    for ax, metric in zip(axes, METRICS):
        for method, rows in counts.items():
            xs = sorted(n for n, v in rows.items() if v.get(metric) is not None)
            ax.plot(xs, [rows[n][metric] for n in xs], marker="o", label=LABELS[method])
        real = report.get("real_vs_real", {}).get("overall", {}).get(metric)
        if real is not None:
            ax.axhline(real, linestyle="--", color="grey", label=LABELS["real_vs_real"])
        ax.set_title(f"{report['benchmark']}: {METRIC_LABELS[metric]}")
        ax.set_xlabel("subjects")
        ax.set_xticks(sorted({n for rows in counts.values() for n in rows}) or [1])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: same bytes on reruns
    return buf.getvalue()


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_outputs(metrics_dir: Path, report: dict) -> dict[str, Path]:
    """`<metrics_dir>/<benchmark>.json` (the summary) and `<benchmark>.png` (the plot), each written atomically."""
    from music_dagster.storage import atomic_write_bytes, atomic_write_text

    name = report["benchmark"]
    metrics_dir.mkdir(parents=True, exist_ok=True)
    return {"summary": atomic_write_text(metrics_dir / f"{name}.json", _json(summary(report))),
            "plot": atomic_write_bytes(metrics_dir / f"{name}.png", plot_png(report))}


def write_report(folder: Path, report: dict) -> Path:
    """Every record of a report (per image or sample, failures) as `folder/scores.json`."""
    path = folder / "scores.json"
    path.write_text(_json(report))
    return path


def out_of_range(report: dict) -> list[str]:
    """Every score of a report that is not a finite cosine in [-1, 1] (found rates: [0, 1]), by where it is."""
    bad = []

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                if key in METRICS or key == "found_rate":
                    lo = 0.0 if key == "found_rate" else -1.0
                    ok = value is None or (isinstance(value, (int, float)) and math.isfinite(value)
                                           and lo - 1e-6 <= value <= 1 + 1e-6)
                    if not ok:
                        bad.append(f"{here}={value!r}")
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(report, "")
    return bad


def log_mlflow_run(store, checkpoint: Path, report: dict, files: Sequence[Path]) -> dict:
    """An MLflow run for the report, nested under the training run recorded in `checkpoint` (`mlflow_run.json`),
    naming the encoders; overall scores as metrics (MSIC: per subject count as steps), `files` as artifacts."""
    from music_dagster.tracking import runs as tracking
    name = report["benchmark"]
    enc = report["encoders"]
    tags = {"benchmark": name, "eval.dino_model": enc["dino_model"], "eval.clip_variant": enc["clip_variant"],
            "checkpoint": str(checkpoint)}
    parent = tracking.read_run_ref(checkpoint)["run_id"] if (checkpoint / tracking.RUN_REF).is_file() else None
    if parent is not None:
        run_cm = tracking.start_nested_run(store, parent, name, tags)
    else:
        run_cm = tracking.start_run(store, name, {tracking.TAG_KIND: "evaluation", **tags})
    with run_cm as run:
        run.log_params({"dino_model": enc["dino_model"], "clip_variant": enc["clip_variant"],
                        "select_clip": report["selected_by"]["music_star"], "branches": report["branches"],
                        "checkpoint": str(checkpoint)})
        metrics = {}
        for method, result in report["methods"].items():
            metrics.update({f"{method}/{k}": v for k, v in result["overall"].items() if v is not None})
            metrics[f"{method}/failures"] = len(result["failures"])
            for n, row in sorted((int(n), r) for n, r in result.get("by_subject_count", {}).items()):
                run.log_step(n, {f"{method}/by_subject_count/{k}": v for k, v in row.items() if v is not None})
        if "real_vs_real" in report:
            metrics.update({f"real_vs_real/{k}": v for k, v in report["real_vs_real"]["overall"].items()
                            if v is not None})
        run.log_metrics(metrics)
        for path in files:
            run.log_artifact(path)
        return {**run.reference(), "parent_run_id": parent}
