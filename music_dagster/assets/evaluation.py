"""Evaluation assets: `dreambench_scores` and `msic_scores` for MUSIC and MUSIC* (thin layers over `evaluation`).

Each generates its images with the trained checkpoint into `datasets/<asset>/<music|music_star>/` (MUSIC*'s
branches under `music_star/branches/`; every record in `scores.json`), writes `metrics/<benchmark>.json` (DVC
metrics) and a plot of each metric against subject count, and logs an MLflow run nested under the training run
that made the checkpoint, naming the encoders used. MUSIC* is reported twice from the same branches: chosen by its
selection encoder (`select_clip`), and chosen by the evaluation's own CLIP-T (`music_star_eval_clip`, the paper's
way). The config comes from the `project` resource; every model from its role's resource: the score encoders
(`dino`, `eval_clip`, `detector`), and MUSIC's backbones and selection CLIP (`music_llm`, `music_vision`,
`select_clip`), which `MusicPipeline` loads fresh copies of. Each holds one device of the profile's `devices`
while it generates and scores (`device_lease.step_devices`), its models loaded there, and records it in its
metadata.
"""
import base64
from pathlib import Path

import dagster as dg
from pydantic import Field

from music_dagster.assets.device_lease import POOL, step_devices
from music_dagster.resources.models import (DetectorResource, DinoResource, EvalClipResource, MusicLLMResource,
                                             MusicVisionResource, SelectClipResource)
from music_dagster.resources.project import ProjectConfig
from music_dagster.resources.storage import DatasetStore
from music_dagster.resources.tracking import MlflowTracking
from music_dagster.storage import staged_dir
from music_dagster.tracking.dvc import record_output


class EvaluationConfig(dg.Config):
    checkpoint: str | None = Field(
        default=None, description="LoRA checkpoint folder to evaluate (default: what lora_checkpoint writes)")


SCORES = ("dreambench_scores", "msic_scores")  # the evaluate stage's score folders


def _check_outputs(cfg, store: DatasetStore, tracking: MlflowTracking) -> None:
    """Before evaluating: both score folders (one stage writes them), the metrics folder and the MLflow store take
    what the evaluation writes, so a locked one fails before either benchmark runs."""
    from music_dagster.storage import check_replaceable, check_writable

    for asset in SCORES:
        check_replaceable(store.asset_dir(asset), "paths.datasets")
    check_writable(cfg.paths.resolve("metrics"), "paths.metrics")
    tracking.check()


def _check_inputs(cfg, store: DatasetStore) -> None:
    """Before evaluating: both benchmarks' inputs read (DreamBench, and the MSIC rows with their references inside
    the datasets root), so a bad one fails before either benchmark logs anything."""
    from music_dagster.evaluation.dreambench import load_dreambench
    from music_dagster.evaluation.msic import load_msic

    load_dreambench(cfg.dreambench_dir, cfg.profile.eval.dreambench_live_classes)
    load_msic(store.asset_dir("training_samples"), cfg.profile.eval.msic_samples)


def _setup(cfg, config: EvaluationConfig, music: dict, dino: DinoResource, eval_clip: EvalClipResource):
    """The checkpoint folder, a generate function over it (MUSIC's backbones and selection CLIP from `music`, role
    -> resource: every branch's image and the one `select_clip` kept) and the score encoders."""
    from music_dagster.evaluation.common import Generated
    from music_dagster.evaluation.metrics import Embedder
    from music_dagster.model.pipeline import MusicPipeline
    from music_dagster.model.runtime import lora_dir

    checkpoint = Path(config.checkpoint) if config.checkpoint else lora_dir(cfg)
    pipe = MusicPipeline.from_pretrained(checkpoint, cfg, models=music)
    pipe.set_progress_bar_config(disable=True)

    def generate(references, instruction, branches, seed):
        out = pipe(list(references), instruction, branches, generator=seed)
        return Generated(tuple(out.images), out.best)

    embedder = Embedder(dino.load(), eval_clip.load(), dino_name=dino.checkpoint,
                        batch_size=cfg.profile.eval.batch_size)
    return checkpoint, generate, embedder


