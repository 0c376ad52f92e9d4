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
    assert _error(raw, profile="tiny") == (
        "params.yaml: profiles.tiny.data.shardsize: unknown key (did you mean 'shard_size'?)")


@pytest.mark.parametrize("where, key, expected", [
    ((), "seeds", "params.yaml: seeds: unknown key (did you mean 'seed'?)"),
    (("paths",), "dataset", "params.yaml: paths.dataset: unknown key (did you mean 'datasets'?)"),
    (("profiles", "tiny"), "trian", "params.yaml: profiles.tiny.trian: unknown key (did you mean 'train'?)"),
    (("profiles", "full", "models", "music_unet"), "subfoldr",
     "params.yaml: profiles.full.models.music_unet.subfoldr: unknown key (did you mean 'subfolder'?)"),
    (("profiles", "full", "eval"), "branch",
     "params.yaml: profiles.full.eval.branch: unknown key (did you mean 'branches'?)"),
    (("profiles", "tiny", "generate"), "zzz", "params.yaml: profiles.tiny.generate.zzz: unknown key"),
])
def test_unknown_keys_are_refused_at_every_level_with_a_suggestion(raw, where, key, expected):
    block = raw
    for name in where:
        block = block[name]
    block[key] = 3
    assert _error(raw, profile="tiny") == expected


def test_unknown_role_suggests_the_closest(raw):
    raw["profiles"]["tiny"]["models"]["llmm"] = "models/tiny/llm"
    assert "profiles.tiny.models: unknown role 'llmm' (did you mean 'llm'?)" in _error(raw, profile="tiny")


@pytest.mark.parametrize("section, key, value, expected", [
    ("data", "shard_size", True, "profiles.tiny.data.shard_size: Input should be a valid integer (got True)"),
    ("data", "shard_size", "4", "profiles.tiny.data.shard_size: Input should be a valid integer (got '4')"),
    ("data", "num_shards", 2.0, "profiles.tiny.data.num_shards: Input should be a valid integer (got 2.0)"),
    ("train", "lr", "1e-4", "profiles.tiny.train.lr: Input should be a valid number (got '1e-4')"),
    ("train", "w1", False, "profiles.tiny.train.w1: Input should be a valid number (got False)"),
    ("train", "cache_features", "yes", "profiles.tiny.train.cache_features: Input should be a valid boolean "
                                       "(got 'yes')"),
    ("train", "lora_targets", "q_proj", "profiles.tiny.train.lora_targets: Input should be a list (got 'q_proj')"),
    ("train", "lora_targets", ["q_proj", 1], "profiles.tiny.train.lora_targets.1: Input should be a valid string "
                                             "(got 1)"),
    ("eval", "dreambench", 3, "profiles.tiny.eval.dreambench: Input should be a valid string (got 3)"),
])
def test_strict_types(raw, section, key, value, expected):
    raw["profiles"]["tiny"][section][key] = value
    assert _error(raw, profile="tiny") == f"params.yaml: {expected}"


def test_strict_seed(raw):
    raw["seed"] = True
    assert _error(raw) == "params.yaml: seed: Input should be a valid integer (got True)"


def test_an_int_is_a_float(raw):
    raw["profiles"]["tiny"]["train"]["lr"] = 1
    config = parse_config(raw, profile="tiny")
    assert config.profile.train.lr == 1.0 and isinstance(config.profile.train.lr, float)


@pytest.mark.parametrize("section, key, value, problem", [
    ("data", "lam", float("inf"), "Input should be a finite number (got inf)"),
    ("data", "lam", 1.0, "Input should be less than 1 (got 1.0)"),
    ("data", "lam", -0.1, "Input should be greater than or equal to 0 (got -0.1)"),
    ("data", "guidance_scale", float("nan"), "Input should be a finite number (got nan)"),
    ("train", "w2", float("-inf"), "Input should be a finite number (got -inf)"),
    ("detokenizer", "grad_clip", float("inf"), "Input should be a finite number (got inf)"),
    ("generate", "temperature", float("nan"), "Input should be a finite number (got nan)"),
])
def test_bounds_and_no_nan_or_infinity(raw, section, key, value, problem):
    raw["profiles"]["tiny"][section][key] = value
    assert _error(raw, profile="tiny") == f"params.yaml: profiles.tiny.{section}.{key}: {problem}"


@pytest.mark.parametrize("profile, value, problem", [
    ("tiny", 0, "Input should be greater than or equal to 1 (got 0)"),
    ("full", 65, "Input should be less than or equal to 64 (got 65)"),
    ("procedural", 8.0, "Input should be a valid integer (got 8.0)"),
])
def test_cot_words_per_subject_is_a_bounded_count(raw, profile, value, problem):
    raw["profiles"][profile]["data"]["cot_words_per_subject"] = value
    assert _error(raw, profile=profile) == f"params.yaml: profiles.{profile}.data.cot_words_per_subject: {problem}"


