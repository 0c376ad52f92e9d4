"""What training and inference share: where the trained models live, the device, and how a model is loaded.

- `lora_dir(config)` / `detokenizer_dir(config)`: the published MUSIC checkpoint and de-tokenizer under
  `paths.models` (what the training assets write and `music generate` reads); `work_dir(config, name)`: a folder
  under `paths.work` (resumable training state, the procedural experiment's models).
- `device_of(config)`: the configured device (`auto`: cuda when present); `flush_denormals()`: the float mode
  both the training loops and generation run in.
- `load_model(config, role, models)`: a fresh handle of a model role from its Dagster resource (`models[role]`,
  what an asset received), else from the role's resource built from the config: one loading path inside and
  outside Dagster. `with_models(config, models)`: the config naming what those resources load, so what keys
  and logs a run by its config (the training work folder, MLflow params) names the models it really used.

torch, the model libraries and Dagster are imported inside functions: importing this module is cheap.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from music_dagster.config import Config
    from music_dagster.resources.models import ModelResource

LORA_DIR = "lora"  # under `paths.models`: what `lora_checkpoint` writes and `music generate` reads by default
DETOKENIZER_DIR = "detokenizer"
MUSIC_BACKBONES = ("music_llm", "music_vision", "music_unet")  # the frozen models MUSIC and its de-tokenizer build on


def lora_dir(config: Config) -> Path:
    """The published MUSIC checkpoint (peft adapter + resamplers): `<paths.models>/lora`."""
    return config.paths.resolve("models") / LORA_DIR


def detokenizer_dir(config: Config) -> Path:
    """The published de-tokenizer: `<paths.models>/detokenizer`."""
    return config.paths.resolve("models") / DETOKENIZER_DIR


def work_dir(config: Config, name: str) -> Path:
    """`<paths.work>/<name>`: state that is kept between runs but never published (`training`, `experiment`)."""
    return config.paths.resolve("work") / name


def device_of(config: Config) -> str:
    """The configured device (`auto`: cuda when present)."""
    wanted = config.profile.device
    if wanted == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


@contextmanager
def flush_denormals():
    """Flush float denormals to zero inside the block (they make CPU matmuls many times slower), and turn it off
    again after: the flag is process-wide processor state, and left on it changes float semantics for the rest of
    the process (hypothesis, for one, then refuses to generate floats)."""
    import torch

    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def model_resource(config: Config, role: str, models: Mapping[str, ModelResource] | None = None) -> ModelResource:
    """`models[role]` (the resource an asset received), else the role's resource built from the config (a
    missing local folder refused first, in one line naming the key)."""
    resource = (models or {}).get(role)
    if resource is not None:
        return resource
    from music_dagster.resources.models import RESOURCE_CLASSES

    config.check_models([role])
    return RESOURCE_CLASSES[role].from_config(config)


def load_model(config: Config, role: str, models: Mapping[str, ModelResource] | None = None):
    """A fresh handle of `role` (`ModelResource.load_fresh`: MUSIC's backbones are changed by whoever uses them)
    from `models[role]`, else from the role's resource built from `config`."""
    return model_resource(config, role, models).load_fresh()


def with_models(config: Config, models: Mapping[str, ModelResource] | None) -> Config:
    """`config` with each role of `models` naming the checkpoint its resource loads."""
    if not models:
        return config
    return config.with_models({role: resource.spec for role, resource in models.items()})
