"""The `detokenizer` and `lora_checkpoint` assets with `dg.materialize` on a tiny budget: what they write, what the
MLflow run holds, MSIC hold-out never trained on, a re-run resuming from the last checkpoint, a backbone
resource swapped in one line taking effect, and the devices a training holds (one per process on this machine)."""
import json

import dagster as dg
import pytest
import yaml

from music_dagster.assets import training as assets
from music_dagster.model.runtime import detokenizer_dir, lora_dir
from music_dagster.resources import build_resources
from music_dagster.resources.tracking import MlflowTracking
from music_dagster.tracking import runs as tracking
from music_dagster.tracking.dvc import dvc_md5

TRAIN_SHARD, MSIC_SHARD = "shard-000", "shard-001"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_zoo, make_project):
    """Params (source: both, 3 steps, a checkpoint every 2, every output under the test's folder), two shards
    (one MSIC), and the project's resources (MLflow sampling system metrics every 0.5 s)."""
    import torch

    from music_dagster.model.procedural import WorldSettings, write_procedural_shard

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("training_assets")
    project = make_project(
        root, outputs=True, paths={"mlflow_artifacts": root / "artifacts"},
        train=dict(source="both", procedural_samples=6, max_steps=3, checkpoint_every=2, batch_size=4,
                   max_plan_tokens=16),
        detokenizer=dict(max_steps=2, batch_size=4, decode_steps=2),
        generate=dict(logged_samples=1, logged_branches=2, max_plan_tokens=16))
    datasets = root / "datasets" / assets.SAMPLES_ASSET
    write_procedural_shard(datasets / TRAIN_SHARD, 4, seed=7, world=WorldSettings(max_subjects=3))
    write_procedural_shard(datasets / MSIC_SHARD, 3, seed=8, split="msic")
    resources = build_resources(project)
    resources["tracking"] = MlflowTracking(tracking_uri=resources["tracking"].tracking_uri,
                                           artifact_root=resources["tracking"].artifact_root,
                                           system_metrics_interval_s=0.5)
    return {"root": root, "project": project, "config": project.get(), "resources": resources}


def _materialize(setup, selection=None):
    return dg.materialize([assets.detokenizer, assets.lora_checkpoint, assets.lora_weights_finite,
                           assets.detokenizer_weights_finite], resources=setup["resources"], selection=selection)


@pytest.fixture(scope="module")
def first(setup):
    result = _materialize(setup)
    assert result.success
    return result


@pytest.mark.slow
def test_assets_write_checkpoints_and_pass_checks(setup, first):
    config = setup["config"]
    lora, detok = lora_dir(config), detokenizer_dir(config)
    for name in ("adapter_config.json", "adapter_model.safetensors", "music_modules.safetensors",
                 "music_config.json", tracking.RUN_REF, assets.HISTORY_FILE):
        assert (lora / name).is_file(), name
    assert (detok / "unet" / "config.json").is_file() and (detok / tracking.RUN_REF).is_file()
    checks = {e.asset_check_key.name: e.passed for e in first.get_asset_check_evaluations()}
    assert checks == {"lora_weights_finite": True, "detokenizer_weights_finite": True}
    meta = first.asset_materializations_for_node("lora_checkpoint")[0].metadata
    assert meta["steps"].value == 3 and meta["resumed_from"].value == 0
    # 4 training-shard samples + 6 procedural world samples with their decimations down to 2 subjects (15);
    # the 3 MSIC samples are counted and skipped
    assert meta["samples"].value == 19 and meta["skipped_msic"].value == 3
    # the de-tokenizer trains on each distinct target image once: the 4 shard images and the 6 world images
    assert first.asset_materializations_for_node("detokenizer")[0].metadata["samples"].value == 10
    assert meta["dvc_md5"].value == dvc_md5(lora)  # the checkpoint's one content hash
    assert meta["mlflow_run_id"].value == tracking.read_run_ref(lora)["run_id"]
    assert meta["mlflow_url"].value.endswith(f"/runs/{meta['mlflow_run_id'].value}")
    assert all(meta[k].value > 0 for k in ("final_L1", "final_L2", "final_loss"))
    # One process each: it held one device of the profile's `devices` (auto: [cpu] here) and trained there.
    for name in ("detokenizer", "lora_checkpoint"):
        meta = first.asset_materializations_for_node(name)[0].metadata
        assert (meta["device"].value, meta["device_slot"].value) == ("cpu", 0), name


@pytest.mark.slow
def test_adapter_loads_with_peft(setup, first):
    import torch
    from peft import PeftModel

    from music_dagster.model.runtime import load_model

    base = load_model(setup["config"], "music_llm").model
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, str(lora_dir(setup["config"])))
        adapted = peft(input_ids=ids).logits
    assert torch.isfinite(adapted).all()
    assert not torch.allclose(adapted, plain)  # the trained adapter is applied


