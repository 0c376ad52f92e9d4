"""DVC: the project's dvc.yaml matches the code it runs, the DVC hash the project computes is DVC's own, a recorded
output comes back byte-identical in a second clone by `dvc pull`, and the default remote is shared by clones."""
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from music_dagster import pipeline

from music_dagster.config import PROJECT_ROOT
from music_dagster.tracking import dvc
from projects import git, in_clone, project_copy, run_in


def dvc_repo(root: Path, remote: Path) -> Path:
    """A git + DVC repo with the project's .dvcignore, one stage writing `models/lora`, a local remote."""
    root.mkdir()
    git(root, "init", "-q")
    dvc.run_dvc("init", "--quiet", root=root)
    dvc.run_dvc("remote", "add", "-d", "local", str(remote), root=root)
    shutil.copy(PROJECT_ROOT / ".dvcignore", root / ".dvcignore")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "true", "deps": ["data.txt"], "outs": ["models/lora"]}}}))
    (root / "data.txt").write_text("training data\n")
    lora = root / "models" / "lora"
    (lora / "resampler").mkdir(parents=True)
    (lora / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (lora / "resampler" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (lora / "history.json").write_text('[{"loss": 1.5, "step": 1}]\n')
    (lora / "mlflow_run.json").write_text('{"run_id": "differs every run"}\n')  # .dvcignore'd
    return root


def files(folder: Path, skip=("mlflow_run.json",)) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def test_recorded_output_is_dvcs_hash_and_a_second_clone_pulls_the_same_bytes(tmp_path):
    a = dvc_repo(tmp_path / "a", tmp_path / "remote")
    record = dvc.record_output("models/lora", root=a)
    assert (record.committed, record.pushed, record.stage) == (True, True, "train")
    assert record.md5.endswith(".dir")
    assert dvc.lock_hash("models/lora", root=a) == record.md5
    assert record.metadata()["dvc_pull"] == "dvc pull models/lora"
    assert record.path == "models/lora"
    assert record.tags()["dvc.md5"] == record.md5

    git(a, "add", "-A")
    git(a, "commit", "-q", "-m", "checkpoint")
    b = tmp_path / "b"
    git(tmp_path, "clone", "-q", str(a), str(b))
    assert not (b / "models" / "lora").exists()
    dvc.run_dvc("pull", "--quiet", "models/lora", root=b)
    assert files(b / "models" / "lora") == files(a / "models" / "lora")
    assert not (b / "models" / "lora" / "mlflow_run.json").exists()  # a run reference is not part of the checkpoint
    assert dvc.dvc_md5(b / "models" / "lora", root=b) == record.md5


def _tree(root: Path) -> dict[str, bytes]:
    """Every file of a repository but git's own, DVC's cache and DVC's lock files (`.dvc/tmp`, git-ignored)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.relative_to(root).as_posix().startswith((".git/", ".dvc/cache/", ".dvc/tmp/"))}


def _objects(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("push", [True, False])
def test_recording_changes_its_stage_in_dvc_lock_the_gitignore_and_the_caches_only(tmp_path, push):
    """What an asset's materialization changes in the repository (design: Versioning): the dvc.lock entry of the
    output's stage, the `.gitignore` beside the output (DVC's line for it), the DVC cache and, with `push`, the
    default remote. No other stage's lock entry, no tracked file, nothing staged or committed in git, not the
    output itself."""
    remote = tmp_path / "remote"
    a = dvc_repo(tmp_path / "a", remote)
    spec = yaml.safe_load((a / "dvc.yaml").read_text())
    spec["stages"]["prepare"] = {"cmd": "true", "deps": ["data.txt"], "outs": ["prepared.txt"]}
    (a / "dvc.yaml").write_text(yaml.safe_dump(spec))
    (a / "prepared.txt").write_text("prepared\n")
    assert dvc.record_output("prepared.txt", root=a).pushed  # another stage, recorded earlier
    git(a, "add", "dvc.yaml", "dvc.lock", "data.txt", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore")
    git(a, "commit", "-q", "-m", "before")
    head, before, lock_before = git(a, "rev-parse", "HEAD"), _tree(a), yaml.safe_load((a / "dvc.lock").read_text())
    remote_before = _objects(remote)

    record = dvc.record_output("models/lora", push=push, root=a)
    assert (record.committed, record.pushed) == (True, push)

    after = _tree(a)
    assert sorted(k for k in after if k in before and after[k] != before[k]) == ["dvc.lock"]
    assert sorted(k for k in after if k not in before) == ["models/.gitignore"]
    assert (a / "models" / ".gitignore").read_text() == "/lora\n" and set(before) <= set(after)
    lock = yaml.safe_load((a / "dvc.lock").read_text())
    assert lock["stages"]["prepare"] == lock_before["stages"]["prepare"] and set(lock["stages"]) == {"prepare", "train"}
    entry = lock["stages"]["train"]
    assert entry["cmd"] == "true" and [d["path"] for d in entry["deps"]] == ["data.txt"]
    assert [(o["path"], o["md5"], o["nfiles"]) for o in entry["outs"]] == [("models/lora", record.md5, 3)]
    # git: nothing staged or committed; the new lock entry and the .gitignore are there for a person to commit
    assert git(a, "rev-parse", "HEAD") == head and git(a, "diff", "--cached", "--name-only") == ""
    # the cache holds the folder's listing and each of its files (not the .dvcignore'd run reference)
    listing = f"files/md5/{record.md5[:2]}/{record.md5[2:]}"
    files_md5 = {f"files/md5/{dvc.dvc_md5(p, root=a)[:2]}/{dvc.dvc_md5(p, root=a)[2:]}"
                 for p in (a / "models" / "lora").rglob("*") if p.is_file() and p.name != "mlflow_run.json"}
    assert {listing, *files_md5} <= _objects(a / ".dvc" / "cache")
    assert _objects(remote) == (remote_before | {listing, *files_md5} if push else remote_before)


def test_the_hash_ignores_run_references_but_sees_every_weight(tmp_path):
    a = dvc_repo(tmp_path / "a", tmp_path / "remote")
    lora = a / "models" / "lora"
    before = dvc.dvc_md5(lora, root=a)
    (lora / "mlflow_run.json").write_text('{"run_id": "another run"}\n')
    assert dvc.dvc_md5(lora, root=a) == before
    (lora / "resampler" / "weights.bin").write_bytes(b"\x00\x02" * 1000)
    assert dvc.dvc_md5(lora, root=a) != before
    assert dvc.dvc_md5(a / "data.txt", root=a) == "1be1a53caf8f3bfb0f323c026109b8af"  # md5 of the bytes


def test_writer_leftovers_are_outside_the_hash_for_dvc_and_the_project_alike(tmp_path):
    """A killed writer's `.x.tmp.*` / `.x.old.*` folders and files: DVC ignores them (.dvcignore) and so does
    `dvc_md5`, or `record_output` would find dvc.lock disagreeing with the project."""
    a = dvc_repo(tmp_path / "a", tmp_path / "remote")
    lora = a / "models" / "lora"
    clean = dvc.dvc_md5(lora, root=a)
    old = lora / f".resampler.old.4242.{'a' * 32}"
    old.mkdir()
    (old / "weights.bin").write_bytes(b"stale")
    (lora / f".history.json.tmp.4242.{'b' * 32}").write_text("partial")
    assert dvc.dvc_md5(lora, root=a) == clean
    assert dvc.record_output("models/lora", push=False, root=a).md5 == clean  # DVC's own hash agrees
    (lora / "resampler" / "weights.old.bin").write_bytes(b"a weight file whose name merely holds 'old'")
    assert dvc.dvc_md5(lora, root=a) != clean


def test_under_dvc_repro_only_the_hash_is_computed(tmp_path, monkeypatch):
    a = dvc_repo(tmp_path / "a", tmp_path / "remote")
    monkeypatch.setenv(dvc.STAGE_ENV, "train")
    record = dvc.record_output(a / "models" / "lora", root=a)
    assert (record.committed, record.pushed) == (False, False)
    assert "dvc repro" in record.note
    assert not (a / "dvc.lock").exists() and not (tmp_path / "remote").exists()


def test_an_output_dvc_cannot_commit_keeps_its_hash_and_says_why(tmp_path):
    a = dvc_repo(tmp_path / "a", tmp_path / "remote")
    (a / "data.txt").unlink()
    record = dvc.record_output("models/lora", root=a)
    assert (record.committed, record.pushed) == (False, False)
    assert "data.txt" in record.note and "does not exist" in record.note
    assert record.md5 == dvc.dvc_md5(a / "models" / "lora", root=a)


def test_outputs_dvc_does_not_track_get_a_hash_and_a_reason(tmp_path):
    a = dvc_repo(tmp_path / "a", tmp_path / "remote")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"w")
    for path, reason in ((a / "data.txt", "not an output of any stage"), (outside, "outside the DVC project")):
        record = dvc.record_output(path, root=a)
        assert (record.stage, record.committed, record.pushed) == (None, False, False)
        assert reason in record.note and "dvc_pull" not in record.metadata()
        assert record.md5 == dvc.dvc_md5(path, root=a)
    assert not (a / "dvc.lock").exists()


def test_bad_paths_and_stages_are_one_line_errors(tmp_path):
    a = dvc_repo(tmp_path / "a", tmp_path / "remote")
    with pytest.raises(dvc.DvcError, match="outside the DVC project"):
        dvc.stage_of(tmp_path, root=a)
    with pytest.raises(dvc.DvcError, match="no such file"):
        dvc.dvc_md5(a / "missing", root=a)
    with pytest.raises(dvc.DvcError, match="unknown stage 'nope'"):
        pipeline.run_stage("nope")


def test_an_unknown_stage_exits_2_with_one_line(capsys):
    from music_dagster import cli
    assert cli.main(["stage", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == "music: error: unknown stage 'nope' (stages: data, detokenizer, train, evaluate)\n"


def test_the_default_remote_is_one_folder_for_every_clone(tmp_path):
    remotes = set()
    for name in ("one", "two"):
        root = tmp_path / name
        root.mkdir()
        git(root, "init", "-q")
        (root / ".dvc").mkdir()
        shutil.copy(PROJECT_ROOT / ".dvc" / "config", root / ".dvc" / "config")
        out = dvc.run_dvc("remote", "list", root=root).split()
        assert out[0] == "local" and "(default)" in out
        remotes.add(out[1])
    (remote,) = remotes
    assert Path(remote).is_absolute() and Path(remote).is_relative_to(Path.home())


def test_dvc_yaml_runs_the_project_entry_points():
    """Every stage calls a real entry point, data outputs are the data assets' folders, metrics and plots are the
    files the evaluation writes, and the artifact is what `lora_checkpoint` publishes."""
    from music_dagster.assets.data import DATA_ASSETS
    from music_dagster.config import default_config
    from music_dagster.model.runtime import lora_dir

    spec = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    stages = spec["stages"]
    assert list(stages) == ["zoo", "data", "detokenizer", "train", "evaluate"]
    assert stages["zoo"]["cmd"].startswith("music zoo build")
    for name in pipeline.STAGES:
        assert stages[name]["cmd"] == f"music stage {name}"
    assert stages["data"]["outs"] == [f"datasets/{a.key.to_user_string()}" for a in DATA_ASSETS]
    metrics = [next(iter(m)) for m in stages["evaluate"]["metrics"]]
    plots = [next(iter(p)) for p in stages["evaluate"]["plots"]]
    assert metrics == ["metrics/dreambench.json", "metrics/msic.json"]
    assert plots == ["metrics/dreambench.png", "metrics/msic.png"]
    lora = lora_dir(default_config()).relative_to(PROJECT_ROOT).as_posix()
    assert spec["artifacts"]["music-lora"]["path"] == lora == "models/lora"
    assert dvc.stage_of(lora) == "train"
    for stage in stages.values():
        for dep in stage["deps"]:
            if not dep.startswith(("${", "models/", "datasets/")):
                assert (PROJECT_ROOT / dep).exists(), dep
    listed = dvc.run_dvc("stage", "list", "--name-only").split()
    assert listed == list(stages)


# ---------------------------------------------------------------------------------------------------------------
# End to end on the project itself: a bare clone A (nothing beside it) runs the main job through Dagster, whose
# materializations record every stage with DVC, so `dvc repro` then has nothing to do, and after a params change
# re-runs only the stage that reads it; clone B pulls the checkpoint; clone C reproduces everything from nothing.
def repro(root: Path, home: Path) -> list[str]:
    """`dvc repro` in `root`: the stages it ran."""
    out = in_clone(root, home, dvc.dvc_executable(), "repro")
    return re.findall(r"^Running stage '([\w-]+)'", out, re.MULTILINE)


@pytest.mark.slow
@pytest.mark.long
def test_a_bare_clone_runs_the_main_job_and_dvc_agrees_with_dagster(tmp_path):
    import dagster as dg

    from music_dagster.tracking import runs as tracking
    home = tmp_path / "home"
    home.mkdir()
    dvc_cmd = dvc.dvc_executable()
    a = project_copy(tmp_path / "bare" / "main")
    assert sorted(p.name for p in a.parent.iterdir()) == ["main"]  # no shared/ beside it
    proc = run_in(a, home, "music", "pipeline")  # builds the zoo, then data, training, evaluation
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    # the console shows progress, not third-party noise, and ends with a summary of what the job made
    for noise in ("FutureWarning", "truncated because CLIP", " INFO mlflow", "Traceback"):
        assert noise not in console, noise
    kept = sum(1 for shard in (a / "datasets" / "training_samples").iterdir()
               for line in (shard / "manifest.jsonl").read_text().splitlines() if line.strip())
    scores = {name: json.loads((a / "metrics" / f"{name}.json").read_text()) for name in ("dreambench", "msic")}
    tail = proc.stdout[proc.stdout.index("music pipeline: done in"):].splitlines()[1:]
    assert re.fullmatch(rf"  data: 2 shards \(shard-00000\.\.shard-00001\), {kept} samples kept, \d+ dropped on "
                        r"the way -> datasets/", tail[0]), tail
    assert re.fullmatch(r"  de-tokenizer: 2 steps, final loss \d+\.\d{4} -> models/detokenizer", tail[1]), tail
    assert re.fullmatch(r"  MUSIC: 3 steps, final L1 [\d.]+, L2 [\d.]+, loss [\d.]+ -> models/lora", tail[2]), tail
    for line, (name, label) in zip(tail[3:5], (("dreambench", "DreamBench"), ("msic", "MSIC"))):
        music = scores[name]["music"]
        dino = music.get("overall", music)["dino"]  # MSIC also keeps scores by subject count
        assert line.startswith(f"  {label}: MUSIC DINO {dino:.3f} ") and line.endswith(f"-> metrics/{name}.json")

    # The training materialization recorded the checkpoint: dvc.lock, the MLflow run, the Dagster metadata.
    lora = dvc.lock_hash("models/lora", root=a)
    assert lora and lora == dvc.dvc_md5(a / "models" / "lora", root=a)
    run_id = tracking.read_run_ref(a / "models" / "lora")["run_id"]
    store = tracking.Store(tracking_uri=f"sqlite:///{a / 'mlruns.db'}", artifact_root=(a / "mlartifacts").as_uri())
    assert tracking.client(store).get_run(run_id).data.tags["dvc.md5"] == lora
    instance = dg.DagsterInstance.from_config(str(a / ".dagster_home"))
    event = instance.get_latest_materialization_event(dg.AssetKey("lora_checkpoint"))
    metadata = event.asset_materialization.metadata
    assert metadata["dvc_md5"].value == lora and metadata["dvc_pull"].value == "dvc pull models/lora"
    assert "pushed" in metadata["dvc_status"].value

    # Every other stage's materializations recorded it too: DVC sees nothing to reproduce, in paths of the clone.
    def dvc_status(asset: str) -> str:
        return instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata[
            "dvc_status"].value

    assert all("pushed" in dvc_status(asset) for asset in ("tiny_model_zoo", "training_samples"))
    # the `evaluate` stage commits once both of its score folders exist: at the second evaluation asset
    assert any("pushed" in dvc_status(asset) for asset in ("dreambench_scores", "msic_scores"))
    assert in_clone(a, home, dvc_cmd, "status").strip() == "Data and pipelines are up to date."
    lock_text = (a / "dvc.lock").read_text()
    lock = yaml.safe_load(lock_text)
    assert list(lock["stages"]) == ["zoo", "data", "detokenizer", "train", "evaluate"]
    for stage in lock["stages"].values():
        for entry in stage.get("deps", []) + stage.get("outs", []):
            assert not Path(entry["path"]).is_absolute() and ".." not in Path(entry["path"]).parts, entry
    assert str(tmp_path) not in lock_text
    runs = len(instance.get_run_records())
    assert repro(a, home) == []  # `make repro` right after `make run` does no work
    assert (a / "dvc.lock").read_text() == lock_text and len(instance.get_run_records()) == runs

    git(a, "add", "-f", "dvc.lock")  # what a team sharing a DVC remote commits (README: dvc.lock)
    git(a, "add", "models/.gitignore")
    git(a, "commit", "-q", "-m", "pipeline outputs")

    b = tmp_path / "b"
    git(tmp_path, "clone", "-q", str(a), str(b))
    in_clone(b, home, dvc_cmd, "pull", "models/lora")
    assert files(b / "models" / "lora") == files(a / "models" / "lora")
    assert dvc.dvc_md5(b / "models" / "lora", root=b) == lora

    c = tmp_path / "c"
    git(tmp_path, "clone", "-q", str(a), str(c))
    in_clone(c, home, dvc_cmd, "repro")
    # Same stages, commands, inputs and output hashes (the order of stages in the file is the order of commits).
    assert yaml.safe_load((c / "dvc.lock").read_text()) == lock

    # A params change re-runs only the stages that read it.
    raw = yaml.safe_load((a / "params.yaml").read_text())
    raw["profiles"]["tiny"]["eval"]["dreambench_prompts"] = 2
    (a / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert repro(a, home) == ["evaluate"]
    changed = yaml.safe_load((a / "dvc.lock").read_text())["stages"]
    assert {name: changed[name] for name in changed if name != "evaluate"} == \
        {name: lock["stages"][name] for name in lock["stages"] if name != "evaluate"}


# ---------------------------------------------------------------------------------------------------------------
# A clone runs on its own: everything the main job reads is in the repository or made by it.
def test_params_and_dvc_yaml_name_only_paths_inside_the_repository():
    from music_dagster.config import load_config

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    named = [("paths." + key, value) for key, value in raw["paths"].items() if key != "mlflow_tracking_uri"]
    named += [(f"profiles.{p}.eval.dreambench", raw["profiles"][p]["eval"]["dreambench"]) for p in raw["profiles"]]
    named.append(("paths.mlflow_tracking_uri", raw["paths"]["mlflow_tracking_uri"].removeprefix("sqlite:///")))
    for key, value in named:
        assert not Path(value).is_absolute() and ".." not in Path(value).parts, (key, value)
    tiny = load_config(profile="tiny")
    assert tiny.paths.resolve("objects365").is_file() and tiny.dreambench_dir.is_dir()
    for spec in tiny.models.values():
        assert Path(spec.id).parts[:2] == ("models", "tiny")

    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for path in stage["deps"] + [next(iter(o)) if isinstance(o, dict) else o for o in
                                     stage["outs"] + stage.get("metrics", []) + stage.get("plots", [])]:
            path = path.replace("${paths.objects365}", raw["paths"]["objects365"])
            assert "${" not in path and not Path(path).is_absolute() and ".." not in Path(path).parts, (name, path)


def test_dreambench_import_without_a_network_is_one_line_and_leaves_nothing(tmp_path):
    root = project_copy(tmp_path / "clone", shrink=False)

    def listing():  # DVC's own scratch folder (.dvc/tmp) aside
        return sorted(p.relative_to(root) for p in root.rglob("*")
                      if ".git" not in p.parts and p.relative_to(root).parts[:2] != (".dvc", "tmp"))

    before = listing()
    proc = run_in(root, tmp_path, "music", "data", "dreambench", timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("music: error: cannot reach https://github.com/google/dreambooth from this machine: "
                           "run `music data dreambench` on a machine with network access"), line
    assert listing() == before
