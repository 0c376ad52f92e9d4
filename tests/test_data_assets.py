"""The data asset graph in Dagster: definitions (the stage table's rows, dvc.yaml's data stage), shard registration,
bad input, a killed materialization, and the whole graph for 2 shards on the tiny profile (byte-identical when
re-materialized)."""
import ast
import hashlib
import os
import textwrap
from pathlib import Path

import dagster as dg
import pytest
import yaml

from music_dagster.assets import data
from music_dagster.config import PROJECT_ROOT
from music_dagster.resources import ProjectConfig
from music_dagster.resources.storage import DatasetStore
from music_dagster.synthesis import SynthesisError
from music_dagster.synthesis.stages import STAGE_NAMES, STAGES
from processes import kill_when_ready

MODEL_HEAVY = {"category_combos", "scene_captions", "target_images", "detected_boxes", "verified_boxes",
               "reference_subjects", "subject_masks", "cot_annotations"}
NAMES = list(STAGE_NAMES)
TINY = ProjectConfig(profile="tiny")


def _resources(root: Path, roles=None, project: ProjectConfig = TINY) -> dict:
    from music_dagster.resources.models import model_resources

    models = model_resources(project.get())
    return {**{r: m for r, m in models.items() if roles is None or r in roles}, "project": project,
            "store": DatasetStore(root=str(root))}


def _instance(n: int = 1) -> dg.DagsterInstance:
    instance = dg.DagsterInstance.ephemeral()
    data.ensure_shards(instance, n)
    return instance


@pytest.fixture
def params(tmp_path, make_project):
    """A modified copy of params.yaml (tiny profile; `objects365` replaces its path, the rest its `data`): the
    `project` resource that reads it."""
    def write(**data_overrides) -> ProjectConfig:
        paths = {"objects365": data_overrides.pop("objects365")} if "objects365" in data_overrides else {}
        return make_project(tmp_path, paths=paths, data=data_overrides)

    return write


def _failure(result) -> str:
    """The message of the user's error that failed the step (Dagster wraps it)."""
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failures[0].step_failure_data.error
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def test_definitions_hold_the_data_graph():
    from music_dagster.definitions import defs

    job = defs.resolve_job_def("data_job")
    assert job.partitions_def == data.SHARDS
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).group_name == "data"}
    assert keys == set(NAMES)
    for asset in data.DATA_ASSETS:
        name = asset.key.to_user_string()
        assert asset.partitions_def == data.SHARDS
        assert (asset.op.pool == "gpu") == (name in MODEL_HEAVY), name
        assert asset.check_specs, name
    parents = {a.key.to_user_string(): {k.to_user_string() for k in a.dependency_keys} for a in data.DATA_ASSETS}
    assert all(parents[child] == {parent} for parent, child in zip(NAMES, NAMES[1:]))


def test_the_assets_are_the_rows_of_the_stage_table():
    """One asset per row, in order: a chain from the first row, with the row's description, checks (blocking) and
    the partitioned `shard_published` check, models (as resources; a stage with a model in the `gpu` pool) and the
    config through `project`."""
    from music_dagster.synthesis.schemas import RECORDS

    assert [s.parent for s in STAGES] == [None, *NAMES[:-1]] and len(set(NAMES)) == len(NAMES)
    assert data.DATA_ASSET_NAMES == NAMES and set(RECORDS) == set(NAMES)  # every stage has its record schema
    for stage, asset in zip(STAGES, data.DATA_ASSETS, strict=True):
        assert asset.key.to_user_string() == stage.name
        assert asset.descriptions_by_key[asset.key] == stage.description
        assert [(c.name, c.description, c.blocking, c.partitions_def) for c in asset.check_specs] == [
            *((c.name, c.description, True, None) for c in stage.checks),
            (data.PUBLISHED_CHECK, data.PUBLISHED_DESCRIPTION, False, data.SHARDS)]
        assert asset.required_resource_keys >= {"project", "store", *stage.roles}
        assert (asset.op.pool == "gpu") == stage.gpu == bool(stage.roles)


