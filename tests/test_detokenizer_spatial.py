"""`detokenizer.spatial_conditioning` and `detokenizer.prediction_type`: the token grid as zero-initialised
ControlNet-style residuals, and a UNet that predicts the clean image."""
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


def _detok(config, **settings):
    torch.manual_seed(0)
    return Detokenizer(load_model(config, "music_unet").unet,
                       DetokenizerSettings(token_dim=64, resampler_queries=4, **settings))


def test_spatial_path_starts_neutral_learns_and_round_trips(config, tmp_path):
    plain, spatial = _detok(config), _detok(config, spatial_conditioning=True)
    assert plain.spatial is None and any(k.startswith("spatial.") for k in spatial.trainable_state_dict())
    x, t, tokens = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.randn(2, 16, 64)
    with torch.no_grad():  # zero-initialised: the same UNet output as without the path
        a = plain.unet(x, t, **plain.condition(tokens)).sample
        b = spatial.unet(x, t, **spatial.condition(tokens)).sample
    assert torch.allclose(a, b)
    spatial(torch.rand(2, 3, 32, 32) * 2 - 1, tokens).backward()
    assert all(conv.weight.grad.abs().sum() > 0 for conv in spatial.spatial.proj)
    with torch.no_grad():
        for conv in spatial.spatial.proj:
            conv.weight.normal_()  # as if trained: the grid now changes the output, and is saved and loaded
    images = spatial.decode(tokens, seed=1, steps=2)
    loaded = Detokenizer.from_pretrained(spatial.save_pretrained(tmp_path / "d"))
    assert loaded.spatial is not None
    assert [np.asarray(im).tobytes() for im in loaded.decode(tokens, seed=1, steps=2)] == \
        [np.asarray(im).tobytes() for im in images]
    assert np.asarray(plain.decode(tokens, seed=1, steps=2)[0]).tobytes() != np.asarray(images[0]).tobytes()
    with pytest.raises(DetokenizerError, match="square number of visual tokens, got 15"):
        spatial.condition(torch.randn(1, 15, 64))


def test_sample_prediction_regresses_the_image(config):
    detok = _detok(config, prediction_type="sample")
    assert detok.noise.config.prediction_type == "sample"
    x0, noise, t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32), torch.tensor([100, 900])
    tokens = torch.randn(2, 16, 64)
    with torch.no_grad():
        pred = detok.unet(detok.noise.add_noise(x0, noise, t), t, **detok.condition(tokens)).sample
        expected = torch.nn.functional.mse_loss(pred, x0)
        assert detok.noise_loss(x0, tokens, t, noise).item() == pytest.approx(expected.item())
    assert [im.size for im in detok.decode(tokens, steps=2)] == [(32, 32)] * 2