def _finish(context: dg.AssetExecutionContext, cfg, checkpoint: Path, report: dict, folder: Path,
            tracking: MlflowTracking, device_metadata: dict) -> dg.MaterializeResult:
    from music_dagster.evaluation.report import LABELS, log_mlflow_run, table_markdown, write_outputs

    details = folder / "scores.json"
    files = write_outputs(cfg.paths.resolve("metrics"), report)
    run = log_mlflow_run(tracking.store, checkpoint, report, [files["summary"], files["plot"], details])
    failures = {m: r["failures"] for m, r in report["methods"].items()}
    for method, items in failures.items():
        for f in items:
            context.log.warning(f"{LABELS[method]} {f['key']}: {f['error']}")
    plot = base64.b64encode(files["plot"].read_bytes()).decode()
    meta = {
        "scores_by_subject_count": dg.MetadataValue.md(table_markdown(report)),
        "plot": dg.MetadataValue.md(f"![{report['benchmark']} scores](data:image/png;base64,{plot})"),
        "metrics_file": dg.MetadataValue.path(str(files["summary"])),
        "plot_file": dg.MetadataValue.path(str(files["plot"])),
        "records_file": dg.MetadataValue.path(str(details)),
        "dino_model": report["encoders"]["dino_model"],
        "clip_variant": report["encoders"]["clip_variant"],
        "select_clip": report["selected_by"]["music_star"],
        "branches": dg.MetadataValue.int(report["branches"]),
        "checkpoint": dg.MetadataValue.path(str(checkpoint)),
        "mlflow_run": dg.MetadataValue.url(run["url"]),
        "mlflow_parent_run": run["parent_run_id"] or "none (checkpoint has no mlflow_run.json)",
        "failures": dg.MetadataValue.int(sum(len(v) for v in failures.values())),
        # the `evaluate` stage in dvc.lock (once both score folders exist), so `dvc repro` agrees with this run
        **record_output(folder).metadata(),
        **device_metadata,
    }
    for method, result in report["methods"].items():
        for key, value in result["overall"].items():
            if value is not None and key != "subjects":
                meta[f"{method}/{key}"] = dg.MetadataValue.float(float(value)) if key != "n" else \
                    dg.MetadataValue.int(value)
    return dg.MaterializeResult(metadata=meta)


@dg.asset(group_name="evaluation", pool=POOL, deps=["lora_checkpoint", "detokenizer"], kinds={"pytorch", "mlflow"},
          description="DreamBench DINO / CLIP-I / CLIP-T for MUSIC and MUSIC*, plus the real-vs-real row")
def dreambench_scores(context: dg.AssetExecutionContext, config: EvaluationConfig, project: ProjectConfig,
                      music_llm: MusicLLMResource, music_vision: MusicVisionResource, select_clip: SelectClipResource,
                      dino: DinoResource, eval_clip: EvalClipResource, store: DatasetStore, tracking: MlflowTracking
                      ) -> dg.MaterializeResult:
    from music_dagster.evaluation.dreambench import evaluate_dreambench, load_dreambench
    from music_dagster.evaluation.report import write_report
    from music_dagster.model.runtime import with_models

    music = {"music_llm": music_llm, "music_vision": music_vision, "select_clip": select_clip}
    cfg = with_models(project.get(), music)
    _check_outputs(cfg, store, tracking)
    _check_inputs(cfg, store)
    ev = cfg.profile.eval
    bench = load_dreambench(cfg.dreambench_dir, ev.dreambench_live_classes)
    bench = bench.subset(ev.dreambench_subjects, ev.dreambench_prompts)
    final = store.asset_dir("dreambench_scores")
    with step_devices(context, cfg.profile) as (_, device_metadata):
        checkpoint, generate, embedder = _setup(cfg, config, music, dino, eval_clip)
        context.log.info(f"DreamBench: {len(bench.subjects)} subjects, {bench.num_prompts} prompts, "
                         f"{ev.dreambench_images_per_prompt} image(s) each, MUSIC and MUSIC* ({ev.branches} branches, "
                         "chosen by select_clip and by eval_clip)")
        with staged_dir(final) as folder:
            report = evaluate_dreambench(bench, generate, embedder, folder, ev.branches,
                                         ev.dreambench_images_per_prompt, cfg.seed, cfg.models["select_clip"].id)
            write_report(folder, report)
    return _finish(context, cfg, checkpoint, report, final, tracking, device_metadata)