def test_cot_is_short_in_tiny_and_detailed_in_full():
    tiny, full = (load_config(profile=p).profile.data.cot_words_per_subject for p in ("tiny", "full"))
    assert tiny == 8 and 40 <= full <= 60  # tiny: the pinned shards' length; full: the paper's detailed CoT


def test_lam_just_below_one_is_accepted(raw):
    raw["profiles"]["tiny"]["data"]["lam"] = 0.99
    assert parse_config(raw, profile="tiny").profile.data.lam == 0.99


@pytest.mark.parametrize("section", ["data", "train", "detokenizer", "eval", "generate", "selection"])
def test_a_profile_spells_out_every_section(raw, section):
    del raw["profiles"]["tiny"][section]
    assert _error(raw, profile="tiny") == (
        f"params.yaml: profiles.tiny.{section}: section missing (each profile spells out every section; the code's "
        f"defaults are the paper's full-scale values)")


@pytest.mark.parametrize("section, key, default", [
    ("train", "lora_rank", "; the default would be 64"),
    ("train", "lora_targets", '; the default would be ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", '
                              '"up_proj", "down_proj"]'),
    ("detokenizer", "vae", "; the default would be null"),
    ("data", "lam", ""),
])
def test_a_missing_key_names_the_default_that_would_apply(raw, section, key, default):
    del raw["profiles"]["tiny"][section][key]
    assert _error(raw, profile="tiny") == (
        f"params.yaml: profiles.tiny.{section}.{key}: key missing (each profile spells out every key{default})")


def test_a_missing_profile_level_key(raw):
    del raw["profiles"]["full"]["torch_threads"]
    assert _error(raw, profile="full") == (
        "params.yaml: profiles.full.torch_threads: key missing (each profile spells out every key; the default "
        "would be 1)")


def test_every_profile_is_checked_not_only_the_selected_one(raw):
    raw["profiles"]["full"]["data"]["shard_size"] = True
    assert _error(raw, profile="tiny") == (
        "params.yaml: profiles.full.data.shard_size: Input should be a valid integer (got True)")


def test_an_exponent_is_a_number_as_yaml_1_2_and_dvc_read_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_FILE.read_text().replace("lr: 1.0e-3", "lr: 1e-3", 1))
    assert "lr: 1e-3" in path.read_text()
    assert load_config(path, profile="tiny").profile.train.lr == 1e-3
    path.write_text(PARAMS_FILE.read_text().replace("lr: 1.0e-3", 'lr: "1e-3"', 1))  # quoted: text
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "params.yaml: profiles.tiny.train.lr: Input should be a valid number (got '1e-3')"


def test_yaml_infinity_from_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_FILE.read_text().replace("lam: 0.05", "lam: .inf", 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "params.yaml: profiles.tiny.data.lam: Input should be a finite number (got inf)"


def test_non_utf8_byte_is_one_line_with_its_offset(tmp_path):
    text = PARAMS_FILE.read_bytes()
    offset = text.index(b"shard_size")
    path = tmp_path / "params.yaml"
    path.write_bytes(text[:offset] + b"\xff" + text[offset:])
    line = text[:offset].count(b"\n") + 1
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"params.yaml: byte 0xff at offset {offset} (line {line}) is not UTF-8; save the file as UTF-8")


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


@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), (["cuda:0", "cuda:1"], ["cuda:0", "cuda:1"]), (["cpu", "cpu"], ["cpu", "cpu"]),
])
def test_devices_is_auto_or_a_list(raw, value, expected):
    raw["profiles"]["tiny"]["devices"] = value
    assert parse_config(raw, profile="tiny").profile.devices == expected


@pytest.mark.parametrize("value, problem", [
    ([], "expected auto or a list of at least one device"),
    (["gpu0"], "unknown device 'gpu0' (use cpu or cuda:<index>)"),
    (["cuda"], "unknown device 'cuda' (use cpu or cuda:<index>)"),
    (["cuda:0", "cuda:0"], "a GPU is listed twice in ['cuda:0', 'cuda:0']: two steps would share it"),
])
def test_bad_devices_name_the_key(raw, value, problem):
    raw["profiles"]["tiny"]["devices"] = value
    message = _error(raw, profile="tiny")
    assert message.startswith("params.yaml: profiles.tiny.devices") and problem in message, message


def test_every_profile_lists_its_devices(raw):
    for name in raw["profiles"]:
        del raw["profiles"][name]["devices"]
        assert "profiles." + name + ".devices: key missing" in _error(raw, profile=name)
        raw["profiles"][name]["devices"] = "auto"
