"""The data-synthesis asset graph (DESIGN "The asset graph"): ten assets partitioned by shard, thin over
`music_dagster.synthesis`.

Every asset reads its parent's shard, runs one stage, and writes `datasets/<asset>/<shard>/` atomically through the
`store` resource: `manifest.jsonl` (records validated against the stage's schema), the PNGs, `dropped.json` (samples
dropped with their reasons) and `preview.png`. A shard's seed is derived from its key and the config's seed, so a
shard re-materialized with the same config is byte-identical. Shards are dynamic partitions of `shards`; register
them with `ensure_shards(instance, n)` (keys `shard-00000`, ...) and run `data_job` over a range of shard keys
(`partition_range`): each step runs its stage shard after shard, with its models loaded once, and each shard is
still its own partition with the bytes a one-shard run writes. Model-heavy assets run in the Dagster pool `gpu`.
"""

import base64
import contextlib
import hashlib
import warnings
from pathlib import Path
from typing import Callable

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from music_dagster.config import default_config
from music_dagster.resources.models import (
    ClipResource, DetectorResource, I2IResource, LLMResource, SegmenterResource, T2IResource, VLMResource,
)
from music_dagster.resources.storage import DatasetStore

SHARDS = dg.DynamicPartitionsDefinition(name="shards")
GROUP = "data"
GPU_POOL = "gpu"
# On Kubernetes (deploy/k8s/, dagster-k8s's k8s_job_executor) each step is a pod: a model-heavy one asks for one GPU.
GPU_STEP_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}}
DROPPED_FILE = "dropped.json"
PREVIEW_FILE = "preview.png"


def shard_key(index: int) -> str:
    return f"shard-{index:05d}"


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


def _stage(context: dg.AssetExecutionContext, store: DatasetStore, asset: str, parent: str | None,
           compute: Callable, checks: Callable, table: tuple[str, ...] = (),
           record_dvc_stage: bool = False) -> dg.MaterializeResult:
    """Run one stage on every shard of the step's partition range and publish each shard on its own.

    A step covers one shard, or a range of shards when a backfill or `music pipeline` runs many shards in one run
    (the assets' single-run backfill policy): the models the stage needs are loaded once for the whole range. A
    shard whose stage fails fails alone: nothing of it is written, its reason goes into its partition's metadata
    and the run's log, and the other shards publish (its children in the same run fail alone in turn, their
    parent shard missing). When every shard of the step fails, the step fails with the first reason, as a
    one-shard run always has. With `record_dvc_stage` (the graph's last asset), the data stage's outputs as they
    now are go into dvc.lock and the DVC remote once per step, so `dvc repro` agrees with this run."""
    from music_dagster.errors import UserError

    keys = context.partition_keys
    failures: dict[str, UserError] = {}
    verdicts: dict[str, list] = {}
    versions: dict[str, str] = {}
    with _step_device(context) as summary:
        for key in keys:
            _publish_or_record(context, store, asset, parent, key, compute, checks, table, failures, verdicts,
                               versions)
    if len(failures) == len(keys):
        raise next(iter(failures.values()))
    if record_dvc_stage:
        from music_dagster.dvc import record_output

        summary.update(record_output(store.asset_dir(asset)).metadata())
    if failures:
        summary["failed_shards"] = dg.MetadataValue.json({k: str(e) for k, e in failures.items()})
    return dg.MaterializeResult(
        metadata=summary,
        # Dagster's data version is one per step output: a shard's own hash when the step is one shard; in a range
        # each shard's hash is its `shard_sha256` metadata.
        data_version=dg.DataVersion(versions[keys[0]]) if len(keys) == 1 else None,
        check_results=[dg.AssetCheckResult(
            check_name=name, passed=all(v.passed for _, v in results),
            metadata={"detail": "; ".join(v.detail if len(keys) == 1 else f"{k}: {v.detail}" for k, v in results)})
            for name, results in verdicts.items()],
    )


def _publish_or_record(context, store, asset, parent, key, compute, checks, table, failures, verdicts, versions):
    """Publish shard `key`, or record why it failed (its partition's `failed` metadata, the run's log)."""
    from music_dagster.errors import UserError

    try:
        metadata, shard_verdicts, versions[key] = _publish_shard(context, store, asset, parent, key, compute, checks,
                                                                 table)
    except UserError as e:
        failures[key] = e
        context.log.error(f"{asset}[{key}] failed, not published: {e}")
        context.add_asset_metadata({"failed": dg.MetadataValue.text(str(e))}, partition_key=key)
        return
    context.add_asset_metadata(metadata, partition_key=key)
    for name, verdict in shard_verdicts.items():
        verdicts.setdefault(name, []).append((key, verdict))


@contextlib.contextmanager
def _step_device(context: dg.AssetExecutionContext):
    """A model-heavy step leases one device of the profile's `devices` for its whole range (`devices.lease`);
    yields the step's metadata so far: the device and its slot."""
    from music_dagster import devices

    if context.assets_def.node_def.pool != GPU_POOL:
        yield {}
        return
    profile = default_config().profile
    with devices.lease(context.instance.root_directory, devices.visible_devices(profile.devices),
                       profile.pool_wait_s) as (slot, device):
        context.log.info(f"{context.op_def.name}: device {device} (slot {slot})")
        yield {"device": dg.MetadataValue.text(device), "device_slot": dg.MetadataValue.int(slot)}


