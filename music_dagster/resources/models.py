"""One Dagster resource per model role, each under its role's name as resource key.

`resource.load()` loads the checkpoint lazily, once per process (a module-level cache keyed by role, checkpoint,
device and dtype), in eval mode on the device the step leased (`devices.lease`, one per `gpu` pool slot), else the
configured one; `teardown_after_execution` drops it when the resource's execution ends: the step's under the
multiprocess executor, the whole run's under the in-process one (`data_job`'s), so a run loads each model once.
`resource.load_fresh()` loads a copy of its own for a caller that changes the model (MUSIC's backbones under
training and generation, the test-time CLIP that `MusicPipeline.to` moves). Outside Dagster (`music generate`,
the library's defaults) the role's resource is built from the config (`RESOURCE_CLASSES[role].from_config`,
through `runtime.load_model`), so every model loads through one path.
This module imports neither torch nor the model libraries: `loaders` does, when a model is first loaded.
"""
from __future__ import annotations

import gc
import sys
import threading
from typing import ClassVar, Literal

import dagster as dg
from pydantic import Field

from music_dagster.config import ROLES, Config, ModelSpec
from music_dagster.zoo import devices

_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


class ModelResource(dg.ConfigurableResource):
    """A model role's checkpoint and where to run it. Subclasses fix the role."""

    role: ClassVar[str]

    checkpoint: str = Field(description="Hub id (org/name, hf-hub:org/name) or folder relative to the project root")
    subfolder: str | None = Field(default=None, description="folder inside the checkpoint (e.g. unet)")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(default=False, description="run the checkpoint's own code (off unless needed)")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when present, else cpu")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="weights dtype on GPU")
    torch_threads: int = Field(default=1, gt=0, description="torch CPU threads of the process")

    @classmethod
    def from_config(cls, config: Config) -> ModelResource:
        spec = config.models[cls.role]
        prof = config.profile
        return cls(checkpoint=spec.id, subfolder=spec.subfolder, revision=spec.revision,
                   trust_remote_code=spec.trust_remote_code, device=prof.device, dtype=prof.dtype,
                   torch_threads=prof.torch_threads)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(id=self.checkpoint, subfolder=self.subfolder, revision=self.revision,
                         trust_remote_code=self.trust_remote_code)

    def _device(self) -> str:
        """The device the running step leased (`devices.lease`), else the resource's own."""
        return devices.current() or self.device

    def _checkpoint_key(self) -> tuple:
        return self.role, self.checkpoint, self.subfolder, self.revision, self.trust_remote_code, self.dtype

    def _key(self) -> tuple:
        return *self._checkpoint_key(), self._device()

    def load(self):
        """The role's `ModelHandle` on the step's device, loaded on first use in this process and reused after."""
        key = self._key()
        with _LOCK:
            if key not in _CACHE:
                import torch

                from music_dagster.zoo.loaders import load_role

                torch.set_num_threads(self.torch_threads)
                _CACHE[key] = load_role(self.role, self.spec, self._device(), self.dtype)
            return _CACHE[key]

    def load_fresh(self):
        """A new `ModelHandle`, never cached nor shared: for a caller that changes the model (peft injects LoRA
        layers into the MUSIC LLM in place, training trains the de-tokenizer's UNet and moves what it prepares,
        `MusicPipeline.to` moves its models). The caller owns it; it is freed when the caller drops it."""
        import torch

        from music_dagster.zoo.loaders import load_role

        torch.set_num_threads(self.torch_threads)
        return load_role(self.role, self.spec, self._device(), self.dtype)

    @property
    def is_loaded(self) -> bool:
        return self._key() in _CACHE

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.unload()

    def unload(self) -> None:
        """Forget the loaded model, on every device it was loaded on, so its memory (CPU and GPU) can be reclaimed.

        Models hold reference cycles, so their memory returns only after a full garbage collection, which costs
        about 0.3 s over a process that imported torch and the model libraries. It runs when the last cached model
        goes (a run's teardown unloads all of them in a row: one collection, not one per model), or at once on a GPU,
        whose memory another process may be waiting for."""
        with _LOCK:
            handles = [_CACHE.pop(k) for k in list(_CACHE) if k[:-1] == self._checkpoint_key()]
            last = not _CACHE
        if not handles:
            return
        del handles
        torch = sys.modules.get("torch")  # loaded when a model was: never import it just to free nothing
        on_gpu = torch is not None and torch.cuda.is_available()
        if last or on_gpu:
            gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()


class LLMResource(ModelResource):
    """Category filter and captions (Qwen3)."""

    role: ClassVar[str] = "llm"


class VLMResource(ModelResource):
    """Box verification, instruction and CoT (Qwen2.5-VL)."""

    role: ClassVar[str] = "vlm"


class T2IResource(ModelResource):
    """Target images (FluxPipeline)."""

    role: ClassVar[str] = "t2i"


class I2IResource(ModelResource):
    """Reference subjects (FluxKontextPipeline)."""

    role: ClassVar[str] = "i2i"


class DetectorResource(ModelResource):
    """Open-vocabulary boxes (GroundingDINO)."""

    role: ClassVar[str] = "detector"


class SegmenterResource(ModelResource):
    """Masks from boxes (SAM 2)."""

    role: ClassVar[str] = "segmenter"


class ClipResource(ModelResource):
    """The data stages' CLIP: mask or box (open_clip)."""

    role: ClassVar[str] = "clip"


class DinoResource(ModelResource):
    """DINO score encoder (ViT-S/16)."""

    role: ClassVar[str] = "dino"


class EvalClipResource(ModelResource):
    """CLIP-I / CLIP-T score encoder (open_clip)."""

    role: ClassVar[str] = "eval_clip"


class MusicLLMResource(ModelResource):
    """The MUSIC model's causal LM (Qwen3)."""

    role: ClassVar[str] = "music_llm"


class MusicVisionResource(ModelResource):
    """The MUSIC model's frozen vision encoder (SigLIP)."""

    role: ClassVar[str] = "music_vision"


class MusicUNetResource(ModelResource):
    """The MUSIC de-tokenizer's UNet."""

    role: ClassVar[str] = "music_unet"


class SelectClipResource(ModelResource):
    """MUSIC*'s test-time selection: the branch whose image best matches the instruction (open_clip); its own
    role, so the evaluation's CLIP-T is not scored by the encoder that chose the branch."""

    role: ClassVar[str] = "select_clip"


RESOURCE_CLASSES: dict[str, type[ModelResource]] = {
    cls.role: cls for cls in (
        LLMResource, VLMResource, T2IResource, I2IResource, DetectorResource, SegmenterResource, ClipResource,
        DinoResource, EvalClipResource, MusicLLMResource, MusicVisionResource, MusicUNetResource, SelectClipResource,
    )
}
assert tuple(RESOURCE_CLASSES) == ROLES


def model_resources(config: Config) -> dict[str, ModelResource]:
    """Every role's resource, keyed by the role's name."""
    return {role: cls.from_config(config) for role, cls in RESOURCE_CLASSES.items()}
