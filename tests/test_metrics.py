"""DINO / CLIP-I / CLIP-T on the tiny zoo's `dino` and `eval_clip`: protocol preprocessing, self-similarity, an
independent CLIP-T computation, batching and the reference cache."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from music_dagster.evaluation import metrics

torch.set_num_threads(1)
DOG = "dog/00.jpg"


@pytest.fixture(scope="module")
def handles(tiny_zoo, make_project):
    from music_dagster.zoo.loaders import load_role

    cfg = make_project().get()
    return {r: load_role(r, cfg.models[r], "cpu", "float32") for r in ("dino", "eval_clip")}


@pytest.fixture(scope="module")
def embedder(handles):
    return metrics.Embedder(handles["dino"], handles["eval_clip"], dino_name="models/tiny/dino", batch_size=4)


@pytest.fixture(scope="module")
def photo(make_project):
    path = make_project().get().dreambench_dir / DOG  # the repository's subset
    return Image.open(path).convert("RGB").resize((384, 512))  # portrait, so the crop offsets matter


def _noise(seed, size=(80, 60)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_dino_preprocess_known_uniform_image():
    colour = (200, 100, 50)
    x = metrics.dino_preprocess(Image.new("RGB", (300, 400), colour))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    for c in range(3):
        expected = (colour[c] / 255 - metrics.IMAGENET_MEAN[c]) / metrics.IMAGENET_STD[c]
        assert torch.allclose(x[c], torch.full_like(x[c], expected), atol=1e-5)


def test_dino_preprocess_matches_torchvision_protocol(photo):
    from torchvision import transforms as T

    protocol = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                          T.Normalize(metrics.IMAGENET_MEAN, metrics.IMAGENET_STD)])
    assert metrics.resize_shorter(photo, 256).size == (256, 341)
    x = metrics.dino_preprocess(photo)
    assert torch.allclose(x, protocol(photo), atol=1e-5)
    for c in range(3):  # inside ImageNet-normalised [0, 1], and really spread over it
        lo = (0 - metrics.IMAGENET_MEAN[c]) / metrics.IMAGENET_STD[c]
        hi = (1 - metrics.IMAGENET_MEAN[c]) / metrics.IMAGENET_STD[c]
        assert lo - 1e-5 <= x[c].min() < x[c].max() <= hi + 1e-5
        assert x[c].max() - x[c].min() > 0.5 * (hi - lo)


def test_clip_preprocess_is_clip_protocol(handles, photo):
    import open_clip
    from torchvision import transforms as T

    clip = handles["eval_clip"]
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = clip.preprocess(photo)
    assert x.shape == (3, size, size)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    protocol = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                          T.Normalize(mean, std)])
    assert torch.allclose(x, protocol(photo), atol=1e-5)
    uniform = clip.preprocess(Image.new("RGB", (300, 200), (10, 128, 250)))
    for c, v in enumerate((10, 128, 250)):
        assert torch.allclose(uniform[c], torch.full_like(uniform[c], (v / 255 - mean[c]) / std[c]), atol=1e-5)


def test_identical_images_score_one(embedder, tmp_path):
    path = tmp_path / "ref.png"
    image = _noise(0)
    image.save(path)
    scores = metrics.image_scores(embedder.images([image]), embedder.references([path]))
    assert abs(scores["dino"][0] - 1.0) < 1e-6 and abs(scores["clip_i"][0] - 1.0) < 1e-6
    other = metrics.image_scores(embedder.images([_noise(1)]), embedder.references([path]))
    assert other["dino"][0] < 1 - 1e-4 and other["clip_i"][0] < 1 - 1e-4


def _block(x, blk, mask=None):
    """One pre-LN transformer block written out from its weights (no open_clip forward)."""
    h = F.layer_norm(x, blk.ln_1.normalized_shape, blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    q, k, v = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
    b, n, d = q.shape
    heads = blk.attn.num_heads
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        att = att + mask
    out = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + F.linear(out, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
    h = F.layer_norm(x, blk.ln_2.normalized_shape, blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
    return x + blk.mlp.c_proj(blk.mlp.gelu(blk.mlp.c_fc(h)))


def _ln(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _clip_t_by_hand(model, tokens, pixels):
    vis = model.visual
    x = F.conv2d(pixels, vis.conv1.weight, stride=vis.conv1.stride).flatten(2).transpose(1, 2)
    x = torch.cat([vis.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + vis.positional_embedding
    x = _ln(x, vis.ln_pre)
    for blk in vis.transformer.resblocks:
        x = _block(x, blk)
    img = _ln(x, vis.ln_post)[:, 0] @ vis.proj
    n = tokens.shape[1]
    t = model.token_embedding.weight[tokens] + model.positional_embedding
    causal = torch.full((n, n), float("-inf")).triu(1)
    for blk in model.transformer.resblocks:
        t = _block(t, blk, causal)
    txt = _ln(t, model.ln_final)[torch.arange(t.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    img, txt = img.double(), txt.double()
    return ((img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))).tolist()


def test_clip_t_agrees_with_independent_computation(handles, embedder):
    clip = handles["eval_clip"]
    images = [_noise(2), _noise(3, (64, 96))]
    texts = ["a photo of a dog in the snow", "two cats and a red teapot on a wooden table"]
    ours = metrics.text_scores(embedder.images(images), embedder.clip_texts(texts))
    pixels = torch.stack([clip.preprocess(im) for im in images])
    with torch.no_grad():
        theirs = _clip_t_by_hand(clip.model, clip.tokenizer(texts), pixels)
    assert np.allclose(ours, theirs, atol=1e-5)
    assert all(-1 <= v <= 1 for v in ours) and abs(ours[0] - ours[1]) > 1e-6


def test_batching_does_not_change_embeddings(handles):
    images = [_noise(i) for i in range(5)]
    small = metrics.Embedder(handles["dino"], handles["eval_clip"], "d", batch_size=2).images(images)
    large = metrics.Embedder(handles["dino"], handles["eval_clip"], "d", batch_size=16).images(images)
    assert torch.allclose(small.dino, large.dino, atol=1e-6) and torch.allclose(small.clip, large.clip, atol=1e-6)
    assert torch.allclose(small.dino.norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_reference_cache_keyed_by_path_and_content(handles, tmp_path, monkeypatch):
    e = metrics.Embedder(handles["dino"], handles["eval_clip"], "d")
    path = tmp_path / "ref.png"
    _noise(4).save(path)
    calls = []
    real = e.images
    monkeypatch.setattr(e, "images", lambda ims: calls.append(len(ims)) or real(ims))
    first = e.references([path, path])
    again = e.references([path])
    assert calls == [1] and e.cached_references == 1
    assert torch.equal(first.dino[0], again.dino[0])
    _noise(5).save(path)  # same path, new content: a miss
    changed = e.references([path])
    assert calls == [1, 1] and not torch.allclose(changed.dino[0], first.dino[0])
    nocache = metrics.Embedder(handles["dino"], handles["eval_clip"], "d", cache=False)
    assert torch.allclose(nocache.references([path]).dino, changed.dino) and nocache.cached_references == 0


def test_encoders_named(embedder, handles):
    assert embedder.encoders == {"dino_model": "models/tiny/dino", "clip_variant": handles["eval_clip"].name}
