"""The de-tokenizer: UNet + token resampler (+ VAE for latent UNets); decoding, persistence, and that it learns."""
import numpy as np
import pytest
import torch

from music_dagster.config import load_config
from music_dagster.model.detokenizer import Detokenizer, DetokenizerError, DetokenizerSettings
from music_dagster.model.runtime import load_model


@pytest.fixture(scope="module")
def config(tiny_zoo):
    torch.set_num_threads(1)
    return load_config(profile="tiny")


def _detok(config, seed=0, **settings):
    torch.manual_seed(seed)
    unet = load_model(config, "music_unet").unet
    return Detokenizer(unet, DetokenizerSettings(token_dim=64, resampler_queries=4, **settings))


def test_loss_decode_and_round_trip(config, tmp_path):
    detok = _detok(config)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = torch.randn(2, 16, 64)
    loss = detok(pixels, tokens)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert detok.resampler.queries.grad is not None
    a = detok.decode(tokens, seed=3, steps=3)
    assert [im.size for im in a] == [(32, 32)] * 2 and a[0].mode == "RGB"
    assert [np.asarray(im).tobytes() for im in detok.decode(tokens, seed=3, steps=3)] == \
        [np.asarray(im).tobytes() for im in a]
    assert np.asarray(detok.decode(tokens, seed=4, steps=3)[0]).tobytes() != np.asarray(a[0]).tobytes()

    saved = detok.save_pretrained(tmp_path / "detok")
    assert (saved / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = Detokenizer.from_pretrained(saved)
    assert [np.asarray(im).tobytes() for im in loaded.decode(tokens, seed=3, steps=3)] == \
        [np.asarray(im).tobytes() for im in a]


def test_bad_input(config, tmp_path):
    detok = _detok(config)
    with pytest.raises(DetokenizerError, match=r"visual tokens must be \[B, Q, 64\]"):
        detok.decode(torch.zeros(1, 4, 32))
    with pytest.raises(DetokenizerError, match="does not exist"):
        Detokenizer.from_pretrained(tmp_path / "none")
    saved = detok.save_pretrained(tmp_path / "d")
    (saved / "detokenizer_modules.safetensors").unlink()
    with pytest.raises(DetokenizerError, match="detokenizer_modules.safetensors is missing"):
        Detokenizer.from_pretrained(saved)
    saved = detok.save_pretrained(tmp_path / "d")
    weights = saved / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the header still reads: only the recorded sha256 tells
    weights.write_bytes(bytes(data))
    with pytest.raises(DetokenizerError, match=f"{weights}: content differs from the sha256 detokenizer_config.json"):
        Detokenizer.from_pretrained(saved)


def _sdxl_like_unet(in_channels):
    """A tiny UNet with SDXL's conditioning (pooled embedding + size/crop ids)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 24,
    )


def test_latent_sdxl_style_unet_with_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    settings = DetokenizerSettings(token_dim=64, resampler_queries=4)
    with pytest.raises(DetokenizerError, match="configure detokenizer.vae"):
        Detokenizer(_sdxl_like_unet(4), settings)
    detok = Detokenizer(_sdxl_like_unet(4), settings, vae=vae)
    assert detok.image_size == 16 and detok.pooled.out_features == 24
    loss = detok(torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 64))
    assert torch.isfinite(loss)
    loss.backward()
    assert detok.pooled.weight.grad is not None and all(p.grad is None for p in vae.parameters())
    assert [im.size for im in detok.decode(torch.randn(1, 4, 64), steps=2)] == [(16, 16)]


@pytest.mark.slow
@pytest.mark.long
def test_detokenizer_learns_and_reads_its_conditioning(config, tmp_path):
    """Reconstruction training on the procedural world's targets: the loss falls, and on held-out images the
    noise is predicted better with each image's own visual tokens than with another image's (paired: same
    images, noise and timesteps: lower on average at each of three timesteps, for over 65% of the image-timestep
    pairs, with a paired z above 3)."""
    from music_dagster.model.music import target_tokens
    from music_dagster.model.procedural import procedural_samples
    from music_dagster.training.train import train_detokenizer

    cfg = config.with_values("detokenizer", max_steps=STEPS, epochs=10 ** 6, checkpoint_every=10 ** 6, batch_size=16)
    result = train_detokenizer(cfg, [procedural_samples(256, seed=0)], tmp_path / "run")
    losses = [e["loss"] for e in result.history]
    assert np.mean(losses[-25:]) < 0.2 * np.mean(losses[:25])

    detok = Detokenizer.from_pretrained(result.model_dir)
    vision = load_model(cfg, "music_vision")
    images = [s.target for s in procedural_samples(48, seed=0, start=10 ** 5)]
    tokens = target_tokens(vision.model, vision.processor, images, cfg.profile.train.image_queries)
    x0 = detok.preprocess(images)
    g = torch.Generator().manual_seed(0)
    gaps = []
    with torch.no_grad():
        for t in (100, 300, 500):
            noise = torch.randn(x0.shape, generator=g)
            steps = torch.full((len(x0),), t)
            xt = detok.noise.add_noise(x0, noise, steps)
            own = (detok.unet(xt, steps, **detok.condition(tokens)).sample - noise).pow(2).mean((1, 2, 3))
            other = (detok.unet(xt, steps, **detok.condition(tokens.roll(1, 0))).sample - noise).pow(2).mean((1, 2, 3))
            assert own.mean() < other.mean(), (t, own.mean().item(), other.mean().item())
            gaps.append(other - own)
    gap = torch.cat(gaps)
    z = gap.mean() / (gap.std() / len(gap) ** 0.5)
    assert z > 3 and (gap > 0).float().mean() > 0.65, (z.item(), (gap > 0).float().mean().item())


STEPS = 400
