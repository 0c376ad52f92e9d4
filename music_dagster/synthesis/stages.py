"""The data-synthesis graph, declared once: `STAGES`, one `Stage` row per stage, in graph order.

The table drives every other view of the graph: the Dagster assets (`assets/data.py` builds one asset per row:
name, parent, description, check specs, the `gpu` pool and model resources), `music bench data` (`bench/data.py`
runs the rows in order), the tests' lists of stage names, and dvc.yaml's data stage (a test compares its `outs`
with the rows and its code `deps` with what the stage imports). Adding a stage is one row here and one function:
the stage's own, in its module, called from the row's small adapter below with the shard's `ShardInputs`.

Nothing here imports Dagster; each adapter imports its stage's module when it runs, so importing the table (as the
code location does) stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from music_dagster.synthesis.common import OpenImage, ShardContext, StageResult


@dataclass(frozen=True)
class ShardInputs:
    """What a stage's compute and check functions get for one shard."""

    ctx: ShardContext
    config: Any  # the project's `Config` (seed, paths)
    data: Any  # the profile's `data` section (`music bench data` changes its shard and batch size)
    parents: list[dict]  # the parent shard's records (empty for the first stage)
    open_image: OpenImage
    model: Callable[[str], Any]  # role -> its loaded model handle (loaded on first use)
    prepared: Any = None  # what the stage's `prepare(config, data)` returned, once for the whole step
    read_parent: Callable[[], list[dict]] = list  # the parent shard's records as stored now (for a check)
    held_out: bool | None = None  # an MSIC hold-out shard? None: the config's rule decides (`held_out`), as in
    # the assets; `music bench data` times a training shard (False) whatever its key


@dataclass(frozen=True)
class Check:
    """An asset check of a stage: run on the records as written; returns a `checks.Verdict`."""

    name: str
    description: str
    run: Callable[[ShardInputs, list[dict]], Any]


@dataclass(frozen=True)
class Stage:
    name: str
    parent: str | None
    description: str
    roles: tuple[str, ...]  # model roles it loads (its resources); a stage with a model runs in the `gpu` pool
    compute: Callable[[ShardInputs], StageResult]
    checks: tuple[Check, ...]
    table: tuple[str, ...] = ()  # record fields of the `samples` metadata table
    prepare: Callable[[Any, Any], Any] | None = None  # (config, data) -> once per step, before any shard
    note: Callable[[Any, str], str] | None = None  # (config, shard key) -> a line logged before the shards run

    @property
    def gpu(self) -> bool:
        return bool(self.roles)


# ---------------------------------------------------------------------------------------------------------------
# Special cases: `category_combos` reads the Objects365 names once per step; `training_samples` holds out the
# MSIC shards (decimated down to one subject) and checks its records against its parent shard as stored.
def _categories(config, data) -> list[str]:
    from music_dagster.synthesis.combos import load_categories

    return load_categories(config.paths.resolve("objects365"), data.categories)


def _category_combos(s: ShardInputs) -> StageResult:
    from music_dagster.synthesis import combos

    return combos.category_combos(s.model("llm"), s.ctx, s.data, s.prepared)


def _categories_valid(s: ShardInputs, records: list[dict]):
    from music_dagster.synthesis import checks

    return checks.categories_valid(records, set(s.prepared), s.data.min_categories, s.data.max_subjects,
                                   s.data.min_categories)


def _scene_captions(s: ShardInputs) -> StageResult:
    from music_dagster.synthesis import captions

    return captions.scene_captions(s.model("llm"), s.ctx, s.data, s.parents)


def _captions_mention_categories(s: ShardInputs, records: list[dict]):
    from music_dagster.synthesis import checks

    return checks.captions_mention_categories(records)


def _target_images(s: ShardInputs) -> StageResult:
    from music_dagster.synthesis import targets

    return targets.target_images(s.model("t2i"), s.ctx, s.data, s.parents)


def _images_have_size(s: ShardInputs, records: list[dict]):
    from music_dagster.synthesis import checks

    return checks.images_have_size(records, s.data.image_size, s.open_image)


def _detected_boxes(s: ShardInputs) -> StageResult:
    from music_dagster.synthesis import detection

    return detection.detected_boxes(s.model("detector"), s.ctx, s.data, s.parents, s.open_image)