def _publish_shard(context: dg.AssetExecutionContext, store: DatasetStore, asset: str, parent: str | None, key: str,
                   compute: Callable, checks: Callable, table: tuple[str, ...]) -> tuple[dict, dict, str]:
    """Run one stage on shard `key` and publish it: compute (nothing written yet), then write the whole shard
    atomically, then check what was written. Returns its metadata, its check verdicts and its hash."""
    from music_dagster.images import read_image
    from music_dagster.storage import MANIFEST, first_lines, resolve_stored
    from music_dagster.synthesis import preview, schemas
    from music_dagster.synthesis.common import ShardContext, shard_seed

    config = default_config()
    data = config.profile.data
    ctx = ShardContext(asset, key, shard_seed(config.seed, key))
    for name in DATA_ASSET_NAMES:  # the shard's whole graph: a locked folder fails now, not after models ran
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
    result = compute(ctx, data, parents, open_image)
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
    verdicts = checks(ctx, records, data, open_image)
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


def _specs(asset: str, **descriptions: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(name, asset=asset, description=text, blocking=True)
            for name, text in descriptions.items()]


def _asset(name: str, description: str, parent: str | None, gpu: bool, checks: dict[str, str]):
    with warnings.catch_warnings():  # backfill_policy is "beta" in Dagster 1.13: known, not news to a user
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.asset(
            name=name, partitions_def=SHARDS, group_name=GROUP, deps=[parent] if parent else None,
            description=description, pool=GPU_POOL if gpu else None, kinds={"pytorch"} if gpu else {"python"},
            check_specs=_specs(name, **checks),
            op_tags=GPU_STEP_TAGS if gpu else None,
            # A backfill of many shards (the UI's "Materialize" of selected partitions, the regeneration sensor,
            # `music pipeline`) is one run over their key range, so each step loads its models once for all of them.
            backfill_policy=dg.BackfillPolicy.single_run(),
        )


# ---------------------------------------------------------------------------------------------------------------
@_asset("category_combos", "2..12 Objects365 categories per sample; the LLM keeps a compatible subset and names "
        "the scene", None, True, {"categories_valid": "known candidates in range, >= min_categories distinct kept"})
def category_combos(context: dg.AssetExecutionContext, llm: LLMResource, store: DatasetStore):
    from music_dagster.synthesis import checks, combos

    config = default_config()
    names = combos.load_categories(config.paths.resolve("objects365"), config.profile.data.categories)
    return _stage(
        context, store, "category_combos", None,
        lambda ctx, data, parents, open_image: combos.category_combos(llm.load(), ctx, data, names),
        lambda ctx, records, data, open_image: {"categories_valid": checks.categories_valid(
            records, set(names), data.min_categories, data.max_subjects, data.min_categories)},
        table=("categories", "scene"))


@_asset("scene_captions", "the LLM writes one caption naming every kept category", "category_combos", True,
        {"captions_mention_categories": "every caption contains every kept category"})
def scene_captions(context: dg.AssetExecutionContext, llm: LLMResource, store: DatasetStore):
    from music_dagster.synthesis import captions, checks

    return _stage(
        context, store, "scene_captions", "category_combos",
        lambda ctx, data, parents, open_image: captions.scene_captions(llm.load(), ctx, data, parents),
        lambda ctx, records, data, open_image: {
            "captions_mention_categories": checks.captions_mention_categories(records)},
        table=("caption",))


@_asset("target_images", "the T2I model renders each caption", "scene_captions", True,
        {"images_have_size": "every target image exists at the profile's resolution"})
def target_images(context: dg.AssetExecutionContext, t2i: T2IResource, store: DatasetStore):
    from music_dagster.synthesis import checks, targets

    return _stage(
        context, store, "target_images", "scene_captions",
        lambda ctx, data, parents, open_image: targets.target_images(t2i.load(), ctx, data, parents),
        lambda ctx, records, data, open_image: {
            "images_have_size": checks.images_have_size(records, data.image_size, open_image)},
        table=("caption",))


@_asset("detected_boxes", "GroundingDINO, best box per category, boxes under 0.01 of the image dropped",
        "target_images", True, {"box_area_filter": "every box inside the image, area >= min_box_area, one per "
                                "category, >= min_subjects per sample"})
def detected_boxes(context: dg.AssetExecutionContext, detector: DetectorResource, store: DatasetStore):
    from music_dagster.synthesis import checks, detection

    return _stage(
        context, store, "detected_boxes", "target_images",
        lambda ctx, data, parents, open_image: detection.detected_boxes(detector.load(), ctx, data, parents,
                                                                        open_image),
        lambda ctx, records, data, open_image: {
            "box_area_filter": checks.box_area_filter(records, data.min_box_area, data.min_subjects)})


