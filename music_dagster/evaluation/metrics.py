"""DINO, CLIP-I and CLIP-T: the subject-fidelity and text-alignment scores of DreamBench and MSIC.

Every score is the cosine of L2-normalised embeddings on the raw 0..1 scale (no CLIPScore 2.5 or 100 factor).
DINO is the last layer's CLS token, after the final norm, of a ViT-S/16 (timm's `vit_small_patch16_224.dino`) on
the DreamBooth protocol (shorter side to 256 bicubic, centre crop 224, ImageNet normalisation), done here whatever
the checkpoint's own config says; CLIP uses open_clip's eval transform of the variant in use (embedded by
`clip_similarity`, normalised in float64), and the variant's name goes into every score record.
Reference images are embedded once per file (cache keyed by path and content hash) and reused for every
generated image compared to them. torch is imported inside functions.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE = 256
DINO_CROP = 224
METRICS = ("dino", "clip_i", "clip_t")


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """The shorter side to `size` (bicubic), the aspect kept: torchvision's `Resize(size)` on a PIL image."""
    from PIL import Image

    w, h = image.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return image.resize(new, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central `size` x `size` square (offsets rounded as torchvision's `CenterCrop`)."""
    w, h = image.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def dino_preprocess(image: Image.Image) -> torch.Tensor:
    """One image as the DINO protocol's input: float32 (3, 224, 224), ImageNet-normalised."""
    import numpy as np
    import torch

    image = center_crop(resize_shorter(image.convert("RGB"), DINO_RESIZE), DINO_CROP)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All pairwise cosines of two stacks of L2-normalised embeddings: (N, D) x (M, D) -> (N, M), float64."""
    return a.double() @ b.double().T


def file_key(path: str | Path) -> tuple[str, str]:
    """A reference image's cache key: its resolved path and the sha256 of its bytes (an edited file misses)."""
    path = Path(path).resolve()
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Embeddings:
    """L2-normalised float64 embeddings of the same images by both image encoders."""

    dino: Any  # torch.Tensor (N, D_dino)
    clip: Any  # torch.Tensor (N, D_clip)

    def __len__(self) -> int:
        return int(self.dino.shape[0])


@dataclass
class Embedder:
    """The three evaluation encoders over the `dino` and `eval_clip` model handles, batched, with a reference cache.

    `dino_name` and `clip_name` are what score records say was used (config ids, not local absolute paths).
    `cache=False` recomputes reference embeddings on every call (the benchmark's baseline).
    """

    dino: Any
    clip: Any
    dino_name: str
    batch_size: int = 16
    cache: bool = True
    _refs: dict = field(default_factory=dict, repr=False)

    @property
    def clip_name(self) -> str:
        return str(self.clip.name)

    @property
    def encoders(self) -> dict[str, str]:
        """What a score record names: the DINO checkpoint and the CLIP variant."""
        return {"dino_model": self.dino_name, "clip_variant": self.clip_name}

    def _batched(self, items: Sequence, prepare, encode) -> torch.Tensor:
        import torch

        out = []
        for start in range(0, len(items), self.batch_size):
            batch = torch.stack([prepare(x) for x in items[start:start + self.batch_size]])
            with torch.inference_mode():
                out.append(torch.nn.functional.normalize(encode(batch).double(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)

    def _dino_encode(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device=self.dino.device, dtype=self.dino.dtype)
        # The CLS token of the last layer, after the final norm (timm's `forward_features` applies it to every token).
        return self.dino.model.forward_features(batch)[:, 0].float()

    def dino_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self._batched(images, dino_preprocess, self._dino_encode)

    def clip_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        import torch

        from music_dagster.zoo.clip_similarity import embed_images

        return embed_images(self.clip, images, self.batch_size, torch.float64).cpu()

    def clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        import torch

        from music_dagster.zoo.clip_similarity import embed_texts

        return embed_texts(self.clip, texts, self.batch_size, torch.float64).cpu()

    def images(self, images: Sequence[Image.Image]) -> Embeddings:
        """Both image embeddings of generated images (or crops of them): never cached."""
        return Embeddings(self.dino_images(images), self.clip_images(images))

    def references(self, paths: Sequence[str | Path]) -> Embeddings:
        """Both image embeddings of reference files, each file encoded once per (path, content) while cached."""
        import torch

        from music_dagster.images import read_image

        keys = [file_key(p) for p in paths]
        todo = list(dict.fromkeys(k for k in keys if k not in self._refs)) if self.cache else list(dict.fromkeys(keys))
        fresh = {}
        if todo:
            emb = self.images([read_image(k[0]) for k in todo])
            fresh = {k: (emb.dino[i], emb.clip[i]) for i, k in enumerate(todo)}
            if self.cache:
                self._refs.update(fresh)
        table = self._refs if self.cache else fresh
        return Embeddings(torch.stack([table[k][0] for k in keys]), torch.stack([table[k][1] for k in keys]))

    @property
    def cached_references(self) -> int:
        return len(self._refs)


def image_scores(generated: Embeddings, references: Embeddings) -> dict[str, list[float]]:
    """Per generated image, the mean DINO and CLIP-I cosine against every reference image."""
    return {
        "dino": cosine(generated.dino, references.dino).mean(dim=1).tolist(),
        "clip_i": cosine(generated.clip, references.clip).mean(dim=1).tolist(),
    }


def text_scores(generated: Embeddings, texts: torch.Tensor) -> list[float]:
    """CLIP-T of each generated image against its own text (row i against text i)."""
    return (generated.clip.double() * texts.double()).sum(dim=1).tolist()


def mean(values: Sequence[float]) -> float | None:
    """The arithmetic mean, None for no values (a table cell that has nothing to average)."""
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None
