"""The de-tokenizer: visual tokens -> image, SEED-X's design.

A diffusers `UNet2DConditionModel` (`music_unet`: a tiny pixel-space UNet here, SDXL's UNet in the full profile)
is conditioned on the visual tokens (vision features of an image pooled to `image_queries` tokens, what MUSIC's
output resampler predicts) through a perceiver resampler feeding its cross-attention. SDXL-style UNets
(`addition_embed_type == "text_time"`) also get a pooled embedding of the resampled tokens and the size/crop ids.
A UNet with `in_channels != 3` works in the latent space of an `AutoencoderKL` (`detokenizer.vae` in config).

Trained by reconstruction (`training.train_detokenizer`): DDPM noise prediction on target images, conditioned on
those images' own visual tokens; decoded with DDIM (`Detokenizer.decode`). Frozen while MUSIC trains.
Saved as `unet/` (diffusers `save_pretrained`, safetensors), `detokenizer_modules.safetensors` (resampler and
pooled projection) and `detokenizer_config.json` (the settings and the sha256 of every weight file, verified at load).

This module imports torch at its top: import it inside asset functions.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from music_dagster.errors import UserError
from music_dagster.model.music import (
    SHA256_SCHEMA, Resampler, check_tensors, safetensors_shapes, verify_weights, weight_hashes,
)
from music_dagster.storage import read_json, staged_dir

CONFIG_FILE = "detokenizer_config.json"
MODULES_FILE = "detokenizer_modules.safetensors"
UNET_DIR = "unet"


class DetokenizerError(UserError):
    """A de-tokenizer folder that is missing or incomplete, or tokens that do not fit it."""


_POSITIVE = {"type": "integer", "minimum": 1}
_BETA = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}
CONFIG_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["token_dim", "resampler_queries", "resampler_depth", "resampler_heads", "train_timesteps",
                 "beta_schedule", "beta_start", "beta_end", "decode_steps", "sha256"],
    "properties": {
        **{k: _POSITIVE for k in ("token_dim", "resampler_queries", "resampler_depth", "resampler_heads",
                                  "train_timesteps", "decode_steps")},
        "beta_schedule": {"enum": ["linear", "scaled_linear"]}, "beta_start": _BETA, "beta_end": _BETA,
        "prediction_type": {"enum": ["epsilon", "sample"]}, "spatial_conditioning": {"type": "boolean"},
        "sha256": SHA256_SCHEMA,
    },
}
UNET_CONFIG_SCHEMA = {  # what the de-tokenizer reads of diffusers' UNet config; diffusers checks the rest
    "type": "object", "required": ["_class_name", "in_channels", "sample_size", "cross_attention_dim"],
    "properties": {"_class_name": {"const": "UNet2DConditionModel"}, "in_channels": _POSITIVE,
                   "sample_size": _POSITIVE,
                   "cross_attention_dim": {"anyOf": [_POSITIVE, {"type": "array", "items": _POSITIVE}]}},
}


@dataclass(frozen=True)
class DetokenizerSettings:
    """What the de-tokenizer is built from besides its UNet (saved as `detokenizer_config.json`)."""

    token_dim: int  # width of the visual tokens (the vision encoder's hidden size)
    resampler_queries: int = 16
    resampler_depth: int = 1
    resampler_heads: int = 4
    train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    decode_steps: int = 25
    prediction_type: str = "epsilon"  # what the UNet predicts: the noise (SDXL's) or the clean image ("sample")
    spatial_conditioning: bool = False  # also feed the token grid as ControlNet-style residuals (`SpatialResiduals`)

    @classmethod
    def from_config(cls, detok, token_dim: int) -> "DetokenizerSettings":
        names = [f for f in cls.__dataclass_fields__ if f != "token_dim"]
        return cls(token_dim=token_dim, **{k: getattr(detok, k) for k in names})


def load_vae(spec, device="cpu", dtype=torch.float32):
    """The `AutoencoderKL` a `ModelSpec` names (safetensors only), frozen, in eval mode."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(spec.source, subfolder=spec.subfolder, revision=spec.revision,
                                        use_safetensors=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