def _imported_modules(roots: tuple[str, ...], follow_not: set[str]) -> set[str]:
    """Every `music_dagster` module that `roots` may import, directly or through the modules it imports (imports
    inside functions too); a package's `__init__` is followed for its top-level imports only (what importing one of
    its modules runs). The modules of `follow_not` are left out, with what only they import."""
    import ast

    def path_of(name: str) -> Path | None:
        base = PROJECT_ROOT.joinpath(*name.split("."))
        return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)

    def imports(name: str, top_level_only: bool) -> set[str]:
        tree = ast.parse(path_of(name).read_text())
        found = set()
        for node in (tree.body if top_level_only else ast.walk(tree)):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names
                                          if path_of(f"{node.module}.{a.name}")}
        return {m for m in found if m.split(".")[0] == "music_dagster" and path_of(m)}

    seen: dict[str, bool] = {}  # module -> followed only for its top-level imports
    todo = [(root, False) for root in roots]
    while todo:
        name, top_only = todo.pop()
        if name in follow_not or (name in seen and (top_only or not seen[name])):
            continue  # left out, or already followed as far
        seen[name] = top_only
        parts = name.split(".")
        todo += [(".".join(parts[:i]), True) for i in range(1, len(parts))]  # its packages' __init__ run first
        todo += [(m, False) for m in imports(name, top_only)]
    return set(seen)


def test_dvc_yaml_data_stage_is_the_stage_table():
    """dvc.yaml's data stage writes one folder per row of the table, and its code deps are exactly the code the stage
    imports (`assets/data.py`, the model resources its rows load, and all they import; a package `__init__` that is
    only a docstring does not count), so `dvc repro` re-runs the data stage when that code changes.
    `tracking/dvc.py`, which records the stage's outputs in dvc.lock once they are written and shapes none of their
    bytes, is not a dependency (nor what only it imports)."""
    stage = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["data"]
    assert stage["outs"] == [f"datasets/{name}" for name in NAMES]
    modules = _imported_modules(("music_dagster.assets.data", "music_dagster.resources.models"),
                                follow_not={"music_dagster.tracking.dvc"})
    files = {PROJECT_ROOT.joinpath(*m.split(".")).with_suffix(".py") for m in modules}
    files = {f if f.is_file() else f.with_suffix("") / "__init__.py" for f in files}
    code = {f.relative_to(PROJECT_ROOT).as_posix() for f in files
            if f.name != "__init__.py" or any(not isinstance(n, ast.Expr) for n in ast.parse(f.read_text()).body)}
    listed = set()
    for dep in (d for d in stage["deps"] if d.startswith("music_dagster/")):
        path = PROJECT_ROOT / dep
        assert path.exists(), dep
        listed |= ({p.relative_to(PROJECT_ROOT).as_posix() for p in path.rglob("*.py")} if path.is_dir() else {dep})
    assert sorted(code - listed) == [], "imported by the data stage, missing from its dvc.yaml deps"
    assert sorted(listed - code) == [], "in the data stage's dvc.yaml deps, not imported by it"


def test_ensure_shards_adds_missing_keys_only():
    instance = dg.DagsterInstance.ephemeral()
    assert data.ensure_shards(instance, 2) == ["shard-00000", "shard-00001"]
    instance.add_dynamic_partitions("shards", ["manual"])
    assert data.ensure_shards(instance, 3) == ["shard-00000", "shard-00001", "shard-00002"]
    assert sorted(instance.get_dynamic_partitions("shards")) == ["manual", "shard-00000", "shard-00001",
                                                                 "shard-00002"]
    with pytest.raises(SynthesisError):
        data.ensure_shards(instance, 0)


@pytest.mark.parametrize("override, message", [
    ({"objects365": "/nonexistent/objects365.json"}, "does not exist"),
    ({"categories": []}, "data.categories is empty"),
    ({"categories": ["Couch", "Unicorn"]}, "unknown Objects365 category 'Unicorn'"),
])
def test_bad_category_input_fails_in_one_line_without_a_shard(tmp_path, params, override, message):
    resources = _resources(tmp_path / "datasets", ["llm"], params(**override))
    result = dg.materialize([data.DATA_ASSETS_BY_NAME["category_combos"]], partition_key="shard-00000",
                            instance=_instance(), resources=resources, raise_on_error=False)
    assert not result.success
    error = _failure(result)
    assert message in error and "\n" not in error
    assert not (tmp_path / "datasets" / "category_combos").exists()


