"""`music check full` on a damaged copy of configs/full: one line naming the file, exit 2, no traceback, and the
project's data, models and MLflow store untouched (the dry run writes nothing)."""
import json

import pytest
from helpers import assert_one_line_error, music, snapshot
from projects import project_copy


@pytest.fixture
def project(tmp_path):
    return project_copy(tmp_path / "p")


def _check(project, tmp_path, *fragments):
    before = snapshot(project)
    line = assert_one_line_error(music(project, tmp_path / "home", "check", "full"), 2, *fragments)
    assert snapshot(project) == before
    return line


def test_a_missing_config_is_one_line(project, tmp_path):
    (project / "configs/full/Qwen/Qwen3-8B/config.json").unlink()
    _check(project, tmp_path, "configs/full/Qwen/Qwen3-8B/config.json is missing")


def test_a_damaged_config_is_one_line(project, tmp_path):
    (project / "configs/full/Qwen/Qwen3-8B/config.json").write_text('{"model_type": "qwen3", ')
    _check(project, tmp_path, "configs/full/Qwen/Qwen3-8B/config.json: not readable JSON")


def test_a_config_that_does_not_build_is_one_line(project, tmp_path):
    path = project / "configs/full/Qwen/Qwen3-8B/config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "no-such-model"}))
    _check(project, tmp_path, "llm: configs/full/Qwen/Qwen3-8B does not build")


def test_a_size_far_from_the_published_is_one_line(project, tmp_path):
    path = project / "configs/full/Qwen/Qwen3-8B/config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_hidden_layers": 32}))  # 36 published
    _check(project, tmp_path, "llm: Qwen/Qwen3-8B builds", "from the published 8,190,000,000")


def test_a_plan_budget_shorter_than_the_detailed_cot_is_one_line(project, tmp_path):
    import yaml

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["profiles"]["full"]["data"]["cot_words_per_subject"] = 64  # a 12-subject plan of ~1,230 tokens
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _check(project, tmp_path, "train.max_plan_tokens (1024) is shorter than the longest plan",
           "12 subjects x 64 CoT words (data.cot_words_per_subject)")
