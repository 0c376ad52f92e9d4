"""Damaged checkpoints: a truncated weight file, garbage in a config, bytes that are not UTF-8, a weight file whose
content no longer matches the sha256 its config records. Each is one line naming the file and the fault (exit 2)
from `music generate` and `music stage evaluate`, before any model loads; `--out` is not created and the data,
the models and the MLflow store are left byte-identical."""
import json
from pathlib import Path

import pytest

from helpers import assert_one_line_error, copy_project, music, snapshot

pytestmark = pytest.mark.slow

LORA, DETOK = "models/lora", "models/detokenizer"
UNET_WEIGHTS = f"{DETOK}/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture()
def project(trained, tmp_path):
    root = copy_project(trained, tmp_path / "p")
    home = tmp_path / "home"
    home.mkdir()
    return root, home


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_text("{this is not json")


def not_utf8(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"settings"', b'"sett\xffings"', 1))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # inside the last tensor: the header still reads, only the content hash tells
    path.write_bytes(bytes(data))


def edit_json(**changes):
    def edit(path: Path) -> None:
        config = json.loads(path.read_text())
        for dotted, value in changes.items():
            *parents, key = dotted.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[key] = value
        path.write_text(json.dumps(config))
    return edit


# (damaged file, damage, what the line says)
FAULTS = [
    (f"{LORA}/adapter_model.safetensors", truncate,
     "not a complete safetensors file (incomplete metadata, file not fully covered)"),
    (f"{LORA}/music_modules.safetensors", truncate, "not a complete safetensors file"),
    (f"{DETOK}/detokenizer_modules.safetensors", truncate, "not a complete safetensors file"),
    (UNET_WEIGHTS, truncate, "not a complete safetensors file"),
    (f"{LORA}/adapter_config.json", garbage, "not JSON (Expecting property name enclosed in double quotes at line 1"),
    (f"{DETOK}/detokenizer_config.json", garbage, "not JSON (Expecting property name"),
    (f"{DETOK}/unet/config.json", garbage, "not JSON (Expecting property name"),
    (f"{LORA}/music_config.json", not_utf8, "not UTF-8 (byte 0xff at offset"),
    (f"{LORA}/adapter_model.safetensors", flip_a_byte, "content differs from the sha256 music_config.json records"),
    (UNET_WEIGHTS, flip_a_byte, "content differs from the sha256 detokenizer_config.json records"),
    (f"{LORA}/music_config.json", edit_json(**{"settings.lora_rank": "16"}),
     "settings.lora_rank: '16' is not of type 'integer'"),
    (f"{LORA}/adapter_config.json", edit_json(r=8), "r is 8 but music_config.json says 16"),
    (f"{DETOK}/detokenizer_config.json", edit_json(beta_schedule="cosine"), "beta_schedule: 'cosine' is not one of"),
    (f"{DETOK}/unet/config.json", edit_json(down_block_types=["NoSuchBlock2D"] * 3),
     "diffusers cannot build a UNet from it (NoSuchBlock2D does not exist.)"),
]
IDS = [f"{Path(f).name}-{damage.__name__}" for f, damage, _ in FAULTS]
IDS[-4:] = ["music_config-string-rank", "adapter_config-other-rank", "detokenizer_config-schedule", "unet-config-block"]


def _generate(root: Path, home: Path):
    subject = sorted((root / "data" / "dreambench" / "cat").glob("*.jpg"))[0]
    return music(root, home, "generate", "--subject", str(subject), "--prompt", "Put [1] on a table.",
                 "--out", str(root / "out"))


@pytest.mark.parametrize("name, damage, fault", FAULTS, ids=IDS)
def test_generate_names_the_damaged_file_in_one_line(project, name, damage, fault):
    root, home = project
    damage(root / name)
    before = snapshot(root)
    assert_one_line_error(_generate(root, home), 2, f"{root / name}: {fault}")
    assert not (root / "out").exists()
    assert snapshot(root) == before


@pytest.mark.parametrize("name, damage, fault", [FAULTS[0], FAULTS[6]], ids=[IDS[0], IDS[6]])
def test_evaluate_names_the_damaged_file_in_one_line(project, name, damage, fault):
    root, home = project
    damage(root / name)
    before = snapshot(root)
    assert_one_line_error(music(root, home, "stage", "evaluate"), 2, f"{root / name}: {fault}")
    assert snapshot(root) == before


def test_the_undamaged_project_generates(project):
    """The control: the same command on the copy as built succeeds (the faults above are the damage alone)."""
    root, home = project
    proc = _generate(root, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (root / "out").iterdir()) == ["image.png", "layout.png", "plan.json"]


def test_doctor_names_a_damaged_checkpoint(project):
    root, home = project
    truncate(root / UNET_WEIGHTS)
    before = snapshot(root)
    line = assert_one_line_error(music(root, home, "doctor"), 1, f"{root / UNET_WEIGHTS}: not a complete safetensors",
                                 "music stage detokenizer")
    assert line.startswith("music doctor: ")
    assert snapshot(root) == before
