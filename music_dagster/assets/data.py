"""The data-synthesis asset graph (DESIGN "The asset graph"): ten assets partitioned by shard, thin over
`music_dagster.synthesis`.

Every asset reads its parent's shard, runs one stage, and writes `datasets/<asset>/<shard>/` atomically through the
`store` resource: `manifest.jsonl` (records validated against the stage's schema), the PNGs, `dropped.json` (samples
dropped with their reasons) and `preview.png`. A shard's seed is derived from its key and the config's seed, so a
shard re-materialized with the same config is byte-identical. Shards are dynamic partitions of `shards`; register
them with `ensure_shards(instance, n)` (keys `shard-00000`, ...) and run `data_job` once per shard. Model-heavy
assets run in the Dagster pool `gpu`.
"""

import base64
import hashlib
from pathlib import Path
from typing import Callable

import dagster as dg

from music_dagster.config import default_config
from music_dagster.resources.models import (
    ClipResource, DetectorResource, I2IResource, LLMResource, SegmenterResource, T2IResource, VLMResource,
)
from music_dagster.resources.storage import DatasetStore

SHARDS = dg.DynamicPartitionsDefinition(name="shards")
GROUP = "data"
GPU_POOL = "gpu"
DROPPED_FILE = "dropped.json"
PREVIEW_FILE = "preview.png"


def shard_key(index: int) -> str:
    return f"shard-{index:05d}"


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
    """Run one stage on the context's shard and publish it: compute (nothing written yet), then write the whole
    shard atomically, then check what was written. With `record_dvc_stage` (the graph's last asset), the data
    stage's outputs as they now are go into dvc.lock and the DVC remote, so `dvc repro` agrees with this run."""
    from music_dagster.images import read_image
    from music_dagster.storage import MANIFEST, first_lines, resolve_stored
    from music_dagster.synthesis import preview, schemas
    from music_dagster.synthesis.common import ShardContext, shard_seed

    config = default_config()
    data = config.profile.data
    key = context.partition_key
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
    verdicts = checks(records, data, open_image)
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
    if record_dvc_stage:
        from music_dagster.dvc import record_output

        metadata.update(record_output(store.asset_dir(asset)).metadata())
    context.log.info(f"{asset}[{key}]: kept {len(records)}, dropped {len(result.dropped)} {reasons or ''}")
    return dg.MaterializeResult(
        metadata=metadata,
        data_version=dg.DataVersion(_shard_hash(path)),
        check_results=[dg.AssetCheckResult(check_name=name, passed=v.passed, metadata={"detail": v.detail})
                       for name, v in verdicts.items()],
    )


def _specs(asset: str, **descriptions: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(name, asset=asset, description=text, blocking=True)
            for name, text in descriptions.items()]


def _asset(name: str, description: str, parent: str | None, gpu: bool, checks: dict[str, str]):
    return dg.asset(
        name=name, partitions_def=SHARDS, group_name=GROUP, deps=[parent] if parent else None,
        description=description, pool=GPU_POOL if gpu else None, kinds={"pytorch"} if gpu else {"python"},
        check_specs=_specs(name, **checks),
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
        lambda records, data, open_image: {"categories_valid": checks.categories_valid(
            records, set(names), data.min_categories, data.max_subjects, data.min_categories)},
        table=("categories", "scene"))


@_asset("scene_captions", "the LLM writes one caption naming every kept category", "category_combos", True,
        {"captions_mention_categories": "every caption contains every kept category"})
def scene_captions(context: dg.AssetExecutionContext, llm: LLMResource, store: DatasetStore):
    from music_dagster.synthesis import captions, checks

    return _stage(
        context, store, "scene_captions", "category_combos",
        lambda ctx, data, parents, open_image: captions.scene_captions(llm.load(), ctx, data, parents),
        lambda records, data, open_image: {"captions_mention_categories": checks.captions_mention_categories(records)},
        table=("caption",))


@_asset("target_images", "the T2I model renders each caption", "scene_captions", True,
        {"images_have_size": "every target image exists at the profile's resolution"})
