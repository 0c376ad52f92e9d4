"""The data-synthesis asset graph (DESIGN "The asset graph"): one asset per row of the stage table
(`synthesis.stages.STAGES`: name, parent, models, compute and check functions), partitioned by shard, thin over
`music_dagster.synthesis`.

Every asset reads its parent's shard, runs one stage, and writes `datasets/<asset>/<shard>/` atomically through the
`store` resource: `manifest.jsonl` (records validated against the stage's schema), the PNGs, `dropped.json` (samples
dropped with their reasons) and `preview.png`. A shard's seed is derived from its key and the config's seed, so a
shard re-materialized with the same config is byte-identical. Shards are dynamic partitions of `shards`; register
them with `ensure_shards(instance, n)` (keys `shard-00000`, ...) and run `data_job` over a range of shard keys
(`partition_range`): each step runs its stage shard after shard, with its models loaded once, and each shard is
still its own partition with the bytes a one-shard run writes. Every shard of a step gets a verdict of the
partitioned check `shard_published`: failed, with its reason, for a shard that failed alone. Model-heavy assets run
in the Dagster pool `gpu`.
The config comes from the `project` resource (`ProjectConfig`), the models from their role's resources.
"""

import base64
import contextlib
import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,  # not exported at dagster's top level
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from music_dagster.assets.device_lease import POOL, step_devices
from music_dagster.resources.project import ProjectConfig
from music_dagster.resources.storage import DatasetStore
from music_dagster.synthesis.common import shard_key
from music_dagster.synthesis.stages import STAGE_NAMES, STAGES, ShardInputs, Stage, data_fingerprint

SHARDS = dg.DynamicPartitionsDefinition(name="shards")
GROUP = "data"
# On Kubernetes (deploy/k8s/, dagster-k8s's k8s_job_executor) each step is a pod: a model-heavy one asks for one GPU.
GPU_STEP_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}}
DROPPED_FILE = "dropped.json"
PREVIEW_FILE = "preview.png"
# Every data asset's partitioned check, one verdict per shard: did this shard's stage publish it?
PUBLISHED_CHECK = "shard_published"
PUBLISHED_DESCRIPTION = ("this shard's stage ran and published the shard (failed, with the reason, when the shard "
                         "failed alone inside a range run: its files are not this run's)")


def partition_range(first: str, last: str) -> dict[str, str]:
    """The run tags of a run over shards `first` .. `last` (in the order the shards were registered)."""
    return {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


def ensure_shards(instance: dg.DagsterInstance, n: int) -> list[str]:
    """Register shards `shard-00000` .. `shard-<n-1>` as partitions of `shards` (the missing ones only) and return
    those n keys. More shards later is more keys: existing shards keep their key, seed and data."""
    from music_dagster.synthesis import SynthesisError

    if n < 1:
        raise SynthesisError(f"number of shards must be >= 1, got {n}")
    keys = [shard_key(i) for i in range(n)]
    existing = set(instance.get_dynamic_partitions(SHARDS.name))
    missing = [k for k in keys if k not in existing]
    if missing:
        instance.add_dynamic_partitions(SHARDS.name, missing)
    return keys


# ---------------------------------------------------------------------------------------------------------------
def _png_markdown(image, title: str, max_side: int = 256) -> str:
    """A small inline PNG (the full-size sheet is the shard's preview.png)."""
    from music_dagster.storage import png_bytes

    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)))
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    return f"![{title}](data:image/png;base64,{data})"


def _shard_hash(path: Path) -> str:
    from music_dagster.storage import file_sha256

    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


def published_verdict(instance: dg.DagsterInstance, asset: str, key: str):
    """The latest `shard_published` verdict on shard `key` of `asset` (an `AssetCheckExecutionRecord`: `.run_id`,
    `.status`, `.evaluation` with `.passed` and `.metadata["reason"]`), None if none was ever given."""
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as Status

    records = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey(asset), PUBLISHED_CHECK), limit=1, status={Status.SUCCEEDED, Status.FAILED},
        partition_filter=PartitionKeyFilter(key=key))
    return records[0] if records else None


