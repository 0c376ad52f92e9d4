"""A params.yaml the config cannot mean: `music stage data` exits 2 with one line naming the key (or the byte), before
any Dagster run writes anything, and leaves the data, the models and the MLflow store as they were."""
import shutil

import pytest
import yaml

from helpers import assert_one_line_error, music, snapshot
from projects import copy_zoo, project_copy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A project copy with the tiny zoo and nothing materialized."""
    root = project_copy(tmp_path_factory.mktemp("config") / "p")
    copy_zoo(root)
    return root


def _tiny(raw):
    return raw["profiles"]["tiny"]


# (what is wrong, how params.yaml is changed, the one line after `music: error: params.yaml: `)
CASES = [
    ("bool as an int", lambda r: _tiny(r)["data"].update(shard_size=True),
     "profiles.tiny.data.shard_size: Input should be a valid integer (got True)"),
    ("string as a number", lambda r: _tiny(r)["data"].update(num_shards="2"),
     "profiles.tiny.data.num_shards: Input should be a valid integer (got '2')"),
    ("a quoted number", lambda r: _tiny(r)["train"].update(lr="0.001"),
     "profiles.tiny.train.lr: Input should be a valid number (got '0.001')"),
    ("unknown top-level key", lambda r: r.update(seeds=3), "seeds: unknown key (did you mean 'seed'?)"),
    ("unknown section", lambda r: _tiny(r).update(trian={"lr": 0.1}),
     "profiles.tiny.trian: unknown key (did you mean 'train'?)"),
    ("unknown nested key", lambda r: _tiny(r)["eval"].update(branch=2),
     "profiles.tiny.eval.branch: unknown key (did you mean 'branches'?)"),
    ("lam infinite", lambda r: _tiny(r)["data"].update(lam=float("inf")),
     "profiles.tiny.data.lam: Input should be a finite number (got inf)"),
    ("lam not below 1", lambda r: _tiny(r)["data"].update(lam=1.0),
     "profiles.tiny.data.lam: Input should be less than 1 (got 1.0)"),
    ("NaN", lambda r: _tiny(r)["data"].update(guidance_scale=float("nan")),
     "profiles.tiny.data.guidance_scale: Input should be a finite number (got nan)"),
    ("a profile without its train section", lambda r: _tiny(r).pop("train"),
     "profiles.tiny.train: section missing (each profile spells out every section; the code's defaults are the "
     "paper's full-scale values)"),
    ("a section without one of its keys", lambda r: _tiny(r)["train"].pop("lora_rank"),
     "profiles.tiny.train.lora_rank: key missing (each profile spells out every key; the default would be 64)"),
    ("the profile not selected", lambda r: r["profiles"]["full"]["data"].update(shard_size=False),
     "profiles.full.data.shard_size: Input should be a valid integer (got False)"),
]


@pytest.mark.parametrize("change, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_config_it_cannot_mean_is_one_line(bare, tmp_path, change, expected):
    root = tmp_path / "p"
    shutil.copytree(bare, root, symlinks=True)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    change(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    before = snapshot(root)
    line = assert_one_line_error(music(root, tmp_path / "home", "stage", "data"), 2)
    assert line == f"music: error: params.yaml: {expected}"
    assert snapshot(root) == before and not (root / "datasets").exists()


def test_a_byte_that_is_not_utf8_is_one_line_with_its_offset(bare, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(bare, root, symlinks=True)
    text = (root / "params.yaml").read_bytes()
    offset = text.index(b"lam:")
    (root / "params.yaml").write_bytes(text[:offset] + b"\xe9" + text[offset:])  # a Latin-1 e-acute
    line_number = text[:offset].count(b"\n") + 1
    before = snapshot(root)
    line = assert_one_line_error(music(root, tmp_path / "home", "stage", "data"), 2)
    assert line == (f"music: error: params.yaml: byte 0xe9 at offset {offset} (line {line_number}) is not UTF-8; "
                    f"save the file as UTF-8")
    assert snapshot(root) == before and not (root / "datasets").exists()
