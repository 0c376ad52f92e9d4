"""The tiny zoo: every role builds, reloads through `load_role` (the full profile's loader) and runs one forward
pass with the expected shapes; builds are byte-identical; pickle-only folders are refused."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from music_dagster.config import ROLES, ModelSpec
from music_dagster.zoo.loaders import LoaderError, load_role
from music_dagster.zoo.tiny import ZooError, build_zoo, file_hashes, read_manifest


def _image(w=64, h=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def load(tiny_zoo):
    def _load(role):
        return load_role(role, ModelSpec(id=str(tiny_zoo[role])), "cpu", "float32")

    return _load


def test_manifest_lists_every_role(tiny_zoo):
    manifest = read_manifest(next(iter(tiny_zoo.values())).parent)
    assert set(manifest["roles"]) >= set(ROLES)
    for role in ROLES:
        entry = manifest["roles"][role]
        assert entry["parameters"] > 0
        assert entry["files"] == file_hashes(tiny_zoo[role])
        assert all(not f.endswith((".bin", ".pt", ".pth")) for f in entry["files"])


@pytest.mark.parametrize("role", ["llm", "music_llm"])
def test_causal_lm_generates(load, role):
    import torch

    h = load(role)
    assert type(h.model).__name__ == "Qwen3ForCausalLM" and not h.model.training
    enc = h.tokenizer(["subject 1 is a red cat at the top left."], return_tensors="pt")
    with torch.no_grad():
        out = h.model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, enc["input_ids"].shape[1] + 5)
    assert h.model.config.vocab_size >= len(h.tokenizer)


def test_llm_chat_template(load):
    h = load("llm")
    text = h.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_music_llm_tokenizer_layout(load):
    tok = load("music_llm").tokenizer
    assert tok.model_max_length > 0
    for special in ("<img>", "</img>", "<pad>", "<bos>", "<eos>"):
        assert tok.tokenize(special) == [special]
    assert tok.tokenize("01120") == ["0", "1", "1", "2", "0"]  # layout digits are one token each
    m = load("music_llm").model
    assert m.config.hidden_size == 128 and m.config.num_hidden_layers == 2
    assert m.config.num_attention_heads == 4 and m.config.num_key_value_heads == 2
    assert not m.config.tie_word_embeddings and m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()


def test_vlm_forward_with_image(load):
    import torch

    h = load("vlm")
    assert type(h.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(h.processor).__name__ == "Qwen2_5_VLProcessor"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this a cat?"}]}]
    text = h.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = h.processor(images=[_image()], text=[text], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == h.model.config.image_token_id).sum())
    assert n_image_tokens == int(inputs["image_grid_thw"].prod()) // 4  # 2x2 patch merge
    with torch.no_grad():
        out = h.model(**inputs)
        gen = h.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], h.model.config.text_config.vocab_size)
    assert gen.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_flux_t2i_renders_64px(load):
    import torch

    h = load("t2i")
    assert type(h.pipe).__name__ == "FluxPipeline"
    out = h.pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                 max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_flux_kontext_i2i_edits(load):
    import torch

    h = load("i2i")
    assert type(h.pipe).__name__ == "FluxKontextPipeline"
    out = h.pipe(image=_image(), prompt="make the cat blue", height=64, width=64, num_inference_steps=2,
                 guidance_scale=2.5, max_sequence_length=32, max_area=64 * 64, _auto_resize=False,
                 generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


def test_grounding_dino_boxes(load):
    import torch

    h = load("detector")
    image = _image(80, 60)
    inputs = h.processor(images=image, text=[["a cat", "a remote control"]], return_tensors="pt")
    with torch.no_grad():
        out = h.model(**inputs)
    res = h.processor.post_process_grounded_object_detection(
        out, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[image.size[::-1]])[0]
    assert out.pred_boxes.shape == (1, h.model.config.num_queries, 4)
    assert res["boxes"].shape[1] == 4 and len(res["boxes"]) == len(res["scores"]) > 0
    assert (res["boxes"][:, 2:] >= res["boxes"][:, :2] - 1e-4).all()


def test_sam2_mask_from_box(load):
    import torch

    h = load("segmenter")
    image = _image(80, 96)  # W=80, H=96
    inputs = h.processor(images=image, input_boxes=[[[10, 20, 60, 80]]], return_tensors="pt")
    with torch.no_grad():
        out = h.model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
    masks = h.processor.post_process_masks(out.pred_masks, inputs["original_sizes"])[0]
    assert out.iou_scores.shape == (1, 1, 1)
    assert masks.shape == (1, 1, 96, 80) and masks.dtype == torch.bool


@pytest.mark.parametrize("role", ["clip", "eval_clip", "select_clip"])
def test_open_clip_embeds(load, role):
    import torch

    h = load(role)
    assert type(h.model).__name__ == "CLIP" and h.name.endswith(role)
    images = torch.stack([h.preprocess(_image(90, 70, seed=s)) for s in range(2)])
    with torch.no_grad():
        fi = h.model.encode_image(images, normalize=True)
        ft = h.model.encode_text(h.tokenizer(["a photo of a cat", "a dog", "a red car"]), normalize=True)
    assert fi.shape == (2, 32) and ft.shape == (3, 32)
    assert torch.allclose(fi.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_the_three_clips_differ(load):
    """The data stages' CLIP, the evaluation's and MUSIC*'s selection encoder are three random models: choosing
    MUSIC*'s branch with `select_clip` is not choosing it with the CLIP that scores CLIP-T."""
    weights = {r: load(r).model.state_dict() for r in ("clip", "eval_clip", "select_clip")}
    for a, b in (("clip", "eval_clip"), ("clip", "select_clip"), ("eval_clip", "select_clip")):
        assert not all(np.array_equal(weights[a][k].numpy(), weights[b][k].numpy()) for k in weights[a]), (a, b)