def _stage(context: dg.AssetExecutionContext, stage: Stage) -> Iterator:
    """Run one stage on every shard of the step's partition range and publish each shard on its own.

    A step covers one shard, or a range of shards when a backfill or `music pipeline` runs many shards in one run
    (the assets' single-run backfill policy): the models the stage needs are loaded once for the whole range. A
    shard whose stage fails fails alone: nothing of it is written, its `shard_published` check fails with the
    reason (the run's log has it too), and the other shards publish (its children in the same run fail alone in
    turn, their parent shard missing). When every shard of the step fails, the step fails with the first reason,
    as a one-shard run always has. The graph's last stage (the table's last row) records the data stage's outputs
    as they now are in dvc.lock and the DVC remote once per step, so `dvc repro` agrees with this run."""
    from music_dagster.errors import UserError

    project: ProjectConfig = context.resources.project
    store: DatasetStore = context.resources.store
    config = project.get()
    prepared = stage.prepare(config, config.profile.data) if stage.prepare else None
    fingerprint = data_fingerprint(config)  # what shaped the bytes: `music pipeline` skips a shard that has it
    keys = context.partition_keys
    if stage.note:
        for key in keys:
            context.log.info(stage.note(config, key))
    failures: dict[str, UserError] = {}
    verdicts: dict[str, list] = {}
    versions: dict[str, str] = {}
    lease = step_devices(context, config.profile) if stage.gpu else contextlib.nullcontext(([], {}))
    with lease as (_, summary):  # the step's metadata so far: the device it holds, if any
        for key in keys:
            _publish_or_record(context, config, store, stage, prepared, key, failures, verdicts, versions,
                               fingerprint)
    _unload_models_done_with(context, stage)
    if len(failures) == len(keys):
        yield from _published_verdicts(context, failures)
        raise next(iter(failures.values()))
    if stage is STAGES[-1]:
        from music_dagster.tracking.dvc import record_output

        summary.update(record_output(store.asset_dir(stage.name)).metadata())
    yield dg.MaterializeResult(
        metadata=summary,
        # Dagster's data version is one per step output: a shard's own hash when the step is one shard; in a range
        # each shard's hash is its `shard_sha256` metadata.
        data_version=dg.DataVersion(versions[keys[0]]) if len(keys) == 1 else None,
        check_results=[dg.AssetCheckResult(
            check_name=name, passed=all(v.passed for _, v in results),
            metadata={"detail": "; ".join(v.detail if len(keys) == 1 else f"{k}: {v.detail}" for k, v in results)})
            for name, results in verdicts.items()],
    )
    # After the materialization: each verdict is on its shard's new one, which is what makes it current in the UI.
    yield from _published_verdicts(context, failures)
    # The check's step output, which Dagster makes from an AssetCheckResult; that names no partition of a range.
    yield dg.Output(None, output_name=context.assets_def.get_output_name_for_asset_check_key(
        dg.AssetCheckKey(context.asset_key, PUBLISHED_CHECK)))


def _published_verdicts(context: dg.AssetExecutionContext, failures: dict) -> Iterator[dg.AssetCheckEvaluation]:
    """One `shard_published` verdict per shard of the step, on the shard's partition and its latest
    materialization: passed, or failed with the reason of `failures[key]`. A failed shard shows red in the check's
    partitions in the UI (the others green), and `music pipeline` runs it again (`pipeline.stale_shards`)."""
    for key in context.partition_keys:
        latest = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[key]), limit=1).records
        target = AssetCheckEvaluationTargetMaterializationData(
            run_id=latest[0].run_id, storage_id=latest[0].storage_id, timestamp=latest[0].timestamp) if latest else None
        error = failures.get(key)
        yield dg.AssetCheckEvaluation(
            asset_key=context.asset_key, check_name=PUBLISHED_CHECK, passed=error is None, partition=key,
            metadata={"reason": dg.MetadataValue.text(str(error))} if error else None, blocking=False,
            target_materialization_data=target)