@_asset("verified_boxes", "the VLM answers yes/no for each box; rejected subjects dropped", "detected_boxes", True,
        {"verified_above_threshold": "a subject is kept iff the VLM's P(yes) exceeds verify_threshold"})
def verified_boxes(context: dg.AssetExecutionContext, vlm: VLMResource, store: DatasetStore):
    from music_dagster.synthesis import checks, verification

    return _stage(
        context, store, "verified_boxes", "detected_boxes",
        lambda ctx, data, parents, open_image: verification.verified_boxes(vlm.load(), ctx, data, parents,
                                                                           open_image),
        lambda ctx, records, data, open_image: {"verified_above_threshold": checks.verified_above_threshold(
            records, data.verify_threshold, data.min_subjects)})


@_asset("reference_subjects", "each verified box cropped and re-rendered by the I2I model (new viewpoint or "
        "appearance)", "verified_boxes", True,
        {"references_not_copies": "every verified subject has a reference, and it is not a copy of its crop"})
def reference_subjects(context: dg.AssetExecutionContext, i2i: I2IResource, store: DatasetStore):
    from music_dagster.synthesis import checks, references

    return _stage(
        context, store, "reference_subjects", "verified_boxes",
        lambda ctx, data, parents, open_image: references.reference_subjects(i2i.load(), ctx, data, parents,
                                                                             open_image),
        lambda ctx, records, data, open_image: {
            "references_not_copies": checks.references_not_copies(records, open_image)})


@_asset("subject_masks", "SAM2 masks from boxes; the mask is the region when CLIP prefers it to the box",
        "reference_subjects", True,
        {"regions_valid": "every subject has a region; mask iff Sim_mask > Sim_unmask"})
def subject_masks(context: dg.AssetExecutionContext, segmenter: SegmenterResource, clip: ClipResource,
                  store: DatasetStore):
    from music_dagster.synthesis import checks, masks

    return _stage(
        context, store, "subject_masks", "reference_subjects",
        lambda ctx, data, parents, open_image: masks.subject_masks(segmenter.load(), clip.load(), ctx, data,
                                                                   parents, open_image),
        lambda ctx, records, data, open_image: {"regions_valid": checks.regions_valid(records, open_image)})


@_asset("grid_layouts", "8x8 semantic layout: IoU with each patch above lambda x mean IoU", "subject_masks", False,
        {"every_subject_owns_a_cell": "every subject owns at least one cell of the grid"})
def grid_layouts(context: dg.AssetExecutionContext, store: DatasetStore):
    from music_dagster.synthesis import checks, layouts

    return _stage(
        context, store, "grid_layouts", "subject_masks",
        lambda ctx, data, parents, open_image: layouts.grid_layouts(ctx, data, parents, open_image),
        lambda ctx, records, data, open_image: {
            "every_subject_owns_a_cell": checks.every_subject_owns_a_cell(records, data.grid)},
        table=("layout_text",))


@_asset("cot_annotations", "the VLM writes the user instruction and the visual CoT, subjects by tag [i]",
        "grid_layouts", True, {"annotation_tags_valid": "the instruction tags every subject; every tag names one"})
def cot_annotations(context: dg.AssetExecutionContext, vlm: VLMResource, store: DatasetStore):
    from music_dagster.synthesis import checks, cot

    return _stage(
        context, store, "cot_annotations", "grid_layouts",
        lambda ctx, data, parents, open_image: cot.cot_annotations(vlm.load(), ctx, data, parents, open_image),
        lambda ctx, records, data, open_image: {"annotation_tags_valid": checks.annotation_tags_valid(records)},
        table=("instruction", "cot"))


@_asset("training_samples", "subject-count decimation down to min_subjects; MSIC hold-out shards down to 1",
        "cot_annotations", False,
        {"decimation_consistent": "counts N..floor per source; ids consistent in subjects, texts and layout"})
def training_samples(context: dg.AssetExecutionContext, store: DatasetStore):
    from music_dagster.synthesis import checks, samples

    config = default_config()
    every = config.profile.data.msic_holdout_every

    def held_out(key: str) -> bool:
        return samples.is_msic_shard(key, config.seed, every)

    def decimation_consistent(ctx, records, data, open_image):
        floor = samples.MSIC_MIN_SUBJECTS if held_out(ctx.key) else data.min_subjects
        sources = store.read("cot_annotations", ctx.key).records
        return {"decimation_consistent": checks.decimation_consistent(records, sources, floor)}

    for key in context.partition_keys:
        context.log.info(f"shard {key} is {'MSIC (held out)' if held_out(key) else 'training'} data")
    return _stage(
        context, store, "training_samples", "cot_annotations",
        lambda ctx, data, parents, open_image: samples.training_samples(ctx, data, parents, held_out(ctx.key)),
        decimation_consistent,
        table=("split", "num_subjects", "instruction", "layout_text"), record_dvc_stage=True)


DATA_ASSETS = [category_combos, scene_captions, target_images, detected_boxes, verified_boxes, reference_subjects,
               subject_masks, grid_layouts, cot_annotations, training_samples]
DATA_ASSET_NAMES = [a.key.path[-1] for a in DATA_ASSETS]


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