def test_unreadable_image_in_a_shard_fails_in_one_line(tmp_path, tiny_zoo):
    from PIL import Image

    from music_dagster.synthesis.schemas import RECORDS

    store = DatasetStore(root=str(tmp_path / "datasets"))
    record = {"sample_id": "shard-00000-00000", "parent_ids": ["shard-00000-00000"], "shard": "shard-00000",
              "candidates": ["Cat", "Couch"], "categories": ["Cat", "Couch"], "scene": "a room",
              "combo_attempts": 1, "caption": "A cat on a couch.", "caption_attempts": 1,
              "image": "target_images/shard-00000/shard-00000-00000.png", "width": 64, "height": 64}
    with store.writer("target_images", "shard-00000", RECORDS["target_images"]) as writer:
        writer.add_image("shard-00000-00000.png", Image.new("RGB", (64, 64)))
        writer.add_record(record)
    (tmp_path / "datasets" / record["image"]).write_bytes(b"\x89PNG not really")
    result = dg.materialize([data.DATA_ASSETS_BY_NAME["detected_boxes"]], partition_key="shard-00000",
                            instance=_instance(), resources=_resources(tmp_path / "datasets", ["detector"]),
                            raise_on_error=False)
    error = _failure(result)
    assert "shard-00000-00000.png" in error and "\n" not in error
    assert not (tmp_path / "datasets" / "detected_boxes").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_an_image_path_leaving_the_datasets_root_fails_naming_the_manifest_line(tmp_path, tiny_zoo, kind):
    from PIL import Image

    from music_dagster.synthesis.schemas import RECORDS

    root = tmp_path / "datasets"
    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64)).save(outside)
    store = DatasetStore(root=str(root))
    refs = {"dotdot": "../outside.png", "absolute": str(outside), "symlink": "target_images/shard-00000/link.png"}
    records = [{"sample_id": f"shard-00000-0000{i}", "parent_ids": [f"shard-00000-0000{i}"], "shard": "shard-00000",
                "candidates": ["Cat", "Couch"], "categories": ["Cat", "Couch"], "scene": "a room",
                "combo_attempts": 1, "caption": "A cat on a couch.", "caption_attempts": 1,
                "image": ref, "width": 64, "height": 64}
               for i, ref in enumerate(["target_images/shard-00000/shard-00000-00000.png", refs[kind]])]
    with store.writer("target_images", "shard-00000", RECORDS["target_images"]) as writer:
        writer.add_image("shard-00000-00000.png", Image.new("RGB", (64, 64)))
        for record in records:
            writer.add_record(record)
    (root / "target_images" / "shard-00000" / "link.png").symlink_to(outside)
    result = dg.materialize([data.DATA_ASSETS_BY_NAME["detected_boxes"]], partition_key="shard-00000",
                            instance=_instance(), resources=_resources(root, ["detector"]), raise_on_error=False)
    error = _failure(result)
    manifest = root / "target_images" / "shard-00000" / "manifest.jsonl"
    assert f"{manifest}: line 2: path {refs[kind]!r}" in error and "\n" not in error
    assert not (root / "detected_boxes").exists()


KILLED_CHILD = """
import sys, time
from pathlib import Path
import dagster as dg
from music_dagster import storage
from music_dagster.assets import data
from music_dagster.resources import ProjectConfig
from music_dagster.resources.models import LLMResource
from music_dagster.resources.storage import DatasetStore

root, marker = sys.argv[1], Path(sys.argv[2])
add_record = storage.ShardWriter.add_record

def add_and_hang(self, record):  # the shard is half written: signal the parent and wait to be killed
    add_record(self, record)
    marker.touch()
    time.sleep(600)

storage.ShardWriter.add_record = add_and_hang
instance = dg.DagsterInstance.ephemeral()
data.ensure_shards(instance, 1)
project = ProjectConfig(profile="tiny")
dg.materialize([data.DATA_ASSETS_BY_NAME["category_combos"]], partition_key="shard-00000", instance=instance,
               resources={"llm": LLMResource.from_config(project.get()), "project": project,
                          "store": DatasetStore(root=root)})
"""


def test_killed_materialization_leaves_no_partial_shard(tmp_path, tiny_zoo):
    root = tmp_path / "datasets"
    marker = tmp_path / "half-written"
    env = {**os.environ, "MUSIC_PROFILE": "tiny", "OMP_NUM_THREADS": "1"}
    kill_when_ready(textwrap.dedent(KILLED_CHILD), [str(root), str(marker)], marker, timeout_s=300, env=env,
                    quiet=True)
    store = DatasetStore(root=str(root))
    leftovers = [p.name for p in (root / "category_combos").iterdir()]
    assert not store.exists("category_combos", "shard-00000")
    assert store.complete_shards("category_combos") == []
    assert leftovers and all(name.startswith(".shard-00000.tmp.") for name in leftovers)

    result = dg.materialize([data.DATA_ASSETS_BY_NAME["category_combos"]], partition_key="shard-00000",
                            instance=_instance(), resources=_resources(root, ["llm"]))
    assert result.success and store.exists("category_combos", "shard-00000")
    assert [p.name for p in (root / "category_combos").iterdir()] == ["shard-00000"]  # the leftover is gone
    assert len(store.read("category_combos", "shard-00000").records) == TINY.get().profile.data.shard_size


