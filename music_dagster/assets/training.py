"""Training assets: the de-tokenizer and the MUSIC LoRA checkpoint, each one MLflow run per materialization.

Both train on what `train.source` selects: every complete `training_samples` shard (MSIC hold-out records are
skipped by `training.collect_samples`), the procedural world, or both. The config comes from the `project`
resource and the backbones from their resources (`music_llm`, `music_vision`, `music_unet`; `select_clip` for the
logged sample generations): a launchpad or test that swaps one trains on it. The resumable training state lives in
`<paths.work>/training/<asset>-<key>/` (`.cache/` by default), keyed by everything that decides the result (the
training config, the backbones' checkpoints, the seed and the data version): a re-run after a crash resumes, a
changed config, backbone or new shards start afresh. The final weights are published atomically to
`models/detokenizer/` and `models/lora/` (`runtime.detokenizer_dir` / `runtime.lora_dir`: what `music generate`
reads); `models/lora/mlflow_run.json` names the training run so evaluation can nest its runs under it. A training
holds one device of the profile's `devices` per process it runs on this machine (`device_lease.step_devices`): its
own, or, for a launch, the ones the launched processes see (CUDA_VISIBLE_DEVICES).

`select_sources`, `work_dir` and `publish` are plain Python; `train_and_publish` is the run both assets share.
"""

import hashlib
import json
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import dagster as dg

from music_dagster.assets.device_lease import POOL, step_devices
from music_dagster.config import PROJECT_ROOT, Config
from music_dagster.model import runtime
from music_dagster.resources.models import MusicLLMResource, MusicUNetResource, MusicVisionResource, SelectClipResource
from music_dagster.resources.project import ProjectConfig
from music_dagster.resources.storage import DatasetStore
from music_dagster.resources.tracking import MlflowTracking
from music_dagster.tracking import runs
from music_dagster.tracking.dvc import DvcRecord, record_output

if TYPE_CHECKING:
    from music_dagster.training.train import TrainResult

SAMPLES_ASSET = "training_samples"
WORK_FOLDER = "training"  # under `paths.work`
STAGES = {"lora": "train", "detokenizer": "detokenizer"}  # the dvc.yaml stage (`music stage <name>`) of each model
HISTORY_FILE = "history.json"


# ---------------------------------------------------------------------------------------------------------------
# Plain functions
def select_sources(config: Config, shard_root: Path) -> tuple[list, list[str], str]:
    """(sample sources for `training.collect_samples`, shard keys used, data version) of `train.source`.

    Shards are checked here, before any run opens: a shard folder without a manifest is refused unless
    `train.allow_incomplete_shards` (then a warning names it), and so is a record that does not fit the schema or
    points outside the datasets root."""
    from music_dagster.storage import MANIFEST, complete_shards, incomplete_shards

    train = config.profile.train
    sources, keys, extra = [], [], []
    if train.source in ("synthesized", "both"):
        from music_dagster.training.train import TrainingError, collect_samples

        incomplete = ", ".join(incomplete_shards(shard_root))
        if incomplete and not train.allow_incomplete_shards:
            raise TrainingError(
                f"{shard_root}: incomplete shard {incomplete} (no {MANIFEST}): materialize data_job for "
                f"{incomplete} (music stage data), or remove the partition (delete its folder), or set "
                "train.allow_incomplete_shards: true to train without it")
        if incomplete:
            dg.get_dagster_logger().warning(f"{shard_root}: training without the incomplete shard {incomplete} "
                                            "(train.allow_incomplete_shards is true)")
        keys = complete_shards(shard_root)
        sources += [shard_root / k for k in keys]
        collect_samples(sources)  # the records and their image paths, checked now: nothing has started yet
    if train.source in ("procedural", "both"):
        from music_dagster.training.train import procedural_source

        sources.append(procedural_source(config))
        extra.append("procedural:" + json.dumps(
            {"seed": config.seed, "grid": config.profile.data.grid,
             **{k: v for k, v in train.model_dump().items() if k.startswith("procedural_")}}, sort_keys=True))
    version = runs.data_version([shard_root / k / MANIFEST for k in keys], root=shard_root, extra=extra)
    return sources, keys, version


