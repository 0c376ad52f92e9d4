"""What the loaders guarantee for the evaluation: its encoders run in float32 whatever the profile says, and an
open_clip model has the activation its config declares (QuickGELU for OpenAI's CLIP), else one line."""
import json
import shutil

import pytest
import torch

from music_dagster.config import ModelSpec, load_config
from music_dagster.zoo.loaders import FLOAT32_ROLES, LoaderError, load_role, role_dtype


def test_evaluation_encoders_are_float32_on_a_bf16_gpu_profile():
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert set(FLOAT32_ROLES) == {"dino", "eval_clip"}
    for role in ("dino", "eval_clip"):
        assert role_dtype(role, "bfloat16", cuda) == torch.float32
        assert role_dtype(role, "float16", cuda) == torch.float32
    assert role_dtype("select_clip", "bfloat16", cuda) == torch.bfloat16  # the MUSIC* selector follows the profile
    assert role_dtype("clip", "bfloat16", cuda) == torch.bfloat16
    assert role_dtype("music_llm", "bfloat16", cuda) == torch.bfloat16
    with pytest.raises(LoaderError, match="unknown dtype"):
        role_dtype("dino", "float8", cuda)


def test_the_full_profile_loads_its_evaluation_encoders_in_float32(tiny_zoo):
    from music_dagster.resources.models import DinoResource, EvalClipResource

    full = load_config(profile="full")
    assert full.profile.dtype == "bfloat16"
    for cls in (DinoResource, EvalClipResource):
        resource = cls.from_config(full)
        assert resource.dtype == "bfloat16"  # what the profile asks; the loader overrides it for these roles
        assert role_dtype(resource.role, resource.dtype, torch.device("cuda")) == torch.float32


def _clip_copy(tiny_zoo, tmp_path, name, quick_gelu=None):
    folder = tmp_path / name
    shutil.copytree(tiny_zoo["clip"], folder)
    if quick_gelu is not None:
        path = folder / "open_clip_config.json"
        config = json.loads(path.read_text())
        config["model_cfg"]["quick_gelu"] = quick_gelu
        path.write_text(json.dumps(config))
    return ModelSpec(id=str(folder))


def test_an_openai_clip_without_quickgelu_is_one_line(tiny_zoo, tmp_path):
    spec = _clip_copy(tiny_zoo, tmp_path, "vit_l14.openai")
    with pytest.raises(LoaderError) as e:
        load_role("eval_clip", spec, "cpu", "float32")
    assert "\n" not in str(e.value) and "QuickGELU" in str(e.value) and "quick_gelu: true" in str(e.value)


def test_the_declared_activation_is_the_built_one(tiny_zoo, tmp_path):
    from open_clip.transformer import QuickGELU

    openai = load_role("clip", _clip_copy(tiny_zoo, tmp_path, "vit_l14.openai", quick_gelu=True), "cpu", "float32")
    assert isinstance(openai.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    plain = load_role("eval_clip", ModelSpec(id=str(tiny_zoo["clip"])), "cpu", "bfloat16")
    assert type(plain.model.visual.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU
    assert plain.dtype == torch.float32 and next(plain.model.parameters()).dtype == torch.float32


def test_dino_from_the_hub_reads_only_its_config_and_safetensors(tiny_zoo, tmp_path, monkeypatch):
    """The full profile's `dino` (a timm repository at a pinned commit): the loader fetches its config.json and
    model.safetensors at that revision, never the pickle beside them, and loads them strictly; a repository without
    model.safetensors is one line."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_file

    repo = tmp_path / "hub"  # what the Hub repository holds: the tiny DINO's files and a pickle copy of its weights
    shutil.copytree(tiny_zoo["dino"], repo)
    torch.save(load_file(repo / "model.safetensors"), repo / "pytorch_model.bin")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    asked = []

    def download(repo_id, filename, revision=None, subfolder=None):
        asked.append((repo_id, filename, revision))
        if not (repo / filename).is_file():
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        shutil.copy(repo / filename, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    spec = load_config(profile="full").models["dino"]
    handle = load_role("dino", spec, "cpu", "bfloat16")
    repo_id, revision = spec.id.removeprefix("hf-hub:"), spec.revision
    assert asked == [(repo_id, "config.json", revision), (repo_id, "model.safetensors", revision)]
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    assert type(handle.model).__name__ == "VisionTransformer" and handle.dtype == torch.float32
    weights = load_file(repo / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in handle.model.state_dict().items())

    (repo / "model.safetensors").unlink()
    with pytest.raises(LoaderError) as e:
        load_role("dino", spec, "cpu", "float32")
    assert str(e.value) == f"{spec.id}: no model.safetensors (pickle weights are never loaded)"