def _file_hashes(root: Path, key: str) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob(f"*/{key}/**/*")) if p.is_file()}


@pytest.mark.slow
def test_data_graph_materializes_two_shards_reproducibly(tmp_path, tiny_zoo):
    root = tmp_path / "datasets"
    resources = _resources(root)
    instance = dg.DagsterInstance.ephemeral()
    keys = data.ensure_shards(instance, 2)
    job = dg.Definitions(assets=data.DATA_ASSETS, jobs=[data.data_job], resources=resources).resolve_job_def(
        "data_job")
    splits = set()
    for key in keys:
        result = job.execute_in_process(partition_key=key, instance=instance)
        assert result.success
        evaluations = result.get_asset_check_evaluations()
        assert len(evaluations) == 2 * len(NAMES)  # each row's check, and shard_published on this shard
        assert all(e.passed for e in evaluations), [(e.check_name, e.metadata) for e in evaluations if not e.passed]
        assert {e.asset_key.to_user_string(): e.partition for e in evaluations
                if e.check_name == data.PUBLISHED_CHECK} == dict.fromkeys(NAMES, key)
        materialized = {e.asset_key.to_user_string(): e.materialization.metadata
                        for e in result.get_asset_materialization_events()}
        assert set(materialized) == set(NAMES)
        for name, metadata in materialized.items():
            assert metadata["kept"].value > 0, f"{name}[{key}] kept nothing: {metadata['drop_reasons'].value}"
            assert (root / name / key / "dropped.json").is_file()
        assert "data:image/png;base64," in materialized["grid_layouts"]["preview"].value
        assert materialized["detected_boxes"]["samples_per_subject_count"].value
        records = DatasetStore(root=str(root)).read("training_samples", key).records
        splits |= {r["split"] for r in records}
        assert all(Path(root / r["image"]).is_file() and all((root / s["reference"]).is_file()
                                                                for s in r["subjects"]) for r in records)
    assert splits == {"train", "msic"}

    before = _file_hashes(root, keys[0])
    assert len(before) > 40
    assert job.execute_in_process(partition_key=keys[0], instance=instance).success
    assert _file_hashes(root, keys[0]) == before


def _range_run(job, instance, keys: list[str]):
    return job.execute_in_process(instance=instance, tags=data.partition_range(keys[0], keys[-1]))


@pytest.mark.slow
def test_a_range_run_writes_the_bytes_of_one_shard_runs_and_loads_each_model_once(tmp_path, tiny_zoo,
                                                                                    monkeypatch):
    from music_dagster.resources import models
    from music_dagster.resources.models import ModelResource
    from music_dagster.zoo import loaders
    loads, held = [], []  # the roles loaded; ("load"|"unload", role) in the order the run held and freed them
    real_load, real_unload = loaders.load_role, ModelResource.unload

    def load(role, *a):
        loads.append(role)
        held.append(("load", role))
        return real_load(role, *a)

    def unload(resource):
        cached = len(models._CACHE)
        real_unload(resource)
        if len(models._CACHE) < cached:
            held.append(("unload", resource.role))

    monkeypatch.setattr(loaders, "load_role", load)
    monkeypatch.setattr(ModelResource, "unload", unload)
    instance = _instance(2)
    keys = ["shard-00000", "shard-00001"]
    roots = {"one": tmp_path / "one", "range": tmp_path / "range"}
    jobs = {name: dg.Definitions(assets=data.DATA_ASSETS, jobs=[data.data_job], resources=_resources(root))
            .resolve_job_def("data_job") for name, root in roots.items()}
    for key in keys:
        assert jobs["one"].execute_in_process(partition_key=key, instance=instance).success
    loads.clear()
    held.clear()
    result = _range_run(jobs["range"], instance, keys)
    assert result.success
    heavy_roles = {"llm", "t2i", "detector", "vlm", "i2i", "segmenter", "clip"}
    assert sorted(loads) == sorted(heavy_roles)  # one load per model for the whole run, both shards
    # Each model is freed after the last stage that loads it: only the VLM (box verification, then the CoT) is
    # held across other stages, so at most the I2I model, or the segmenter and CLIP, sit beside it.
    assert held == [("load", "llm"), ("unload", "llm"), ("load", "t2i"), ("unload", "t2i"),
                    ("load", "detector"), ("unload", "detector"), ("load", "vlm"), ("load", "i2i"),
                    ("unload", "i2i"), ("load", "segmenter"), ("load", "clip"), ("unload", "segmenter"),
                    ("unload", "clip"), ("unload", "vlm")]
    for key in keys:
        one = _file_hashes(roots["one"], key)
        assert len(one) > 40 and _file_hashes(roots["range"], key) == one
    # Every shard stays its own partition: one materialization per shard and asset, with the shard's own hash.
    events = result.get_asset_materialization_events()
    assert sorted((e.asset_key.to_user_string(), e.partition) for e in events) == sorted(
        (name, key) for name in NAMES for key in keys)
    assert len({e.materialization.metadata["shard_sha256"].value for e in events}) == len(events)
    # A model-heavy step records the device it leased (one of the profile's `devices`: cpu here) and its slot.
    for event in events:
        metadata = event.materialization.metadata
        if event.asset_key.to_user_string() in MODEL_HEAVY:
            assert (metadata["device"].value, metadata["device_slot"].value) == ("cpu", 0)
        else:
            assert "device" not in metadata


