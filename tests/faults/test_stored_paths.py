"""Stored paths stay inside their roots, and no shard is skipped in silence.

A manifest row whose image leaves the datasets root (`..`, an absolute path, a symlink leading out), or a checkpoint
config naming a weight file outside its folder, is one line naming the file and the row (exit 2), and nothing is
trained on or generated. A `training_samples` shard folder without a manifest is refused naming the shard and the
fix, unless `train.allow_incomplete_shards` accepts it (then the log names it). Refusals leave the data, the models
and the MLflow store byte-identical."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import assert_one_line_error, copy_project, music, snapshot

pytestmark = pytest.mark.slow

SAMPLES = Path("datasets") / "training_samples"


@pytest.fixture()
def project(trained, tmp_path):
    root = copy_project(trained, tmp_path / "p")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(root / "data" / "dreambench" / "cat" / "00.jpg", tmp_path / "outside.png")  # what a bad path reaches
    return root, home


def edit_row(root: Path, split: str, edit) -> tuple[Path, int]:
    """Apply `edit(record)` to the first `training_samples` row of `split`; (its manifest, its line number)."""
    for manifest in sorted((root / SAMPLES).glob("*/manifest.jsonl")):
        lines = manifest.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            record = json.loads(line)
            if record["split"] == split:
                edit(record)
                lines[number - 1] = json.dumps(record, sort_keys=True)
                manifest.write_text("\n".join(lines) + "\n")
                return manifest, number
    raise AssertionError(f"no {split} row in the built project")


def set_image(ref):
    def edit(record):
        record["image"] = ref
    return edit


def set_reference(ref):
    def edit(record):
        record["subjects"][0]["reference"] = ref
    return edit


def _refused(root: Path, home: Path, args: tuple[str, ...], *fragments: str) -> str:
    """`music <args>` exits 2 with one line holding `fragments`; the stores are as they were."""
    before = snapshot(root)
    line = assert_one_line_error(music(root, home, *args), 2, *fragments)
    assert snapshot(root) == before
    return line


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "reference"])
def test_training_refuses_a_row_whose_image_leaves_the_datasets_root(project, how):
    root, home = project
    outside = root.parent / "outside.png"
    if how == "symlink":
        link = next((root / SAMPLES).glob("*/manifest.jsonl")).parent / "link.png"
        link.symlink_to(outside)
        ref, edit, fault = link.relative_to(root / "datasets").as_posix(), set_image, "leads out of"
    else:
        ref, edit, fault = {"dotdot": ("../../outside.png", set_image, "climbs out of"),
                            "absolute": (str(outside), set_image, "is absolute"),
                            "reference": ("../../outside.png", set_reference, "climbs out of")}[how]
    manifest, line = edit_row(root, "train", edit(ref))
    _refused(root, home, ("stage", "train"), f"{manifest}: line {line}: path {ref!r} {fault}")


def test_evaluation_refuses_an_msic_reference_outside_the_datasets_root(project):
    root, home = project
    manifest, line = edit_row(root, "msic", set_reference("../../outside.png"))
    _refused(root, home, ("stage", "evaluate"), f"{manifest}: line {line}: path '../../outside.png' climbs out of")


def test_generate_refuses_a_weight_file_recorded_outside_the_checkpoint(project):
    root, home = project
    config = root / "models" / "lora" / "music_config.json"
    meta = json.loads(config.read_text())
    meta["sha256"]["../../outside.png"] = meta["sha256"].pop("music_modules.safetensors")
    config.write_text(json.dumps(meta))
    subject = root / "data" / "dreambench" / "cat" / "00.jpg"
    _refused(root, home, ("generate", "--subject", str(subject), "--prompt", "Put [1] here.", "--out", str(root / "o")),
             f"{config}: sha256: path '../../outside.png' climbs out of {root / 'models' / 'lora'}")
    assert not (root / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# Shards
def _msic_shard(root: Path) -> Path:
    """The shard holding the first MSIC row: removing it leaves the training rows."""
    return edit_row(root, "msic", lambda record: None)[0].parent


def test_training_refuses_a_shard_without_manifest_naming_it_and_the_fix(project):
    root, home = project
    shard = _msic_shard(root)
    (shard / "manifest.jsonl").unlink()
    _refused(root, home, ("stage", "train"), f"incomplete shard {shard.name} (no manifest.jsonl)",
             f"materialize data_job for {shard.name}", "remove the partition", "train.allow_incomplete_shards: true")


def test_allow_incomplete_shards_trains_without_it_and_says_so(project):
    root, home = project
    shard = _msic_shard(root)
    (shard / "manifest.jsonl").unlink()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["profiles"]["tiny"]["train"]["allow_incomplete_shards"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = music(root, home, "stage", "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"training without the incomplete shard {shard.name}" in proc.stdout + proc.stderr


def test_doctor_names_a_manifest_row_outside_the_datasets_root(project):
    root, home = project
    manifest, line = edit_row(root, "train", set_image("../../outside.png"))
    before = snapshot(root)
    found = assert_one_line_error(music(root, home, "doctor"), 1,
                                  f"{manifest}: line {line}: path '../../outside.png' climbs out of",
                                  f"materialize data_job for {manifest.parent.name}")
    assert found.startswith("music doctor: ")
    assert snapshot(root) == before