def test_dino_cls_token_at_224(load):
    import torch

    from music_dagster.evaluation.metrics import dino_preprocess

    h = load("dino")  # timm's DINO ViT-S/16 layout: no head, the final norm over every token
    assert type(h.model).__name__ == "VisionTransformer" and h.model.num_classes == 0
    x = dino_preprocess(_image(256, 256))[None]
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        tokens = h.model.forward_features(x)
        pooled = h.model.forward_head(tokens, pre_logits=True)
    assert tokens.shape == (1, 1 + 14 * 14, h.model.embed_dim)
    assert torch.equal(pooled, tokens[:, 0])  # the feature DINO scores: the CLS token after the final norm


def test_siglip_patch_tokens(load):
    import torch

    h = load("music_vision")
    inputs = h.processor(images=[_image(100, 80)], return_tensors="pt")
    with torch.no_grad():
        out = h.model(**inputs)
    assert out.last_hidden_state.shape == (1, 64, 64)  # 8x8 patches of 8 px, hidden 64


def test_unet_noise_prediction(load):
    import torch

    h = load("music_unet")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eps = h.unet(x, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 64, 64)).sample
    assert eps.shape == x.shape


def test_two_builds_are_byte_identical(tmp_path):
    roles = ["t2i", "music_llm", "clip", "detector"]  # every tokenizer kind and both save formats
    a = build_zoo(seed=3, roles=roles, root=tmp_path / "a")
    b = build_zoo(seed=3, roles=roles, root=tmp_path / "b")
    for role in roles:
        assert file_hashes(a[role]) == file_hashes(b[role])
    assert (tmp_path / "a" / "zoo.json").read_bytes() == (tmp_path / "b" / "zoo.json").read_bytes()
    c = build_zoo(seed=4, roles=["music_llm"], root=tmp_path / "c")
    assert file_hashes(c["music_llm"]) != file_hashes(a["music_llm"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([".lock", "zoo.json", *roles])


def test_rebuild_replaces_role_atomically(tmp_path):
    build_zoo(seed=0, roles=["dino"], root=tmp_path)
    (tmp_path / "dino" / "stale.txt").write_text("x")
    build_zoo(seed=0, roles=["dino"], root=tmp_path)
    assert not (tmp_path / "dino" / "stale.txt").exists()
    assert json.loads((tmp_path / "zoo.json").read_text())["roles"]["dino"]["class"] == "VisionTransformer"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "dino", "zoo.json"]


def test_unknown_role_is_refused(tmp_path):
    with pytest.raises(ZooError, match="unknown role 'gpt'"):
        build_zoo(roles=["gpt"], root=tmp_path)
    assert not (tmp_path / "zoo.json").exists()


def test_pickle_only_folder_is_refused(tiny_zoo, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "llm"
    shutil.copytree(tiny_zoo["llm"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(LoaderError, match=r"only pickle weights \(\.bin\)") as e:
        load_role("llm", ModelSpec(id=str(folder)), "cpu", "float32")
    assert "\n" not in str(e.value)


def test_pickle_component_of_a_pipeline_is_refused(tiny_zoo, tmp_path):
    folder = tmp_path / "t2i"
    shutil.copytree(tiny_zoo["t2i"], folder)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    vae.rename(vae.with_suffix(".bin"))
    with pytest.raises(LoaderError, match="t2i/vae has only pickle weights"):
        load_role("t2i", ModelSpec(id=str(folder)), "cpu", "float32")


def test_missing_folder_names_the_zoo_command(tmp_path):
    with pytest.raises(LoaderError, match="music zoo build"):
        load_role("dino", ModelSpec(id=str(tmp_path / "nope")), "cpu", "float32")


def test_half_precision_stays_float32_on_cpu(load, tiny_zoo):
    import torch

    h = load_role("music_vision", ModelSpec(id=str(tiny_zoo["music_vision"])), "cpu", "bfloat16")
    assert h.dtype == torch.float32 and next(h.model.parameters()).dtype == torch.float32
    with pytest.raises(LoaderError, match="dtype: unknown dtype 'int8'"):
        load_role("music_vision", ModelSpec(id=str(tiny_zoo["music_vision"])), "cpu", "int8")


@pytest.mark.slow
def test_zoo_asset_materializes_with_metadata(tiny_zoo):
    import dagster as dg

    from music_dagster.assets.zoo import tiny_model_zoo, zoo_files_match_manifest
    from music_dagster.resources import ProjectConfig

    before = {role: file_hashes(folder) for role, folder in tiny_zoo.items()}
    # the project's own config, as the code location builds it: the zoo asset rebuilds the project's tiny zoo
    result = dg.materialize([tiny_model_zoo, zoo_files_match_manifest],
                            resources={"project": ProjectConfig.from_environment()})
    assert result.success
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["dino/class"].value == "VisionTransformer" and meta["music_unet/parameters"].value > 0
    assert meta["total_parameters"].value == sum(meta[f"{r}/parameters"].value for r in ROLES)
    assert [c.passed for c in result.get_asset_check_evaluations()] == [True]
    # same seed: the project's zoo keeps the same bytes
    assert {role: file_hashes(folder) for role, folder in tiny_zoo.items()} == before


@pytest.mark.parametrize("role, hub_id", [("llm", "Qwen/Qwen3-8B"),
                                          ("clip", "hf-hub:timm/vit_large_patch14_clip_224.openai"),
                                          ("dino", "hf-hub:timm/vit_small_patch16_224.dino")])
def test_uncached_hub_id_offline_is_one_line_error(role, hub_id, monkeypatch, tmp_path):
    from huggingface_hub import constants

    # huggingface_hub reads these variables once, at import: set its constants too, so neither a real cache nor a
    # shell with HF_HUB_OFFLINE=0 can turn this test into a load or a download of a real checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LoaderError, match=f"{role}: cannot load {hub_id}") as e:
        load_role(role, ModelSpec(id=hub_id), "cpu", "float32")
    assert "\n" not in str(e.value)


def test_folder_without_config_is_one_line_error(tiny_zoo, tmp_path):
    folder = tmp_path / "dino"
    shutil.copytree(tiny_zoo["dino"], folder)
    (folder / "config.json").unlink()
    with pytest.raises(LoaderError, match="dino: cannot load") as e:
        load_role("dino", ModelSpec(id=str(folder)), "cpu", "float32")
    assert "\n" not in str(e.value)


def test_a_local_folder_loads_without_progress_bars_and_leaves_them_as_they_were(tiny_zoo, capfd):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (transformers_logging, diffusers_logging)
    assert all(lib.is_progress_bar_enabled() for lib in libraries)
    for role in ("music_llm", "t2i"):  # a transformers model; a diffusers pipeline of transformers models
        load_role(role, ModelSpec(id=str(tiny_zoo[role])), "cpu", "float32")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Loading pipeline components" not in err, err
    assert all(lib.is_progress_bar_enabled() for lib in libraries)  # on again for a Hub download after it

    transformers_logging.disable_progress_bar()  # a user who turned them off keeps them off
    try:
        load_role("music_llm", ModelSpec(id=str(tiny_zoo["music_llm"])), "cpu", "float32")
        assert not transformers_logging.is_progress_bar_enabled() and diffusers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