def target_images(context: dg.AssetExecutionContext, t2i: T2IResource, store: DatasetStore):
    from music_dagster.synthesis import checks, targets

    return _stage(
        context, store, "target_images", "scene_captions",
        lambda ctx, data, parents, open_image: targets.target_images(t2i.load(), ctx, data, parents),
        lambda records, data, open_image: {
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
        lambda records, data, open_image: {
            "box_area_filter": checks.box_area_filter(records, data.min_box_area, data.min_subjects)})


@_asset("verified_boxes", "the VLM answers yes/no for each box; rejected subjects dropped", "detected_boxes", True,
        {"verified_above_threshold": "a subject is kept iff the VLM's P(yes) exceeds verify_threshold"})
def verified_boxes(context: dg.AssetExecutionContext, vlm: VLMResource, store: DatasetStore):
    from music_dagster.synthesis import checks, verification

    return _stage(
        context, store, "verified_boxes", "detected_boxes",
        lambda ctx, data, parents, open_image: verification.verified_boxes(vlm.load(), ctx, data, parents,
                                                                           open_image),
        lambda records, data, open_image: {"verified_above_threshold": checks.verified_above_threshold(
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
        lambda records, data, open_image: {
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
        lambda records, data, open_image: {"regions_valid": checks.regions_valid(records, open_image)})


@_asset("grid_layouts", "8x8 semantic layout: IoU with each patch above lambda x mean IoU", "subject_masks", False,
        {"every_subject_owns_a_cell": "every subject owns at least one cell of the grid"})
def grid_layouts(context: dg.AssetExecutionContext, store: DatasetStore):
    from music_dagster.synthesis import checks, layouts

    return _stage(
        context, store, "grid_layouts", "subject_masks",
        lambda ctx, data, parents, open_image: layouts.grid_layouts(ctx, data, parents, open_image),
        lambda records, data, open_image: {
            "every_subject_owns_a_cell": checks.every_subject_owns_a_cell(records, data.grid)},
        table=("layout_text",))


@_asset("cot_annotations", "the VLM writes the user instruction and the visual CoT, subjects by tag [i]",
        "grid_layouts", True, {"annotation_tags_valid": "the instruction tags every subject; every tag names one"})
def cot_annotations(context: dg.AssetExecutionContext, vlm: VLMResource, store: DatasetStore):
    from music_dagster.synthesis import checks, cot

    return _stage(
        context, store, "cot_annotations", "grid_layouts",
        lambda ctx, data, parents, open_image: cot.cot_annotations(vlm.load(), ctx, data, parents, open_image),
        lambda records, data, open_image: {"annotation_tags_valid": checks.annotation_tags_valid(records)},
        table=("instruction", "cot"))


@_asset("training_samples", "subject-count decimation down to min_subjects; MSIC hold-out shards down to 1",
        "cot_annotations", False,
        {"decimation_consistent": "counts N..floor per source; ids consistent in subjects, texts and layout"})
def training_samples(context: dg.AssetExecutionContext, store: DatasetStore):
    from music_dagster.synthesis import checks, samples

    config = default_config()
    every = config.profile.data.msic_holdout_every
    held_out = samples.is_msic_shard(context.partition_key, config.seed, every)
    context.log.info(f"shard {context.partition_key} is {'MSIC (held out)' if held_out else 'training'} data")
    sources = store.read("cot_annotations", context.partition_key).records
    floor = samples.MSIC_MIN_SUBJECTS if held_out else config.profile.data.min_subjects
    return _stage(
        context, store, "training_samples", "cot_annotations",
        lambda ctx, data, parents, open_image: samples.training_samples(ctx, data, parents, held_out),
        lambda records, data, open_image: {
            "decimation_consistent": checks.decimation_consistent(records, sources, floor)},
        table=("split", "num_subjects", "instruction", "layout_text"), record_dvc_stage=True)


DATA_ASSETS = [category_combos, scene_captions, target_images, detected_boxes, verified_boxes, reference_subjects,
               subject_masks, grid_layouts, cot_annotations, training_samples]
DATA_ASSET_NAMES = [a.key.path[-1] for a in DATA_ASSETS]

data_job = dg.define_asset_job(
    "data_job", selection=dg.AssetSelection.groups(GROUP), partitions_def=SHARDS,
    description="the whole data-synthesis graph for one shard (register shards with ensure_shards)",
)

defs = dg.Definitions(assets=DATA_ASSETS, jobs=[data_job])