def _box_area_filter(s: ShardInputs, records: list[dict]):
    from music_dagster.synthesis import checks

    return checks.box_area_filter(records, s.data.min_box_area, s.data.min_subjects)


def _verified_boxes(s: ShardInputs) -> StageResult:
    from music_dagster.synthesis import verification

    return verification.verified_boxes(s.model("vlm"), s.ctx, s.data, s.parents, s.open_image)


def _verified_above_threshold(s: ShardInputs, records: list[dict]):
    from music_dagster.synthesis import checks

    return checks.verified_above_threshold(records, s.data.verify_threshold, s.data.min_subjects)


def _reference_subjects(s: ShardInputs) -> StageResult:
    from music_dagster.synthesis import references

    return references.reference_subjects(s.model("i2i"), s.ctx, s.data, s.parents, s.open_image)


def _references_not_copies(s: ShardInputs, records: list[dict]):
    from music_dagster.synthesis import checks

    return checks.references_not_copies(records, s.open_image)


def _subject_masks(s: ShardInputs) -> StageResult:
    from music_dagster.synthesis import masks

    return masks.subject_masks(s.model("segmenter"), s.model("clip"), s.ctx, s.data, s.parents, s.open_image)


def _regions_valid(s: ShardInputs, records: list[dict]):
    from music_dagster.synthesis import checks

    return checks.regions_valid(records, s.open_image)


def _grid_layouts(s: ShardInputs) -> StageResult:
    from music_dagster.synthesis import layouts

    return layouts.grid_layouts(s.ctx, s.data, s.parents, s.open_image)


def _every_subject_owns_a_cell(s: ShardInputs, records: list[dict]):
    from music_dagster.synthesis import checks

    return checks.every_subject_owns_a_cell(records, s.data.grid)


def _cot_annotations(s: ShardInputs) -> StageResult:
    from music_dagster.synthesis import cot

    return cot.cot_annotations(s.model("vlm"), s.ctx, s.data, s.parents, s.open_image)


def _annotation_tags_valid(s: ShardInputs, records: list[dict]):
    from music_dagster.synthesis import checks

    return checks.annotation_tags_valid(records, s.data.cot_words_per_subject)


def held_out(config, data, key: str) -> bool:
    """Whether shard `key` is an MSIC hold-out shard (`samples.is_msic_shard`), never trained on."""
    from music_dagster.synthesis.samples import is_msic_shard

    return is_msic_shard(key, config.seed, data.msic_holdout_every)


def _split_note(config, key: str) -> str:
    return f"shard {key} is {'MSIC (held out)' if held_out(config, config.profile.data, key) else 'training'} data"


def _is_held_out(s: ShardInputs) -> bool:
    return held_out(s.config, s.data, s.ctx.key) if s.held_out is None else s.held_out


def _training_samples(s: ShardInputs) -> StageResult:
    from music_dagster.synthesis import samples

    return samples.training_samples(s.ctx, s.data, s.parents, _is_held_out(s))


def _decimation_consistent(s: ShardInputs, records: list[dict]):
    from music_dagster.synthesis import checks, samples

    floor = samples.MSIC_MIN_SUBJECTS if _is_held_out(s) else s.data.min_subjects
    return checks.decimation_consistent(records, s.read_parent(), floor)