def work_dir(config: Config, name: str, data_version: str) -> Path:
    """Where the resumable state of a training lives (under `<paths.work>/training/`): one folder per (config,
    backbones, seed, data)."""
    section = "train" if name == "lora" else "detokenizer"
    roles = ("music_llm", "music_vision") if name == "lora" else ("music_vision", "music_unet")
    key = json.dumps({
        "section": getattr(config.profile, section).model_dump(mode="json"),
        "image_queries": config.profile.train.image_queries, "grid": config.profile.data.grid,
        "models": {r: config.models[r].model_dump(mode="json") for r in roles},
        "seed": config.seed, "data": data_version, "device": config.profile.device, "dtype": config.profile.dtype,
    }, sort_keys=True)
    return runtime.work_dir(config, WORK_FOLDER) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def drop_stale_work(work: Path) -> None:
    """Remove the resumable state of earlier configs or data of the same training (kept: `work`)."""
    name = work.name.rsplit("-", 1)[0]
    for other in work.parent.glob(f"{name}-*"):
        if other != work and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def publish(model_dir: Path, target: Path, history: list[dict], run: runs.ActiveRun) -> None:
    """Copy the final weights to `target` with the run reference and loss history, atomically. The checkpoint's
    one content hash is DVC's (`dvc.record_output`, over every file but the .dvcignore'd run reference)."""
    from music_dagster.storage import atomic_write_text, staged_dir

    with staged_dir(target) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        atomic_write_text(tmp / HISTORY_FILE, json.dumps(history, sort_keys=True) + "\n")
        runs.write_run_ref(tmp, run)


def log_steps(run: runs.ActiveRun, entries: list[dict]) -> None:
    """Per-step losses and learning rate (the `TrainResult.history` entries of earlier, resumed steps)."""
    for entry in entries:
        run.log_step(entry["step"], {k: v for k, v in entry.items() if k != "step"})


def log_sample_generations(config: Config, run: runs.ActiveRun, sources: list, checkpoint: Path,
                           detokenizer: Path, models: dict | None = None) -> int:
    """Generate the first `generate.logged_samples` training samples with the new checkpoint and log each
    generation (image, plan.json, layout overlay) and the ground-truth layout overlay under `samples/<i>/`.
    `models`: the backbones' and CLIP's resources (role -> `ModelResource`; default: the config's). Generation
    goes through `MusicPipeline`, the one inference path (diffusers imported here, not at the module's top)."""
    from music_dagster.model.layout import render_overlay
    from music_dagster.model.pipeline import MusicPipeline
    from music_dagster.training.train import collect_samples

    gen = config.profile.generate
    loaders, _ = collect_samples(sources)
    if gen.logged_samples == 0 or not loaders:
        return 0
    pipe = MusicPipeline.from_pretrained(checkpoint, config, detokenizer, models=models)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, load in enumerate(loaders[:gen.logged_samples]):
            sample = load()
            result = pipe(sample.references, sample.instruction, gen.logged_branches, generator=config.seed).result
            folder = result.save(Path(tmp) / f"sample_{i}")
            render_overlay(sample.target.convert("RGB"), sample.layout).save(folder / "target_layout.png")
            run.log_artifacts(folder, f"samples/sample_{i}")
    return min(gen.logged_samples, len(loaders))


def weights_finite(folder: Path) -> dict[str, int]:
    """{"tensors", "non_finite"} over every safetensors file of a checkpoint folder."""
    import torch
    from safetensors.torch import load_file

    tensors = bad = 0
    for path in sorted(folder.rglob("*.safetensors")):
        for value in load_file(str(path)).values():
            tensors += 1
            bad += int(not bool(torch.isfinite(value).all()))
    return {"tensors": tensors, "non_finite": bad}


def train_in_processes(context: dg.AssetExecutionContext, model: str, command: list[str], work: Path,
                       env: dict[str, str]) -> "TrainResult":
    """Run the training loop as `command` (`train_entry.launch_command`: `accelerate launch` of
    `music_dagster.training.entry` over the section's `num_processes`) through Dagster Pipes: rank 0's log lines and
    per-step losses stream into this step's log, and the result comes back as its reported materialization (the
    history is read from `work`). `env`: what the processes need to read the step's config
    (`ProjectConfig.environment`) and the devices they may use (CUDA_VISIBLE_DEVICES). A cluster runs the same
    command in a pod with `dagster_k8s.PipesK8sClient`."""
    from dagster._core.errors import DagsterPipesExecutionError  # not exported at dagster's top level

    from music_dagster.training.train import HISTORY, MODEL_DIR, TrainingError, TrainResult

    # other machines run it too (README: 2 nodes); the devices are this machine's
    context.log.info(f"launching on CUDA_VISIBLE_DEVICES={shlex.quote(env['CUDA_VISIBLE_DEVICES'])}: "
                     + shlex.join(command))
    try:
        invocation = dg.PipesSubprocessClient(cwd=str(PROJECT_ROOT), env=env).run(context=context, command=command)
    except DagsterPipesExecutionError as error:
        raise TrainingError(f"{model} training under accelerate launch failed ({error}): its log is above") from None
    reported = {k: v.value for k, v in invocation.get_materialize_result().metadata.items()}
    history = json.loads((work / HISTORY).read_text())
    return TrainResult(work / MODEL_DIR, int(reported["steps"]), float(reported["epochs"]),
                       int(reported["samples"]), int(reported["skipped_msic"]), int(reported["resumed_from"]),
                       history, float(reported["seconds"]))


