"""Load a model role from a local folder or a Hub id, with each library's own loader: one code path for both.

`load_role(role, spec, device, dtype)` returns a `ModelHandle` (the attributes per role are listed in
CONTRIBUTING.md). Weights load from safetensors only (a folder with only pickle weights is refused before anything is
read; open_clip and timm, whose Hub loaders fall back to a pickle, get only a repository's config and safetensors
file); `trust_remote_code` is passed through from the spec and is off by default. The evaluation encoders (`dino`,
`eval_clip`) always load in float32; an open_clip model must have the activation its config declares (QuickGELU for
an OpenAI checkpoint). Heavy imports happen inside functions. Hub downloads follow the usual `HF_HUB_OFFLINE` / cache
settings: nothing here forces them.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from music_dagster.config import ROLES, ZOO_COMMAND, ModelSpec
from music_dagster.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = ("float32", "bfloat16", "float16")
# The evaluation encoders always run in float32, whatever the profile's dtype: the paper's MUSIC vs MUSIC* score
# gaps are about 0.01, the size of the error bf16 weights put on a cosine.
FLOAT32_ROLES = ("dino", "eval_clip")


class LoaderError(UserError):
    """A checkpoint that cannot be loaded as asked (missing folder, pickle-only weights, bad device or dtype)."""


@dataclass(eq=False)
class ModelHandle:
    """A loaded role: `.device`, `.dtype` and the role's objects (unused attributes stay None)."""

    role: str
    device: Any  # torch.device
    dtype: Any  # torch.dtype of the weights
    model: Any = None
    tokenizer: Any = None
    processor: Any = None
    pipe: Any = None
    preprocess: Any = None
    unet: Any = None
    name: str | None = None

    def modules(self) -> list:
        """The handle's torch modules (a pipeline's components included)."""
        import torch

        if self.pipe is not None:
            return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]
        return [m for m in (self.model, self.unet) if m is not None]

    def num_parameters(self) -> int:
        return sum(p.numel() for m in self.modules() for p in m.parameters())


def resolve_device(device: str):
    """'auto' -> cuda when available, else cpu."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LoaderError(f"device: unknown device {device!r} (use auto, cpu or cuda)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LoaderError(f"device: {device!r} asked for but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device):
    """The weights' dtype. On CPU bfloat16/float16 stay float32: CPU half-precision kernels are slow or missing
    for some ops (fp16 conv, attention), and CPU runs are the tiny profile, where speed and exactness matter."""
    import torch

    if dtype not in DTYPES:
        raise LoaderError(f"dtype: unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    if device.type == "cpu":
        return torch.float32
    return getattr(torch, dtype)


def role_dtype(role: str, dtype: str, device):
    """The dtype `role` is loaded in: float32 for the evaluation encoders, else `resolve_dtype`."""
    import torch

    torch_dtype = resolve_dtype(dtype, device)  # validates `dtype` for every role
    return torch.float32 if role in FLOAT32_ROLES else torch_dtype


def check_local_folder(role: str, spec: ModelSpec) -> Path | None:
    """The spec's folder (subfolder applied) after checking it holds safetensors weights; None for a Hub id."""
    local = spec.local_path
    if local is None:
        return None
    if not local.is_dir():
        raise LoaderError(f"{role}: checkpoint folder {spec.id} is missing (make it with `{ZOO_COMMAND}`)")
    folder = local / spec.subfolder if spec.subfolder else local
    if not folder.is_dir():
        raise LoaderError(f"{role}: subfolder {spec.subfolder!r} is missing in {spec.id}")
    # Judge each folder on its own: a pipeline whose one component has only pickle weights is refused too.
    by_dir: dict[Path, set[str]] = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".safetensors", *PICKLE_SUFFIXES):
            by_dir.setdefault(path.parent, set()).add(path.suffix)
    for d, suffixes in sorted(by_dir.items()):
        if ".safetensors" not in suffixes:
            rel = d.relative_to(folder).as_posix()
            where = spec.id if rel == "." else f"{spec.id}/{rel}"
            raise LoaderError(f"{role}: {where} has only pickle weights ({', '.join(sorted(suffixes))}); "
                              "convert them to safetensors")
    if not by_dir:
        raise LoaderError(f"{role}: no safetensors weights in {spec.id}")
    return folder


