"""The procedural experiment as assets (thin layers over `experiment.procedural`).

`procedural_row` has one static partition per row of the table (the full method, its ablations, test-time
variants, the untrained model, the ground-truth-token ceiling). Each partition trains what it needs on the
procedural world (models shared between rows are trained once, under `<paths.work>/experiment/`), generates for the
held-out prompts end to end on the device it leased (`device_lease.step_devices`, recorded in its metadata),
scores the pixels against ground truth, writes `datasets/procedural_row/<row>/` and logs one MLflow run.
`procedural_report` reads every row that exists, writes `metrics/procedural.json` (each metric's mean, 95% interval
and n per row), the table, a plot and the example figure, and logs the parent MLflow run that every row run is
nested under. The Dagster UI shows the table, the plot and the image grid as metadata.
The config comes from the `project` resource; the backbones and CLIP from the `music_llm`, `music_vision`,
`music_unet` and `select_clip` resources (`experiment.procedural` loads fresh copies from them; their checkpoints
key the trained models).
"""
import base64

import dagster as dg
from pydantic import Field

from music_dagster.assets.device_lease import POOL, step_devices
from music_dagster.experiment.procedural import ROWS, WORK_FOLDER
from music_dagster.resources.models import MusicLLMResource, MusicUNetResource, MusicVisionResource, SelectClipResource
from music_dagster.resources.project import ProjectConfig
from music_dagster.resources.storage import DatasetStore
from music_dagster.resources.tracking import MlflowTracking

ROW_ASSET = "procedural_row"
RUN_FILE = "mlflow_run.json"
rows_partitions = dg.StaticPartitionsDefinition(list(ROWS))


class ExperimentConfig(dg.Config):
    held_out: int = Field(default=48, ge=1, description="held-out procedural prompts each row generates for")
    work_dir: str | None = Field(default=None, description="where trained models are kept (default "
                                                           "<paths.work>/experiment)")


def _png(path, title: str) -> dg.MetadataValue:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{data})")


@dg.asset(group_name="experiment", pool=POOL, partitions_def=rows_partitions, kinds={"pytorch", "mlflow"},
          description="one row of the procedural experiment: train, generate for held-out prompts, score pixels")
def procedural_row(context: dg.AssetExecutionContext, config: ExperimentConfig, project: ProjectConfig,
                   music_llm: MusicLLMResource, music_vision: MusicVisionResource, music_unet: MusicUNetResource,
                   select_clip: SelectClipResource, store: DatasetStore, tracking: MlflowTracking
                   ) -> dg.MaterializeResult:
    import json

    from music_dagster.experiment import procedural as ex
    from music_dagster.model.runtime import with_models, work_dir
    from music_dagster.storage import atomic_write_text

    resources = {"music_llm": music_llm, "music_vision": music_vision, "music_unet": music_unet,
                 "select_clip": select_clip}
    cfg = with_models(project.get(), resources)
    name = context.partition_key
    work = config.work_dir or work_dir(cfg, WORK_FOLDER)
    with step_devices(context, cfg.profile) as (_, device_metadata):  # its models train and run there
        results = ex.run_experiment(cfg, [name], work, config.held_out, log=context.log.info, resources=resources)
    folder = ex.save_row(results[name], store.asset_dir(ROW_ASSET) / name)
    run = ex.log_row_run(tracking.store, cfg, results[name], folder, {"dagster.run_id": context.run_id})
    atomic_write_text(folder / RUN_FILE, json.dumps(run, sort_keys=True) + "\n")
    summary = results[name].summary
    meta = {
        **device_metadata,
        "scores": dg.MetadataValue.md(ex.table_markdown(results)),
        "mlflow_run": dg.MetadataValue.url(run["url"]),
        "path": dg.MetadataValue.path(str(folder)),
        **{f"{m}": dg.MetadataValue.float(s["overall"]["mean"]) for m, s in summary.items()},
    }
    if (folder / ex.ROW_FIGURE).is_file():
        meta["examples"] = _png(folder / ex.ROW_FIGURE, name)
    return dg.MaterializeResult(metadata=meta)


@dg.asset(group_name="experiment", deps=[ROW_ASSET], kinds={"mlflow"},
          description="the procedural experiment's comparison: metrics/procedural.json, table, plot, image grid, "
                      "and the parent MLflow run of every row run")
def procedural_report(context: dg.AssetExecutionContext, project: ProjectConfig, store: DatasetStore,
                      tracking: MlflowTracking) -> dg.MaterializeResult:
    import json

    from PIL import Image

    from music_dagster.experiment import procedural as ex

    cfg = project.get()
    root = store.asset_dir(ROW_ASSET)
    present = [n for n in ROWS if (root / n / ex.ROW_FILE).is_file()]
    if not present:
        raise ex.ExperimentError(f"no experiment row under {root} (materialize procedural_row first)")
    results = {n: ex.load_row(root / n) for n in present}
    figure_row = "full" if "full" in present else present[0]
    figure_file = root / figure_row / ex.ROW_FIGURE
    example = Image.open(figure_file).convert("RGB") if figure_file.is_file() else None
    files = ex.write_outputs(cfg, results, cfg.paths.resolve("metrics"), example)
    children = [json.loads((root / n / RUN_FILE).read_text())["run_id"] for n in present
                if (root / n / RUN_FILE).is_file()]
    run = ex.log_parent_run(tracking.store, cfg, results, files, children, {"dagster.run_id": context.run_id})
    context.log.info(f"rows: {', '.join(present)}; parent run {run['url']}")
    meta = {
        "table": dg.MetadataValue.md(ex.table_markdown(results)),
        "plot": _png(files["plot"], "placement and identity per row"),
        "metrics_file": dg.MetadataValue.path(str(files["results"])),
        "mlflow_run": dg.MetadataValue.url(run["url"]),
        "rows": dg.MetadataValue.int(len(present)),
    }
    if "figure" in files:
        meta["image_grid"] = _png(files["figure"], f"{figure_row}: held-out prompts")
    return dg.MaterializeResult(metadata=meta)


experiment_job = dg.define_asset_job("experiment_job", selection=dg.AssetSelection.assets(procedural_row),
                                     partitions_def=rows_partitions)

defs = dg.Definitions(assets=[procedural_row, procedural_report], jobs=[experiment_job])