# ---------------------------------------------------------------------------------------------------------------
STAGES: tuple[Stage, ...] = (
    Stage("category_combos", None,
          "2..12 Objects365 categories per sample; the LLM keeps a compatible subset and names the scene",
          ("llm",), _category_combos,
          (Check("categories_valid", "known candidates in range, >= min_categories distinct kept",
                 _categories_valid),),
          table=("categories", "scene"), prepare=_categories),
    Stage("scene_captions", "category_combos", "the LLM writes one caption naming every kept category",
          ("llm",), _scene_captions,
          (Check("captions_mention_categories", "every caption contains every kept category",
                 _captions_mention_categories),),
          table=("caption",)),
    Stage("target_images", "scene_captions", "the T2I model renders each caption",
          ("t2i",), _target_images,
          (Check("images_have_size", "every target image exists at the profile's resolution", _images_have_size),),
          table=("caption",)),
    Stage("detected_boxes", "target_images",
          "GroundingDINO, best box per category, boxes under 0.01 of the image dropped",
          ("detector",), _detected_boxes,
          (Check("box_area_filter", "every box inside the image, area >= min_box_area, one per category, "
                                    ">= min_subjects per sample", _box_area_filter),)),
    Stage("verified_boxes", "detected_boxes", "the VLM answers yes/no for each box; rejected subjects dropped",
          ("vlm",), _verified_boxes,
          (Check("verified_above_threshold", "a subject is kept iff the VLM's P(yes) exceeds verify_threshold",
                 _verified_above_threshold),)),
    Stage("reference_subjects", "verified_boxes",
          "each verified box cropped and re-rendered by the I2I model (new viewpoint or appearance)",
          ("i2i",), _reference_subjects,
          (Check("references_not_copies",
                 "every verified subject has a reference, and it is not a copy of its crop",
                 _references_not_copies),)),
    Stage("subject_masks", "reference_subjects",
          "SAM2 masks from boxes; the mask is the region when CLIP prefers it to the box",
          ("segmenter", "clip"), _subject_masks,
          (Check("regions_valid", "every subject has a region; mask iff Sim_mask > Sim_unmask", _regions_valid),)),
    Stage("grid_layouts", "subject_masks", "8x8 semantic layout: IoU with each patch above lambda x mean IoU",
          (), _grid_layouts,
          (Check("every_subject_owns_a_cell", "every subject owns at least one cell of the grid",
                 _every_subject_owns_a_cell),),
          table=("layout_text",)),
    Stage("cot_annotations", "grid_layouts",
          "the VLM writes the user instruction and the visual CoT, subjects by tag [i]",
          ("vlm",), _cot_annotations,
          (Check("annotation_tags_valid", "the instruction tags every subject; every tag names one; "
                                         "the CoT holds at most cot_words_per_subject words per subject",
                 _annotation_tags_valid),),
          table=("instruction", "cot")),
    Stage("training_samples", "cot_annotations",
          "subject-count decimation down to min_subjects; MSIC hold-out shards down to 1",
          (), _training_samples,
          (Check("decimation_consistent",
                 "counts N..floor per source; ids consistent in subjects, texts and layout",
                 _decimation_consistent),),
          table=("split", "num_subjects", "instruction", "layout_text"), note=_split_note),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
# Every model role a stage loads, in the order the graph first needs it.
STAGE_ROLES: tuple[str, ...] = tuple(dict.fromkeys(r for s in STAGES for r in s.roles))


def stage(name: str) -> Stage:
    """The row of stage `name`."""
    for row in STAGES:
        if row.name == name:
            return row
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------------------------
# What shaped a shard's bytes, as one hash: the data assets record it in each shard's materialization metadata
# (`data_fingerprint`), and `music pipeline` re-runs a published shard only when it differs from the current one.
FINGERPRINT_EXCLUDED = frozenset({"num_shards"})  # more shards are more keys: existing shards keep their data


def data_fingerprint(config) -> str:
    """sha256 of what the config gives the data graph, as sorted JSON: the config's seed, the profile's `data`
    section but `num_shards`, the model specs (id, subfolder, revision, trust_remote_code) of the roles the stages
    load (`STAGE_ROLES`), the profile's `dtype` and `torch_threads` (float results change with them), and the
    sha256 of the Objects365 category file (`paths.objects365`, read by `category_combos`; None while missing).

    Not covered, so not noticed: the code (the stages, the libraries installed: transformers, diffusers, torch), the
    weights behind an unchanged model spec (a rebuilt tiny zoo, a Hub id without a pinned revision), the device a
    stage runs on, and a published shard changed by hand. After any of those, `music pipeline --force` re-runs every
    shard (`music stage data`, what `dvc repro` runs when a dependency changed, code included, always does)."""
    import hashlib
    import json

    from music_dagster.storage import file_sha256

    categories = config.paths.resolve("objects365")
    profile = config.profile
    covered = {
        "seed": config.seed,
        "data": profile.data.model_dump(mode="json", exclude=set(FINGERPRINT_EXCLUDED)),
        "models": {role: config.models[role].model_dump(mode="json") for role in STAGE_ROLES},
        "dtype": profile.dtype,
        "torch_threads": profile.torch_threads,
        "objects365": file_sha256(categories) if categories.is_file() else None,
    }
    return hashlib.sha256(json.dumps(covered, sort_keys=True).encode("utf-8")).hexdigest()