def _hf_kwargs(spec: ModelSpec) -> dict:
    kw = {"trust_remote_code": spec.trust_remote_code}
    if spec.subfolder:
        kw["subfolder"] = spec.subfolder
    if spec.revision:
        kw["revision"] = spec.revision
    return kw


def _model(auto_cls, spec: ModelSpec, device, dtype, **extra):
    model = auto_cls.from_pretrained(spec.source, use_safetensors=True, dtype=dtype, **_hf_kwargs(spec), **extra)
    # The config's name is what derived checkpoints record as their base: the portable id, not this checkout's path.
    model.config._name_or_path = model.name_or_path = spec.id
    return model.eval().to(device)


# The transformers class (and its extra arguments) each transformers role is built with: what `load_role` loads and
# what `music check full` (dryrun.py) builds without weights from the repository's copies of the Hub configs.
HF_MODEL_CLASSES = {
    "llm": ("AutoModelForCausalLM", {}),
    "vlm": ("AutoModelForImageTextToText", {}),
    "detector": ("AutoModelForZeroShotObjectDetection", {}),
    "segmenter": ("AutoModelForMaskGeneration", {}),
    "music_llm": ("AutoModelForCausalLM", {}),
    # a full SigLIP checkpoint holds both towers: SiglipVisionModel reads the vision one
    "music_vision": ("SiglipVisionModel", {}),
}
PIPELINE_CLASSES = {"t2i": "FluxPipeline", "i2i": "FluxKontextPipeline"}  # diffusers pipelines
# the roles transformers or diffusers load (with their weight-loading bars); open_clip and timm load the others
HF_LIBRARY_ROLES = (*HF_MODEL_CLASSES, *PIPELINE_CLASSES, "music_unet")


def _hf_model(role, spec, device, dtype):
    import transformers

    name, extra = HF_MODEL_CLASSES[role]
    return _model(getattr(transformers, name), spec, device, dtype, **extra)


def _load_causal_lm(role, spec, device, dtype):
    from transformers import AutoTokenizer

    return ModelHandle(role, device, dtype, model=_hf_model(role, spec, device, dtype),
                       tokenizer=AutoTokenizer.from_pretrained(spec.source, **_hf_kwargs(spec)))


def _load_with_processor(processor_cls="AutoProcessor"):
    def load(role, spec, device, dtype):
        import transformers

        processor = getattr(transformers, processor_cls).from_pretrained(spec.source, **_hf_kwargs(spec))
        return ModelHandle(role, device, dtype, model=_hf_model(role, spec, device, dtype), processor=processor)

    return load


def _load_flux(pipeline_cls):
    def load(role, spec, device, dtype):
        import diffusers

        kw = {k: v for k, v in _hf_kwargs(spec).items() if k != "trust_remote_code"}  # no remote code in diffusers
        pipe = getattr(diffusers, pipeline_cls).from_pretrained(spec.source, use_safetensors=True, dtype=dtype, **kw)
        for m in pipe.components.values():
            if hasattr(m, "eval"):
                m.eval()
        return ModelHandle(role, device, dtype, pipe=pipe.to(device))

    return load


def _load_unet(role, spec, device, dtype):
    from diffusers import UNet2DConditionModel

    kw = {k: v for k, v in _hf_kwargs(spec).items() if k != "trust_remote_code"}
    unet = UNet2DConditionModel.from_pretrained(spec.source, use_safetensors=True, dtype=dtype, **kw)
    unet.register_to_config(_name_or_path=spec.id)  # as in _model: the portable id, not this checkout's path
    return ModelHandle(role, device, dtype, unet=unet.eval().to(device))


def _safetensors_dir(spec: ModelSpec, config_file: str, weights_file: str) -> Path:
    """A folder in a library's `local-dir:` layout (open_clip, timm): the spec's own folder, or for a Hub id
    (`hf-hub:org/repo`) a cache folder holding only the repository's `config_file` and `weights_file`, so the
    library cannot fall back to a pickle."""
    local = spec.local_path
    if local is not None:
        return local / spec.subfolder if spec.subfolder else local
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo = spec.id.removeprefix("hf-hub:")
    kw = {"revision": spec.revision, "subfolder": spec.subfolder}
    config = hf_hub_download(repo, config_file, **kw)
    try:
        hf_hub_download(repo, weights_file, **kw)
    except EntryNotFoundError:
        raise LoaderError(f"{spec.id}: no {weights_file} (pickle weights are never loaded)") from None
    return Path(config).parent