class SpatialResiduals(nn.Module):
    """The visual tokens as a spatial map for the UNet (not in SEED-X, whose de-tokenizer reads them by
    cross-attention only). The tokens are a sqrt(Q) x sqrt(Q) grid of pooled features (`model.pool_tokens`); one
    zero-initialised 1x1 convolution per down-block residual and one for the mid block project the grid to that
    residual's channels, resized to its resolution (nearest), and the UNet adds them as it adds ControlNet's. At the
    start the UNet is unchanged; a UNet trained from scratch learns where things go from this far sooner."""

    def __init__(self, token_dim: int, unet):
        super().__init__()
        cfg = unet.config
        channels, self.scales, scale = [cfg.block_out_channels[0]], [1], 1  # conv_in's output first
        for i, c in enumerate(cfg.block_out_channels):
            channels += [c] * cfg.layers_per_block
            self.scales += [scale] * cfg.layers_per_block
            if i < len(cfg.block_out_channels) - 1:  # every block but the last ends with a downsampler
                scale *= 2
                channels.append(c)
                self.scales.append(scale)
        self.mid_scale = scale
        self.size = cfg.sample_size
        self.proj = nn.ModuleList(nn.Conv2d(token_dim, c, 1) for c in [*channels, cfg.block_out_channels[-1]])
        for conv in self.proj:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, tokens: torch.Tensor, dtype) -> dict:
        b, q, d = tokens.shape
        side = math.isqrt(q)
        if side * side != q:
            raise DetokenizerError(f"spatial conditioning needs a square number of visual tokens, got {q}")
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)

        def at(conv, scale):
            return F.interpolate(conv(grid), size=self.size // scale, mode="nearest").to(dtype)

        return {"down_block_additional_residuals": tuple(at(c, s) for c, s in zip(self.proj[:-1], self.scales)),
                "mid_block_additional_residual": at(self.proj[-1], self.mid_scale)}


class Detokenizer(nn.Module):
    """UNet + token resampler (+ optional VAE): `loss` for training, `decode` for images."""

    def __init__(self, unet, settings: DetokenizerSettings, vae=None):
        from diffusers import DDPMScheduler

        super().__init__()
        self.settings = settings
        self.unet = unet
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        channels = unet.config.in_channels
        if vae is None and channels != 3:
            raise DetokenizerError(f"a UNet with {channels} input channels works on latents: configure detokenizer.vae")
        cross = unet.config.cross_attention_dim
        if isinstance(cross, (list, tuple)):
            cross = cross[0]
        device = next(unet.parameters()).device
        self.resampler = Resampler(settings.token_dim, cross, cross, settings.resampler_queries,
                                   settings.resampler_heads, settings.resampler_depth).to(device)
        # SDXL-style UNets also take a pooled conditioning vector and the (size, crop, size) ids.
        self.text_time = unet.config.addition_embed_type == "text_time"
        if self.text_time:
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            self.pooled = nn.Linear(cross, pooled).to(device)
        self.spatial = SpatialResiduals(settings.token_dim, unet).to(device) if settings.spatial_conditioning else None
        self.noise = DDPMScheduler(num_train_timesteps=settings.train_timesteps, beta_schedule=settings.beta_schedule,
                                   beta_start=settings.beta_start, beta_end=settings.beta_end,
                                   prediction_type=settings.prediction_type)

    @property
    def device(self):
        return self.resampler.queries.device

    @property
    def image_size(self) -> int:
        """The pixel size the de-tokenizer reads and writes."""
        size = self.unet.config.sample_size
        if self.vae is not None:
            size *= 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(size)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    def trainable_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in ("resampler", "pooled", "spatial")}

    # ---- images <-> UNet space ---------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images -> [B, 3, S, S] in [-1, 1] at the de-tokenizer's size."""
        from PIL import Image

        s = self.image_size
        arr = np.stack([np.asarray(im.convert("RGB").resize((s, s), Image.BICUBIC), np.float32) for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)

    def to_unet_space(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return pixels
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        return latents.float() * self.vae.config.scaling_factor

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x
        return self.vae.decode((x / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.float()

    # ---- the network -------------------------------------------------------------------------------------
    def condition(self, tokens: torch.Tensor) -> dict:
        """UNet keyword arguments for visual tokens [B, Q, token_dim]."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.settings.token_dim:
            raise DetokenizerError(
                f"visual tokens must be [B, Q, {self.settings.token_dim}], got {tuple(tokens.shape)}")
        states = self.resampler(tokens.to(self.device, torch.float32))
        kwargs = {"encoder_hidden_states": states.to(self.unet.dtype)}
        if self.text_time:
            s = self.image_size
            ids = torch.tensor([s, s, 0, 0, s, s], device=self.device, dtype=self.unet.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled(states.mean(1)).to(self.unet.dtype),
                                           "time_ids": ids.expand(len(tokens), -1)}
        if self.spatial is not None:
            kwargs.update(self.spatial(tokens.to(self.device, torch.float32), self.unet.dtype))
        return kwargs

    def noise_loss(self, x0: torch.Tensor, tokens: torch.Tensor, timesteps: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
        """MSE of the UNet's prediction (the noise, or x0 itself with `prediction_type: sample`) at given timesteps
        and noise (x0 in UNet space)."""
        xt = self.noise.add_noise(x0, noise, timesteps)
        pred = self.unet(xt.to(self.unet.dtype), timesteps, **self.condition(tokens)).sample
        return F.mse_loss(pred.float(), x0 if self.settings.prediction_type == "sample" else noise)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The DDPM training loss of a batch: random timesteps and noise from torch's global generator."""
        x0 = self.to_unet_space(pixels.to(self.device))
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.settings.train_timesteps, (len(x0),), device=self.device)
        return self.noise_loss(x0, tokens, t, noise)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, seed: int = 0, steps: int | None = None) -> list:
        """Images (PIL, RGB, `image_size` square) for visual tokens [B, Q, token_dim], by DDIM from seeded noise."""
        from diffusers import DDIMScheduler
        from PIL import Image

        was_training = self.training
        self.eval()
        scheduler = DDIMScheduler.from_config(self.noise.config)
        scheduler.set_timesteps(steps or self.settings.decode_steps)
        cond = self.condition(tokens)
        size = self.unet.config.sample_size
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(len(tokens), self.unet.config.in_channels, size, size, generator=gen).to(self.device)
        for t in scheduler.timesteps:
            eps = self.unet(x.to(self.unet.dtype), t, **cond).sample.float()
            x = scheduler.step(eps, t, x).prev_sample
        pixels = self.to_pixels(x).clamp(-1, 1)
        self.train(was_training)
        arr = ((pixels.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]

    # ---- persistence -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """`unet/` (diffusers, safetensors), the resampler in safetensors and the settings with the sha256 of
        every weight file, atomically."""
        from safetensors.torch import save_file

        with staged_dir(directory) as tmp:
            self.unet.save_pretrained(str(tmp / UNET_DIR), safe_serialization=True)
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
                       for k, v in self.trainable_state_dict().items()}
            save_file(tensors, str(tmp / MODULES_FILE), metadata={"format": "pt"})
            config = {**asdict(self.settings), "sha256": weight_hashes(tmp)}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        return Path(directory)

    def load_trainable(self, directory: str | os.PathLike) -> None:
        """Load the UNet and resampler weights of a `save_pretrained` folder into this model (all or nothing)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        check_checkpoint(directory)
        files = _unet_files(directory)
        check_tensors(files[0] if len(files) == 1 else directory / UNET_DIR, _shapes(files),
                      self.unet.state_dict(), DetokenizerError)
        modules = self._checked_modules(directory)
        self.unet.load_state_dict({k: v for f in files for k, v in load_file(str(f), device=str(self.device)).items()})
        self.load_state_dict(load_file(str(modules), device=str(self.device)), strict=False)

    def _checked_modules(self, directory: Path) -> Path:
        """The resampler weights file, after checking its tensors are this model's."""
        path = directory / MODULES_FILE
        check_tensors(path, safetensors_shapes(path, DetokenizerError), self.trainable_state_dict(), DetokenizerError)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, vae=None, device="cpu", dtype=torch.float32,
                        settings: "DetokenizerSettings | None" = None) -> "Detokenizer":
        """A saved de-tokenizer, after `check_checkpoint` (`settings`: its result, when the caller has just run it:
        it hashes every weight file), in eval mode (`vae` for a latent-space UNet)."""
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        directory = Path(directory)
        settings = settings or check_checkpoint(directory)
        unet = UNet2DConditionModel.from_pretrained(str(directory / UNET_DIR), use_safetensors=True,
                                                    torch_dtype=dtype).to(device)
        model = cls(unet, settings, vae=vae)
        modules = model._checked_modules(directory)
        model.load_state_dict(load_file(str(modules), device=str(model.device)), strict=False)
        return model.eval()


def _unet_files(directory: Path) -> list[Path]:
    return sorted((directory / UNET_DIR).glob("*.safetensors"))


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over the UNet's weight files (one, or the shards of a large UNet)."""
    return {k: v for f in files for k, v in safetensors_shapes(f, DetokenizerError).items()}


def _unet_shapes(config: dict, path: Path) -> dict:
    """The tensors (on the meta device: no memory, no init) of the UNet that `config` (read from `path`) builds."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    try:
        with init_empty_weights():
            return UNet2DConditionModel.from_config(config).state_dict()
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise DetokenizerError(f"{path}: diffusers cannot build a UNet from it ({str(e).splitlines()[0]})") from None


def check_checkpoint(directory: Path) -> DetokenizerSettings:
    """The settings of a de-tokenizer folder, after checking that every file is there, both configs are UTF-8
    JSON of their schema, each weight file is a complete safetensors file with the sha256 `detokenizer_config.json`
    records, and the UNet's weights are the tensors its config builds. Any fault is one line naming the file;
    nothing is loaded."""
    if not directory.is_dir():
        raise DetokenizerError(f"de-tokenizer {directory} does not exist")
    for name in (CONFIG_FILE, MODULES_FILE, f"{UNET_DIR}/config.json"):
        if not (directory / name).is_file():
            raise DetokenizerError(f"de-tokenizer {directory} is incomplete: {name} is missing")
    config = read_json(directory / CONFIG_FILE, CONFIG_SCHEMA, DetokenizerError)
    unet_config = directory / UNET_DIR / "config.json"
    expected = _unet_shapes(read_json(unet_config, UNET_CONFIG_SCHEMA, DetokenizerError), unet_config)
    verify_weights(directory, config["sha256"], CONFIG_FILE, DetokenizerError)
    files = _unet_files(directory)
    if not files:
        raise DetokenizerError(f"de-tokenizer {directory} is incomplete: no UNet safetensors in {UNET_DIR}/")
    check_tensors(files[0] if len(files) == 1 else directory / UNET_DIR, _shapes(files), expected, DetokenizerError)
    return DetokenizerSettings(**{k: v for k, v in config.items() if k != "sha256"})
