"""params.yaml validation: every bad value fails with one line naming the key."""
import copy

import pytest
import yaml

from music_dagster.config import PARAMS_FILE, ROLES, ConfigError, load_config, parse_config


@pytest.fixture()
def raw():
    return yaml.safe_load(PARAMS_FILE.read_text())


def _error(raw, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_project_params_are_valid_for_both_profiles():
    for name in ("tiny", "full"):
        config = load_config(profile=name)
        assert set(config.models) == set(ROLES)
        assert config.profile.data.grid == 8 and config.profile.data.lam == 0.05
        assert config.profile.data.min_box_area == 0.01 and config.profile.data.max_subjects == 12


def test_tiny_roles_are_local_folders_and_full_roles_are_hub_ids():
    tiny, full = load_config(profile="tiny"), load_config(profile="full")
    for role in ROLES:
        assert tiny.models[role].local_path is not None
        assert full.models[role].local_path is None
    assert full.models["music_unet"].subfolder == "unet"


def test_unknown_role(raw):
    raw["profiles"]["tiny"]["models"]["painter"] = "models/tiny/painter"
    assert _error(raw, profile="tiny") == (
        f"params.yaml: profiles.tiny.models: unknown role 'painter' (roles: {', '.join(ROLES)})"
    )


def test_missing_role(raw):
    del raw["profiles"]["full"]["models"]["vlm"]
    assert "profiles.full.models: role 'vlm' has no checkpoint" in _error(raw, profile="full")


def test_wrong_type_names_the_key(raw):
    raw["profiles"]["tiny"]["data"]["shard_size"] = "four"
    message = _error(raw, profile="tiny")
    assert message.startswith("params.yaml: profiles.tiny.data.shard_size:")
    assert "'four'" in message


def test_out_of_range_value(raw):
    raw["profiles"]["tiny"]["data"]["max_subjects"] = 13
    assert "profiles.tiny.data.max_subjects" in _error(raw, profile="tiny")


def test_unknown_key_is_refused(raw):
    raw["profiles"]["tiny"]["data"]["shardsize"] = 3
    assert "profiles.tiny.data.shardsize: Extra inputs are not permitted" in _error(raw, profile="tiny")


def test_unknown_profile(raw):
    assert "unknown profile 'huge'" in _error(raw, profile="huge")


def test_missing_folder_names_the_command(raw, tmp_path):
    raw = copy.deepcopy(raw)
    raw["profiles"]["tiny"]["models"]["llm"] = str(tmp_path / "nowhere")
    config = parse_config(raw, profile="tiny")
    with pytest.raises(ConfigError, match=r"profiles\.tiny\.models\.llm: folder .*nowhere is missing \(make it with `music zoo build`\)"):
        config.check_models(["llm"])


def test_missing_objects365_file(raw, tmp_path):
    raw["paths"]["objects365"] = str(tmp_path / "absent.json")
    config = parse_config(raw, profile="tiny")
    with pytest.raises(ConfigError, match=r"^paths\.objects365: .*absent\.json does not exist$"):
        config.require_file("objects365")


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("profile: [tiny\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("MUSIC_PROFILE", "full")
    assert load_config().profile_name == "full"
