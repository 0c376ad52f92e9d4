"""CLIP image-text similarity: the one implementation of embedding images and texts with a CLIP handle (`.model`,
`.preprocess`, `.tokenizer`, `.device`, `.dtype`) and of the cosine between them.

Used by the data graph (`synthesis.masks`: Sim_mask and Sim_unmask), MUSIC* (`generate`: the branch kept is the one
whose image scores best against the prompt) and the evaluation (`evaluation.metrics`: CLIP-I and CLIP-T embeddings).
They differ in one documented parameter, `dtype`, where the embeddings are L2-normalised:

- `None`: in the model's own dtype, as open_clip's `encode_*(normalize=True)` does (the data graph's masks);
- `torch.float32`: the features cast to float32 first (MUSIC*'s branch choice);
- `torch.float64`: cast to float64 first (the evaluation scores, which average many cosines).

In a float32 profile the first two are the same numbers. Encoding runs in batches of `batch_size` (None: one batch);
every image is taken as RGB. torch is imported inside functions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch


def _encode(items: Sequence, batch_size: int | None, prepare: Callable, encode: Callable, dtype) -> torch.Tensor:
    import torch

    size = batch_size or max(len(items), 1)
    out = []
    for start in range(0, len(items), size):
        batch = prepare(items[start:start + size])
        with torch.inference_mode():
            features = encode(batch)
        out.append(torch.nn.functional.normalize(features if dtype is None else features.to(dtype), dim=-1))
    return torch.cat(out) if out else torch.empty(0, 0, dtype=dtype or torch.float32)


def embed_images(clip, images: Sequence, batch_size: int | None = None, dtype=None) -> torch.Tensor:
    """L2-normalised CLIP embeddings of `images` (N, D), on the handle's device, normalised in `dtype`."""
    import torch

    def prepare(chunk):
        return torch.stack([clip.preprocess(im.convert("RGB")) for im in chunk]).to(clip.device, dtype=clip.dtype)

    return _encode(images, batch_size, prepare, clip.model.encode_image, dtype)


def embed_texts(clip, texts: Sequence[str], batch_size: int | None = None, dtype=None) -> torch.Tensor:
    """L2-normalised CLIP embeddings of `texts` (N, D), on the handle's device, normalised in `dtype`."""
    return _encode(list(texts), batch_size, lambda chunk: clip.tokenizer(list(chunk)).to(clip.device),
                   clip.model.encode_text, dtype)


def image_text_scores(clip, images: Sequence, texts: str | Sequence[str], batch_size: int | None = None,
                      dtype=None) -> list[float]:
    """The cosine of each image with its text, in float32: with one text (a `str`), every image against it (one
    text embedding, a matrix-vector product); with a list, image i against text i (row-wise products)."""
    images_emb = embed_images(clip, images, batch_size, dtype).float()
    if isinstance(texts, str):
        text_emb = embed_texts(clip, [texts], None, dtype).float()
        return (images_emb @ text_emb.T)[:, 0].tolist()
    return (images_emb * embed_texts(clip, texts, batch_size, dtype).float()).sum(dim=-1).cpu().tolist()