def _publish_or_record(context, config, store, stage, prepared, key, failures, verdicts, versions, fingerprint):
    """Publish shard `key` with its `data_fingerprint` (`synthesis.stages.data_fingerprint`), or record why it
    failed (in `failures`, for its `shard_published` verdict, and in the run's log)."""
    from music_dagster.errors import UserError

    try:
        metadata, shard_verdicts, versions[key] = _publish_shard(context, config, store, stage, prepared, key)
    except UserError as e:
        failures[key] = e
        context.log.error(f"{stage.name}[{key}] failed, not published: {e}")
        return
    metadata["data_fingerprint"] = dg.MetadataValue.text(fingerprint)
    context.add_asset_metadata(metadata, partition_key=key)
    for name, verdict in shard_verdicts.items():
        verdicts.setdefault(name, []).append((key, verdict))


def _unload_models_done_with(context: dg.AssetExecutionContext, stage: Stage) -> None:
    """Unload this stage's models that no later stage of the graph loads. A run keeps each model from its first
    stage to its last, never longer: at full size the data roles together (about 85 GB in bf16) exceed an 80 GB
    GPU, while the most held at once is the I2I model beside the VLM, which the CoT stage still needs."""
    later = {role for s in STAGES[STAGES.index(stage) + 1:] for role in s.roles}
    for role in stage.roles:
        if role not in later:
            getattr(context.resources, role).unload()


def _publish_shard(context: dg.AssetExecutionContext, config, store: DatasetStore, stage: Stage, prepared,
                   key: str) -> tuple[dict, dict, str]:
    """Run one stage on shard `key` and publish it: compute (nothing written yet), then write the whole shard
    atomically, then check what was written. Returns its metadata, its check verdicts and its hash."""
    from music_dagster.images import read_image
    from music_dagster.storage import MANIFEST, first_lines, resolve_stored
    from music_dagster.synthesis import preview, schemas
    from music_dagster.synthesis.common import ShardContext, shard_seed

    asset, parent, table = stage.name, stage.parent, stage.table
    data = config.profile.data
    ctx = ShardContext(asset, key, shard_seed(config.seed, key))
    for name in STAGE_NAMES:  # the shard's whole graph: a locked folder fails now, not after models ran
        store.check_writable(name, key)
    parents = store.read(parent, key).records if parent else []
    root = Path(store.root)
    lines = first_lines(parents)
    source = store.shard_path(parent, key) / MANIFEST if parent else store.shard_path(asset, key)

    def open_image(ref: str):
        # Every ref read here comes from a parent record: the error names that manifest line.
        where = f"{source}: line {lines[ref]}" if ref in lines else str(source)
        return read_image(resolve_stored(root, ref, where))

    context.log.info(f"{asset}[{key}]: {len(parents)} input records")
    inputs = ShardInputs(ctx, config, data, parents, open_image, lambda role: getattr(context.resources, role).load(),
                         prepared, lambda: store.read(parent, key).records if parent else [])
    result = stage.compute(inputs)
    own = ctx.ref("")
    sheet = preview.sheet(asset, result.records, lambda ref: (
        result.images[ref[len(own):]] if ref.startswith(own) else open_image(ref)))
    with store.writer(asset, key, schemas.RECORDS[asset]) as writer:
        for name in sorted(result.images):
            writer.add_image(name, result.images[name])
        if sheet is not None:
            writer.add_image(PREVIEW_FILE, sheet)
        for record in result.records:
            writer.add_record(record)
        writer.add_json(DROPPED_FILE, result.dropped)
    path = store.shard_path(asset, key)
    records = store.read(asset, key).records
    verdicts = {check.name: check.run(inputs, records) for check in stage.checks}
    reasons = result.reasons()
    metadata = {
        "path": dg.MetadataValue.path(str(path)),
        "dagster/row_count": dg.MetadataValue.int(len(records)),
        "kept": dg.MetadataValue.int(len(records)),
        "dropped": dg.MetadataValue.int(len(result.dropped)),
        "drop_reasons": dg.MetadataValue.json(reasons),
        "shard_seed": dg.MetadataValue.text(str(ctx.seed)),
    }
    counts = preview.subject_counts(records)
    if counts:
        metadata["samples_per_subject_count"] = dg.MetadataValue.md(
            "| subjects | samples |\n| ---: | ---: |\n" + "\n".join(f"| {n} | {c} |" for n, c in counts.items()))
    if result.dropped:
        metadata["dropped_samples"] = dg.MetadataValue.md(preview.drop_table(result.dropped))
    if sheet is not None:
        metadata["preview"] = dg.MetadataValue.md(_png_markdown(sheet, f"{asset} {key}"))
        metadata["preview_path"] = dg.MetadataValue.path(str(path / PREVIEW_FILE))
    if table and records:
        metadata["samples"] = dg.MetadataValue.md(preview.sample_table(records, table))
    version = _shard_hash(path)
    metadata["shard_sha256"] = dg.MetadataValue.text(version)
    context.log.info(f"{asset}[{key}]: kept {len(records)}, dropped {len(result.dropped)} {reasons or ''}")
    return metadata, verdicts, version