@pytest.mark.slow
def test_mlflow_run_holds_params_metrics_artifacts_tags(setup, first):
    config = setup["config"]
    store = setup["resources"]["tracking"].store
    mlf = tracking.client(store)
    run = mlf.get_run(tracking.read_run_ref(lora_dir(config))["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params == tracking.config_params(config)
    assert run.data.params["profile.train.source"] == "both"
    for name in ("L1", "L2", "loss", "lr"):
        assert [m.step for m in mlf.get_metric_history(run.info.run_id, name)] == [1, 2, 3], name
    assert any(k.startswith("system/") for k in run.data.metrics)
    tags = run.data.tags
    assert tags[tracking.TAG_DAGSTER_RUN] == first.run_id
    assert tags[tracking.TAG_PARTITIONS] == f"{TRAIN_SHARD},{MSIC_SHARD}"  # every shard read (MSIC records skipped)
    sources, _, version = assets.select_sources(config, setup["root"] / "datasets" / assets.SAMPLES_ASSET)
    assert tags[tracking.TAG_DATA_VERSION] == version
    assert tags[tracking.TAG_DVC_HASH] == dvc_md5(lora_dir(config))
    assert tags[tracking.TAG_MODEL] == "lora" and tracking.TAG_GIT_COMMIT in tags

    def listing(path):
        return sorted(a.path for a in mlf.list_artifacts(run.info.run_id, path))

    assert "adapter/adapter_model.safetensors" in listing("adapter")
    sample = listing("samples/sample_0")
    assert sample == [f"samples/sample_0/{n}" for n in ("image.png", "layout.png", "plan.json", "target_layout.png")]
    local = mlf.download_artifacts(run.info.run_id, "samples/sample_0/plan.json", str(setup["root"]))
    plan = json.loads(open(local).read())
    assert plan["num_branches"] == 2
    detok_run = mlf.get_run(tracking.read_run_ref(detokenizer_dir(config))["run_id"])
    assert detok_run.data.tags[tracking.TAG_MODEL] == "detokenizer"
    assert [m.step for m in mlf.get_metric_history(detok_run.info.run_id, "loss")] == [1, 2]


@pytest.mark.slow
def test_rerun_resumes_from_last_checkpoint_with_same_result(setup, first):
    config = setup["config"]
    before = first.asset_materializations_for_node("lora_checkpoint")[0].metadata
    history = json.loads((lora_dir(config) / assets.HISTORY_FILE).read_text())
    again = _materialize(setup, selection=[assets.lora_checkpoint, assets.lora_weights_finite])
    assert again.success
    meta = again.asset_materializations_for_node("lora_checkpoint")[0].metadata
    assert meta["resumed_from"].value == 3 and meta["steps"].value == 3
    assert json.loads((lora_dir(config) / assets.HISTORY_FILE).read_text()) == history
    assert meta["dvc_md5"].value == before["dvc_md5"].value
    mlf = tracking.client(setup["resources"]["tracking"].store)
    run_id = meta["mlflow_run_id"].value
    assert run_id != before["mlflow_run_id"].value
    assert sorted(m.step for m in mlf.get_metric_history(run_id, "L1")) == [1, 2, 3]  # resumed steps logged too
    assert mlf.get_run(run_id).data.tags["resumed_from"] == "3"


@pytest.mark.slow
def test_two_runs_with_different_params_compare_in_one_experiment(setup, first):
    """A second training with another learning rate: a fresh run (not a resume) in the same experiment, with the
    same metrics, and `music runs` lists both with their learning rates and checkpoint hashes."""
    params = setup["root"] / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)
    raw["profiles"]["tiny"]["train"]["lr"] = 3e-3
    params.write_text(yaml.safe_dump(raw))
    try:
        second = _materialize(setup, selection=[assets.lora_checkpoint])
    finally:
        params.write_text(original)
    assert second.success
    meta = second.asset_materializations_for_node("lora_checkpoint")[0].metadata
    assert meta["resumed_from"].value == 0 and meta["steps"].value == 3  # another config: trained afresh
    before = first.asset_materializations_for_node("lora_checkpoint")[0].metadata
    mlf = tracking.client(setup["resources"]["tracking"].store)
    runs = [mlf.get_run(m["mlflow_run_id"].value) for m in (before, meta)]
    assert runs[0].info.experiment_id == runs[1].info.experiment_id
    changed = {k for k in runs[0].data.params if runs[0].data.params[k] != runs[1].data.params.get(k)}
    assert changed == {"profile.train.lr"}
    for name in ("L1", "L2", "loss", "lr"):
        steps = [[m.step for m in mlf.get_metric_history(r.info.run_id, name)] for r in runs]
        assert steps == [[1, 2, 3], [1, 2, 3]], name
    listed = {r["run_id"]: r for r in tracking.list_runs(setup["resources"]["tracking"].store, limit=10)}
    assert listed[runs[0].info.run_id]["params"]["lr"] != listed[runs[1].info.run_id]["params"]["lr"]
    assert listed[runs[1].info.run_id]["checkpoint"] != listed[runs[0].info.run_id]["checkpoint"]


@pytest.mark.slow
def test_a_backbone_resource_swapped_in_one_line_is_what_trains(tmp_path, tiny_zoo, make_project):
    """`music_unet` pointing at another folder (the tiny UNet with another `norm_eps`): the published
    de-tokenizer's UNet is that one, and the MLflow run and the resumable state name it."""
    import shutil

    from music_dagster.resources.models import MusicUNetResource

    other = tmp_path / "other_unet"
    shutil.copytree(tiny_zoo["music_unet"], other)
    unet_config = json.loads((other / "config.json").read_text())
    unet_config["norm_eps"] = 2e-5
    (other / "config.json").write_text(json.dumps(unet_config))
    project = make_project(tmp_path / "project", outputs=True, train={"source": "procedural", "procedural_samples": 4},
                           detokenizer={"max_steps": 1, "batch_size": 4})
    result = dg.materialize([assets.detokenizer], resources={
        **build_resources(project), "music_unet": MusicUNetResource(checkpoint=str(other))})
    assert result.success
    published = json.loads((detokenizer_dir(project.get()) / "unet" / "config.json").read_text())
    assert published["norm_eps"] == 2e-5  # the zoo's UNet has 1e-5
    run = tracking.client(tracking.store_from_config(project.get())).get_run(
        tracking.read_run_ref(detokenizer_dir(project.get()))["run_id"])
    assert run.data.params["profile.models.music_unet.id"] == str(other)


def _devices_project(make_project, root, devices, num_processes):
    """A procedural-source project on `devices` (waiting at most 0.5 s for them), the de-tokenizer trained over
    `num_processes`."""
    project = make_project(root, outputs=True, train={"source": "procedural", "procedural_samples": 4},
                           detokenizer={"num_processes": num_processes})
    raw = yaml.safe_load(open(project.params).read())
    raw["profiles"]["tiny"].update(devices=devices, pool_wait_s=0.5)
    open(project.params, "w").write(yaml.safe_dump(raw))
    return project


def _step_error(result) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error
    while failure.cause is not None:
        failure = failure.cause
    return failure.message.strip()


def test_a_launch_over_more_processes_than_devices_is_one_line(tmp_path, make_project):
    project = _devices_project(make_project, tmp_path, ["cpu"], num_processes=2)
    result = dg.materialize([assets.detokenizer], resources=build_resources(project), raise_on_error=False)
    assert not result.success
    assert _step_error(result).endswith("TrainingError: detokenizer.num_processes: 2 processes on this machine, but "
                                        "devices has 1 (cpu): one device per process")
    assert not detokenizer_dir(project.get()).exists()


def test_a_launch_waits_for_all_its_devices_before_training(tmp_path, make_project):
    """num_processes 2 on [cpu, cpu] while another step holds one of them: the training waits for both (the same
    locks as the data steps'), gives up after pool_wait_s in one line, and nothing was trained or published."""
    from music_dagster.zoo import devices

    project = _devices_project(make_project, tmp_path, ["cpu", "cpu"], num_processes=2)
    instance = dg.DagsterInstance.ephemeral()
    with devices.lease(instance.root_directory, ["cpu", "cpu"], wait_s=1):
        result = dg.materialize([assets.detokenizer], resources=build_resources(project), instance=instance,
                                raise_on_error=False)
    assert not result.success
    assert _step_error(result).startswith("music_dagster.zoo.devices.DeviceWaitError: no 2 devices of ['cpu', 'cpu'] "
                                          "came free in 0.5 s")
    assert not detokenizer_dir(project.get()).exists() and not (tmp_path / "work" / "training").exists()


def test_a_launch_on_several_machines_holds_this_machines_share(tmp_path):
    """With an accelerate config of 2 machines, 4 processes are 2 here: 2 devices to hold."""
    from music_dagster.config import load_config
    from music_dagster.training.entry import local_processes
    from music_dagster.training.train import TrainingError

    accelerate = tmp_path / "accelerate.yaml"
    accelerate.write_text("num_machines: 2\nnum_processes: 4\nmachine_rank: 0\n")
    config = load_config(profile="tiny").with_values("train", num_processes=4, accelerate_config=str(accelerate))
    assert local_processes(config, "lora") == 2 and local_processes(config, "detokenizer") == 1
    accelerate.write_text("num_machines: none\n")
    with pytest.raises(TrainingError, match="accelerate.yaml: expected an accelerate config with num_machines >= 1"):
        local_processes(config, "lora")