@dg.asset(group_name="evaluation", pool=POOL, deps=["lora_checkpoint", "detokenizer", "training_samples"],
          kinds={"pytorch", "mlflow"},
          description="MSIC (held-out, 1..12 subjects) DINO / CLIP-I on detected regions and CLIP-T, by subject count")
def msic_scores(context: dg.AssetExecutionContext, config: EvaluationConfig, project: ProjectConfig,
                music_llm: MusicLLMResource, music_vision: MusicVisionResource, select_clip: SelectClipResource,
                dino: DinoResource, eval_clip: EvalClipResource, detector: DetectorResource, store: DatasetStore,
                tracking: MlflowTracking) -> dg.MaterializeResult:
    from music_dagster.evaluation.msic import evaluate_msic, load_msic
    from music_dagster.evaluation.report import write_report
    from music_dagster.model.runtime import with_models

    music = {"music_llm": music_llm, "music_vision": music_vision, "select_clip": select_clip}
    cfg = with_models(project.get(), music)
    _check_outputs(cfg, store, tracking)
    _check_inputs(cfg, store)
    ev = cfg.profile.eval
    samples = load_msic(store.asset_dir("training_samples"), ev.msic_samples)
    final = store.asset_dir("msic_scores")
    with step_devices(context, cfg.profile) as (_, device_metadata):
        checkpoint, generate, embedder = _setup(cfg, config, music, dino, eval_clip)
        context.log.info(f"MSIC: {len(samples)} held-out samples, MUSIC and MUSIC* ({ev.branches} branches, chosen by "
                         "select_clip and by eval_clip)")
        with staged_dir(final) as folder:
            report = evaluate_msic(samples, generate, embedder, detector.load(), folder, ev.branches,
                                   ev.box_threshold, ev.text_threshold, cfg.seed, cfg.models["select_clip"].id)
            write_report(folder, report)
    return _finish(context, cfg, checkpoint, report, final, tracking, device_metadata)


def _check(store: DatasetStore, asset: str) -> dg.AssetCheckResult:
    import json

    from music_dagster.evaluation.report import out_of_range

    path = store.asset_dir(asset) / "scores.json"
    if not path.is_file():
        return dg.AssetCheckResult(passed=False, metadata={"problem": f"{path} is missing"})
    report = json.loads(path.read_text())
    bad = out_of_range(report)
    scored = sum(r["overall"]["n"] for r in report["methods"].values())
    return dg.AssetCheckResult(passed=not bad and scored > 0, metadata={
        "scored": dg.MetadataValue.int(scored), "out_of_range": ", ".join(bad[:10]) or "none"})


@dg.asset_check(asset=dreambench_scores, name="scores_in_range",
                description="scores in range: every DINO, CLIP-I and CLIP-T a finite cosine in [-1, 1], >= 1 image "
                            "scored")
def dreambench_scores_in_range(store: DatasetStore) -> dg.AssetCheckResult:
    return _check(store, "dreambench_scores")


@dg.asset_check(asset=msic_scores, name="scores_in_range",
                description="scores in range: every DINO, CLIP-I and CLIP-T a finite cosine in [-1, 1], found rates "
                            "in [0, 1], >= 1 sample scored")
def msic_scores_in_range(store: DatasetStore) -> dg.AssetCheckResult:
    return _check(store, "msic_scores")


evaluation_job = dg.define_asset_job("evaluation_job", selection=dg.AssetSelection.groups("evaluation"))

defs = dg.Definitions(assets=[dreambench_scores, msic_scores],
                      asset_checks=[dreambench_scores_in_range, msic_scores_in_range], jobs=[evaluation_job])
