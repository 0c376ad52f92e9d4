"""Bad plans given to `music generate --plan / --layout`: a grid of the wrong size, an id not among the subjects, a
subject with no cell, a file that is not JSON, not UTF-8 or not a plan. Each is one line naming the file and the
problem (exit 2), checked before any model loads; `--out` is not created and the data, the models and the MLflow
store are left byte-identical."""
import json

import pytest
from PIL import Image

from helpers import assert_one_line_error, music, snapshot
from projects import project_copy


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project copy with two subject images (nothing trained: a bad plan is refused before any checkpoint)."""
    root = project_copy(tmp_path_factory.mktemp("plans") / "p")
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(root / name)
    home = root.parent / "home"
    home.mkdir()
    return root, home


def grid(fill=0, **cells):
    rows = [[fill] * 8 for _ in range(8)]
    for name, sid in cells.items():  # cell names r<row>c<col>
        rows[int(name[1])][int(name[3])] = sid
    return rows


CASES = {  # name: (flag, file bytes, fragments of the one line)
    "seven_rows": ("--plan", json.dumps({"cot": "c", "layout": grid(r0c0=1, r1c1=2)[:7]}), ["7x8", "expected 8x8"]),
    "ragged": ("--layout", json.dumps([[1, 2]] + grid()[1:]), ["layout grid", "expected 8x8"]),
    "unknown_id": ("--plan", json.dumps({"cot": "c", "layout": grid(r0c0=1, r1c1=2, r7c7=3)}),
                   ["id 3", "row 7, column 7", "2 subject"]),
    "no_cell": ("--layout", json.dumps(grid(r0c0=1)), ["subject 2 has no cell"]),
    "not_json": ("--plan", "{cot: oops", ["not JSON"]),
    "not_utf8": ("--plan", b"\xff\xfe{}", ["not UTF-8"]),
    "no_cot": ("--plan", json.dumps({"layout": grid(r0c0=1, r1c1=2)}), ["cot"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_plan_is_one_line_and_writes_nothing(case, project):
    root, home = project
    flag, content, fragments = CASES[case]
    plan = root / f"{case}.json"
    plan.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(root)
    proc = music(root, home, "generate", "--subject", "a.png", "--subject", "b.png", "--prompt",
                 "put [1] left of [2]", flag, plan.name, "--out", "out", timeout=300)
    assert_one_line_error(proc, 2, plan.name, *fragments)
    assert not (root / "out").exists()
    assert snapshot(root) == before