def _stage_asset(stage: Stage) -> dg.AssetsDefinition:
    """The asset of one row of the stage table: its shard partitions, checks (the row's, blocking, and
    `shard_published`), pool and resources."""

    def compute(context: dg.AssetExecutionContext):
        yield from _stage(context, stage)

    # backfill_policy is "beta" and a check's partitions_def "preview" in Dagster 1.13: known, not news to a user
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.asset(
            name=stage.name, partitions_def=SHARDS, group_name=GROUP, deps=[stage.parent] if stage.parent else None,
            description=stage.description, pool=POOL if stage.gpu else None,
            kinds={"pytorch"} if stage.gpu else {"python"},
            check_specs=[*(dg.AssetCheckSpec(check.name, asset=stage.name, description=check.description,
                                             blocking=True) for check in stage.checks),
                         dg.AssetCheckSpec(PUBLISHED_CHECK, asset=stage.name, description=PUBLISHED_DESCRIPTION,
                                           partitions_def=SHARDS)],
            op_tags=GPU_STEP_TAGS if stage.gpu else None,
            required_resource_keys={"project", "store", *stage.roles},
            # A backfill of many shards (the UI's "Materialize" of selected partitions, the regeneration sensor,
            # `music pipeline`) is one run over their key range, so each step loads its models once for all of them.
            backfill_policy=dg.BackfillPolicy.single_run(),
        )(compute)


DATA_ASSETS = [_stage_asset(stage) for stage in STAGES]
DATA_ASSET_NAMES = list(STAGE_NAMES)
DATA_ASSETS_BY_NAME = dict(zip(DATA_ASSET_NAMES, DATA_ASSETS))


def build_data_job(executor_def: dg.ExecutorDefinition = dg.in_process_executor):
    """`data_job` with an executor. In-process by default: the graph is a chain, so no two of its steps could run at
    once anyway, and one process keeps each model loaded from the step that first needs it to the end of the run
    (a process per step would import torch and load every model again). Parallelism comes from runs over other
    shard ranges, on other devices. On Kubernetes (`music_dagster.k8s`) each step is its own pod instead."""
    return dg.define_asset_job(
        "data_job", selection=dg.AssetSelection.groups(GROUP), partitions_def=SHARDS, executor_def=executor_def,
        description="the whole data-synthesis graph for one shard or a range of shards (register shards with "
                    "ensure_shards)",
    )


data_job = build_data_job()
defs = dg.Definitions(assets=DATA_ASSETS, jobs=[data_job])