@dataclass
class Trained:
    """One training materialization: what it trained on, its result and where it was published and recorded."""
    sources: list
    keys: list[str]
    version: str
    target: Path
    result: "TrainResult"
    run: runs.ActiveRun
    dvc_record: DvcRecord  # its md5 is the checkpoint's content hash (metadata, MLflow tag, Dagster data version)
    devices: dict  # the devices it held, as metadata (`device_lease.step_devices`)

    def metadata(self, names) -> dict:
        result, history = self.result, self.result.history
        final = {f"final_{n}": float(history[-1][n]) for n in names if history and n in history[-1]}
        return {
            "path": dg.MetadataValue.path(str(self.target)),
            "steps": result.steps, "resumed_from": result.resumed_from, "epochs": float(result.epochs),
            "samples": result.samples, "skipped_msic": result.skipped_msic,
            "steps_per_second": float(result.steps_per_second), **final,
            "data_version": self.version,
            "partitions": ", ".join(self.keys) or "none",
            "mlflow_run_id": self.run.run_id, "mlflow_url": dg.MetadataValue.url(self.run.url),
            **self.dvc_record.metadata(), **self.devices,
        }


def train_and_publish(context: dg.AssetExecutionContext, project: ProjectConfig, models: dict,
                      store: DatasetStore, tracking: MlflowTracking, model: str, train_fn: Callable, target: Path,
                      artifact_path: str, then: Callable[[Trained], None] | None = None) -> Trained:
    """Train `model` ("lora" or "detokenizer") with `train_fn` in its own MLflow run, resuming from its work
    folder; publish the weights to `target`, record them with DVC, log them under `artifact_path`, and call
    `then` while the run is still open. The config is `project`'s with the checkpoints of `models` (the
    backbones' resources, role -> `ModelResource`), which the training loads its backbones from (in this process,
    or, with `num_processes` above 1, in every launched one). It holds a device of the profile's `devices` per
    process on this machine while it trains and publishes (a launch's processes see only theirs). A read-only
    `target`, more processes than `devices`, or a damaged or read-only MLflow store is refused before training; a
    store failing after `target` is published names it and the command that logs it again."""
    from music_dagster.storage import check_replaceable
    from music_dagster.training.entry import launch_command, local_processes
    from music_dagster.training.train import TrainingError
    from music_dagster.zoo.devices import cuda_visible_devices, visible_devices

    config = runtime.with_models(project.get(), models)
    sources, keys, version = select_sources(config, store.asset_dir(SAMPLES_ASSET))
    work = work_dir(config, model, version)
    check_replaceable(target, "paths.models")
    section = "train" if model == "lora" else "detokenizer"
    processes, available = local_processes(config, model), visible_devices(config.profile.devices)
    if processes > len(available):
        raise TrainingError(f"{section}.num_processes: {processes} processes on this machine, but devices has "
                            f"{len(available)} ({', '.join(available)}): one device per process")
    launch = None
    if getattr(config.profile, section).num_processes > 1:
        shards = [s for s in sources if isinstance(s, Path)]  # the procedural world is rebuilt in every process
        launch = launch_command(config, model, work, shards, procedural=len(shards) < len(sources))
    with step_devices(context, config.profile, processes) as (held, device_metadata), \
            tracking.training_run(config, context, keys, version) as run:  # probes the store first
        run.set_tags({runs.TAG_MODEL: model})
        if launch is None:  # one process: this one (docs/design.md says why), on its device
            result = train_fn(config, sources, work, resume=True, on_step=run.log_step, models=models)
            log_steps(run, result.history[:result.resumed_from])
        else:  # rank 0 of the launch streams its steps to the step's log; MLflow gets them all from here
            env = {**project.environment(), "CUDA_VISIBLE_DEVICES": cuda_visible_devices(held)}
            result = train_in_processes(context, model, launch, work, env=env)
            log_steps(run, result.history)
        publish(result.model_dir, target, result.history, run)
        run.keep(target, f"music stage {STAGES[model]}")
        drop_stale_work(work)
        run.set_tags({"resumed_from": result.resumed_from})
        dvc_record = record_output(target)  # dvc.lock + push, so another clone can `dvc pull` it
        run.set_tags(dvc_record.tags())
        run.log_artifacts(target, artifact_path)
        trained = Trained(sources, keys, version, target, result, run, dvc_record, device_metadata)
        if then is not None:
            then(trained)
    return trained