def check_clip_activation(spec: ModelSpec, folder: Path, model) -> None:
    """The MLP activation of an open_clip model is the one its `open_clip_config.json` declares (`quick_gelu`), and
    an OpenAI checkpoint declares QuickGELU, the activation OpenAI's CLIP was trained with: GELU runs without error
    and gives silently wrong embeddings."""
    from open_clip.transformer import QuickGELU

    declared = bool(json.loads((folder / "open_clip_config.json").read_text())["model_cfg"].get("quick_gelu", False))
    if "openai" in spec.id.lower() and not declared:
        raise LoaderError(f"{spec.id}: an OpenAI CLIP needs QuickGELU, but its open_clip_config.json does not set "
                          "model_cfg.quick_gelu: true")
    built = isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    if built != declared:
        raise LoaderError(f"{spec.id}: open_clip built {'QuickGELU' if built else 'GELU'} but open_clip_config.json "
                          f"declares {'QuickGELU' if declared else 'GELU'}")


def _load_open_clip(role, spec, device, dtype):
    import open_clip

    folder = _safetensors_dir(spec, "open_clip_config.json", "open_clip_model.safetensors")
    name = f"local-dir:{folder}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    check_clip_activation(spec, folder, model)
    return ModelHandle(role, device, dtype, model=model.eval().to(device=device, dtype=dtype),
                       preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name), name=spec.id)


def save_open_clip(spec: ModelSpec, model, out: Path) -> None:
    """`model`'s weights (an open_clip CLIP built from `spec`, then trained) in open_clip's `local-dir:` layout
    under `out`, beside `spec`'s own `open_clip_config.json`: a `ModelSpec` of `out` loads it as `spec` loads."""
    import shutil

    from safetensors.torch import save_file

    folder = _safetensors_dir(spec, "open_clip_config.json", "open_clip_model.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "open_clip_config.json", out / "open_clip_config.json")
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={"format": "pt"})


def _load_timm(role, spec, device, dtype):
    """A timm model from its `config.json` (architecture and arguments) and `model.safetensors`, loaded strictly:
    DINO ViT-S/16 is `timm/vit_small_patch16_224.dino`, whose Hub repository has safetensors weights."""
    import timm

    folder = _safetensors_dir(spec, "config.json", "model.safetensors")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    return ModelHandle(role, device, dtype, model=model.eval().to(device=device, dtype=dtype), name=spec.id)


_LOADERS = {
    "llm": _load_causal_lm,
    "vlm": _load_with_processor(),
    "t2i": _load_flux(PIPELINE_CLASSES["t2i"]),
    "i2i": _load_flux(PIPELINE_CLASSES["i2i"]),
    "detector": _load_with_processor(),
    "segmenter": _load_with_processor(),
    "clip": _load_open_clip,
    "dino": _load_timm,
    "eval_clip": _load_open_clip,
    "music_llm": _load_causal_lm,
    "music_vision": _load_with_processor("AutoImageProcessor"),
    "music_unet": _load_unet,
    "select_clip": _load_open_clip,
}
assert tuple(_LOADERS) == ROLES


@contextmanager
def _no_loading_bars(role: str, spec: ModelSpec):
    """transformers' and diffusers' weight-loading bars kept off the console while a local folder loads: it reads
    in moments, and nothing downloads. A Hub id keeps them, with huggingface_hub's download bars. What was on
    before is on again after."""
    if spec.local_path is None or role not in HF_LIBRARY_ROLES:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    shown = [lib for lib in (transformers_logging, diffusers_logging) if lib.is_progress_bar_enabled()]
    for lib in shown:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in shown:
            lib.enable_progress_bar()


def load_role(role: str, spec: ModelSpec, device: str = "auto", dtype: str = "float32") -> ModelHandle:
    """Load `role` from `spec` (a local folder or a Hub id) in eval mode on `device` with `dtype`."""
    if role not in _LOADERS:
        raise LoaderError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    resolved = resolve_device(device)
    torch_dtype = role_dtype(role, dtype, resolved)
    check_local_folder(role, spec)
    try:
        with _no_loading_bars(role, spec):
            return _LOADERS[role](role, spec, resolved, torch_dtype)
    except UserError:
        raise
    except (OSError, ValueError) as e:  # how the libraries report a missing or malformed file, repo or revision
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise LoaderError(f"{role}: cannot load {spec.id}: {first}") from None