@pytest.mark.slow
def test_a_shard_failing_inside_a_range_run_fails_alone(tmp_path, tiny_zoo, fail_captions):
    from music_dagster.pipeline import failed_shard_reasons

    fail_captions("shard-00001")
    root = tmp_path / "datasets"
    store = DatasetStore(root=str(root))
    instance = _instance(3)
    keys = ["shard-00000", "shard-00001", "shard-00002"]
    job = dg.Definitions(assets=data.DATA_ASSETS, jobs=[data.data_job], resources=_resources(root)).resolve_job_def(
        "data_job")
    result = _range_run(job, instance, keys)
    assert result.success
    assert [k for k in keys if store.exists("training_samples", k)] == ["shard-00000", "shard-00002"]
    assert store.exists("category_combos", "shard-00001")  # the stages before the failure published it
    assert not any((root / name / "shard-00001").exists() for name in NAMES[1:])
    # Each shard's shard_published verdict: failed, with the reason, for shard-00001 from scene_captions on.
    verdicts = {(e.asset_key.to_user_string(), e.partition): e for e in result.get_asset_check_evaluations()
                if e.check_name == data.PUBLISHED_CHECK}
    assert sorted(verdicts) == sorted((name, k) for name in NAMES for k in keys)
    reasons = {k: v.metadata["reason"].value for k, v in verdicts.items() if not v.passed}
    assert set(reasons) == {(name, "shard-00001") for name in NAMES[1:]}
    assert reasons[("scene_captions", "shard-00001")] == "the LLM wrote no caption (injected)"
    assert reasons[("target_images", "shard-00001")].endswith("scene_captions/shard-00001: no such shard")
    # What the UI shows: the check's partition statuses (AssetCheckState) are red for the failed shard, green for the
    # others, each verdict on its shard's materialization of this run.
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionResolvedStatus as Status

    check_keys = [dg.AssetCheckKey(dg.AssetKey(name), data.PUBLISHED_CHECK) for name in NAMES]
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        states = instance.event_log_storage.get_asset_check_state([(k, data.SHARDS) for k in check_keys])
        statuses = {k.asset_key.to_user_string(): {s: set(states[k].subsets[s].subset_value.get_partition_keys())
                                                   for s in (Status.SUCCEEDED, Status.FAILED)} for k in check_keys}
    assert statuses["category_combos"] == {Status.SUCCEEDED: set(keys), Status.FAILED: set()}
    assert all(statuses[name] == {Status.SUCCEEDED: {"shard-00000", "shard-00002"}, Status.FAILED: {"shard-00001"}}
               for name in NAMES[1:])
    assert failed_shard_reasons(instance, ["shard-00001"]) == {
        "shard-00001": "scene_captions: the LLM wrote no caption (injected)"}  # what `music pipeline` prints

    # Every shard failing is the step failing, in one line, as a one-shard run does.
    only = job.execute_in_process(instance=instance, tags=data.partition_range("shard-00001", "shard-00001"),
                                  asset_selection=[dg.AssetKey("scene_captions")], raise_on_error=False)
    assert not only.success and _failure(only).endswith("SynthesisError: the LLM wrote no caption (injected)")
    verdict = data.published_verdict(instance, "scene_captions", "shard-00001")  # `music pipeline` runs it again
    assert (verdict.run_id, verdict.evaluation.passed) == (only.run_id, False)