# ---------------------------------------------------------------------------------------------------------------
# Assets
@dg.asset(group_name="training", pool=POOL, kinds={"pytorch", "mlflow"}, deps=[dg.AssetKey(SAMPLES_ASSET)],
          description="The de-tokenizer (visual tokens -> image), trained by reconstruction on the target images")
def detokenizer(context: dg.AssetExecutionContext, project: ProjectConfig, music_vision: MusicVisionResource,
                music_unet: MusicUNetResource, store: DatasetStore, tracking: MlflowTracking) -> dg.MaterializeResult:
    from music_dagster.training.train import train_detokenizer

    models = {"music_vision": music_vision, "music_unet": music_unet}
    trained = train_and_publish(context, project, models, store, tracking, "detokenizer", train_detokenizer,
                                runtime.detokenizer_dir(project.get()), "detokenizer")
    result = trained.result
    context.log.info(f"de-tokenizer: {result.steps} steps on {result.samples} target images -> {trained.target}")
    return dg.MaterializeResult(metadata=trained.metadata(("loss",)),
                                data_version=dg.DataVersion(trained.dvc_record.md5))


@dg.asset(group_name="training", pool=POOL, kinds={"pytorch", "mlflow"},
          deps=[dg.AssetKey(SAMPLES_ASSET), detokenizer],
          description="MUSIC's LoRA adapter and resamplers, trained on every training shard (never MSIC)")
def lora_checkpoint(context: dg.AssetExecutionContext, project: ProjectConfig, music_llm: MusicLLMResource,
                    music_vision: MusicVisionResource, select_clip: SelectClipResource, store: DatasetStore,
                    tracking: MlflowTracking) -> dg.MaterializeResult:
    from music_dagster.model.generate import check_detokenizer
    from music_dagster.training.train import train_music

    models = {"music_llm": music_llm, "music_vision": music_vision}
    config = runtime.with_models(project.get(), models)
    detok = runtime.detokenizer_dir(config)
    logging_samples = config.profile.generate.logged_samples > 0
    if logging_samples:  # sample generations need it: fail before training, not after
        check_detokenizer(detok)

    def log_generations(trained: Trained) -> None:
        logged = log_sample_generations(config, trained.run, trained.sources, trained.target, detok,
                                        {**models, "select_clip": select_clip})
        context.log.info(f"logged {logged} sample generations to MLflow run {trained.run.run_id}")

    trained = train_and_publish(context, project, models, store, tracking, "lora", train_music,
                                runtime.lora_dir(config), "adapter", then=log_generations if logging_samples else None)
    result = trained.result
    context.log.info(f"LoRA: {result.steps} steps on {result.samples} samples "
                     f"({result.skipped_msic} MSIC skipped) -> {trained.target}")
    return dg.MaterializeResult(metadata=trained.metadata(("L1", "L2", "loss")),
                                data_version=dg.DataVersion(trained.dvc_record.md5))


def _finite_check(target: Path) -> dg.AssetCheckResult:
    if not target.is_dir():
        return dg.AssetCheckResult(passed=False, metadata={"error": f"{target} does not exist"})
    counts = weights_finite(target)
    return dg.AssetCheckResult(passed=counts["tensors"] > 0 and counts["non_finite"] == 0, metadata=counts)


@dg.asset_check(asset=lora_checkpoint, description="every LoRA adapter and resampler weight is finite")
def lora_weights_finite(project: ProjectConfig) -> dg.AssetCheckResult:
    return _finite_check(runtime.lora_dir(project.get()))


@dg.asset_check(asset=detokenizer, description="every de-tokenizer weight is finite")
def detokenizer_weights_finite(project: ProjectConfig) -> dg.AssetCheckResult:
    return _finite_check(runtime.detokenizer_dir(project.get()))


training_job = dg.define_asset_job("training_job", selection=dg.AssetSelection.groups("training"))

defs = dg.Definitions(assets=[detokenizer, lora_checkpoint],
                      asset_checks=[lora_weights_finite, detokenizer_weights_finite], jobs=[training_job])
