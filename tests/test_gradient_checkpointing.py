"""`train.gradient_checkpointing` / `detokenizer.gradient_checkpointing`: the backbone's decoder layers and the
UNet's blocks are recomputed in the backward pass, and one training step gives the same loss and gradients as
without (within float tolerance: the recomputation runs the same kernels on the same inputs)."""
import pytest
import torch

from music_dagster.config import load_config
from music_dagster.model.procedural import procedural_samples
from music_dagster.model.runtime import flush_denormals
from music_dagster.training.train import build_detokenizer, build_model


@pytest.fixture(scope="module")
def config(tiny_zoo):
    torch.set_num_threads(1)
    cfg = load_config(profile="tiny").with_values("train", input_queries=4, image_queries=4, lora_rank=4, lora_alpha=8,
                max_plan_tokens=8)
    return cfg.with_values("detokenizer", resampler_queries=4)


@pytest.fixture(scope="module")
def samples():
    return procedural_samples(2, seed=0)


def _calls(modules: dict) -> dict[str, int]:
    """Forward calls per named module: a module inside a checkpointed block runs twice per step (the recomputation
    calls it again; counted by a pre-hook, since torch stops a recomputation once it has what backward needs)."""
    calls = dict.fromkeys(modules, 0)
    for name, m in modules.items():
        m.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _music_step(config, samples, checkpointing: bool):
    cfg = config.with_values("train", gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    calls = _calls({f"layers.{i}.mlp": layer.mlp for i, layer in enumerate(model.llm.get_base_model().model.layers)})
    with flush_denormals():
        out = model(model.collate([model.encode(s) for s in samples]))
        out["loss"].backward()
    return float(out["loss"].detach()), _grads(model), set(calls.values())


def test_music_checkpointing_recomputes_layers_with_the_same_loss_and_gradients(config, samples):
    loss_off, grads_off, passes_off = _music_step(config, samples, False)
    loss_on, grads_on, passes_on = _music_step(config, samples, True)
    assert (passes_off, passes_on) == ({1}, {2})  # each decoder layer ran again in backward
    assert loss_on == pytest.approx(loss_off, rel=1e-6, abs=1e-7)
    assert grads_on.keys() == grads_off.keys() and any("lora_" in n for n in grads_on)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _detokenizer_step(config, samples, checkpointing: bool):
    from diffusers.models.resnet import ResnetBlock2D

    from music_dagster.model.music import target_tokens
    from music_dagster.model.runtime import load_model

    cfg = config.with_values("detokenizer", gradient_checkpointing=checkpointing)
    vision = load_model(cfg, "music_vision")
    torch.manual_seed(0)
    detok = build_detokenizer(cfg, vision=vision).train()
    calls = _calls({n: m.conv1 for n, m in detok.unet.named_modules() if isinstance(m, ResnetBlock2D)})
    images = [s.target for s in samples]
    tokens = target_tokens(vision.model, vision.processor, images, cfg.profile.train.image_queries)
    torch.manual_seed(1)  # the same timesteps and noise in both runs
    with flush_denormals():
        loss = detok(detok.preprocess(images), tokens)
        loss.backward()
    return float(loss.detach()), _grads(detok), calls


def test_detokenizer_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients(config, samples):
    loss_off, grads_off, passes_off = _detokenizer_step(config, samples, False)
    loss_on, grads_on, passes_on = _detokenizer_step(config, samples, True)
    assert set(passes_off.values()) == {1}
    # every resnet block ran again in backward, but the mid block's first, which diffusers runs unchecked
    assert {n for n, c in passes_on.items() if c != 2} == {"mid_block.resnets.0"} and len(passes_on) > 4
    assert loss_on == pytest.approx(loss_off, rel=1e-6, abs=1e-7)
    assert grads_on.keys() == grads_off.keys() and any(n.startswith("unet.") for n in grads_on)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-7, msg=name)
