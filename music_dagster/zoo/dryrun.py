"""`music check full`: the full profile at full size, without weights, on the CPU.

This machine reaches no model hub, so the published checkpoints cannot be loaded here. Everything short of the
weights can be checked, though:

- every role of the full profile is built with its library's own class from the copy of its Hub config kept in
  `configs/full/<hub id>/` (`configs/full/README.md` names each source), on PyTorch's *meta* device: tensors
  with a shape and a dtype but no storage, so an 8 B model costs no memory and no time;
- each parameter count is compared with the published size (`configs/full/sources.json`), within 2 %;
- MUSIC (`model.MusicModel`: LoRA on Qwen3-8B, both resamplers) and the de-tokenizer (SDXL's UNet) are built at
  full size and one training step at the configured batch runs forward and backward on meta tensors, which
  propagate shapes and dtypes only;
- the token budgets follow the data config: the longest plan MUSIC learns (`data.max_subjects` CoT sentences of
  `data.cot_words_per_subject` words, then the layout) must fit `train.max_plan_tokens`, at which the step is
  measured, and the VLM's longest instruction + CoT answer must fit `data.max_new_tokens` (`plan_tokens`: an
  estimate in Qwen's BPE, as no tokenizer is kept here);
- that step runs under the section's `mixed_precision` as CUDA autocast runs it (`torch.autocast` has no meta
  device, so `MixedPrecision` applies its casting rules): matmuls and convolutions in bf16 (fp16), norms, softmax
  and losses in fp32, each fp32 trainable weight cast once per forward and its copy held (autocast's cache);
- while it runs, every tensor autograd saves for the backward pass is counted (`saved_tensors_hooks`, each storage
  once, parameters and the weights' autocast copies excluded): the activations of the step. With that, the peak
  training memory per GPU is

      weights + gradients + DDP buckets + optimizer states + autocast copies + activations

  weights: every parameter at its own dtype (frozen backbones bf16; trainable fp32, the master weights the
  optimizer updates); gradients: 4 bytes per trainable parameter; DDP buckets: 4 more per trainable parameter with
  more than one process (DistributedDataParallel's all-reduce buffers, a second copy of the gradients, as accelerate
  makes it: `gradient_as_bucket_view` off); AdamW: 8 bytes per trainable parameter (two fp32 moments); autocast
  copies: the compute-dtype copy of every trainable weight a matmul or convolution reads, held until the forward
  ends; activations: the saved tensors of one step. With gradient checkpointing each checkpointed unit (a decoder
  layer, a UNet resnet or transformer block) keeps only its inputs, and the backward pass recomputes one unit at a
  time:

      activations = saved outside the units + the units' inputs + the largest unit's saved tensors

  Attention is counted as a GPU's fused kernel keeps it (queries, keys, values, output, log-sum-exp), not as the
  CPU's math path, which would keep the full attention matrix. Not counted: the CUDA context and allocator slack
  (a few GiB), temporaries inside one op (AdamW's foreach step allocates 4 bytes per trainable parameter, while no
  activation is held), and the frozen VAE's and vision encoder's no-grad forwards.

Heavy imports happen inside functions.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from music_dagster.config import PROJECT_ROOT, ROLES, load_config
from music_dagster.errors import UserError

CONFIGS = PROJECT_ROOT / "configs" / "full"
SOURCES = CONFIGS / "sources.json"
TOLERANCE = 0.02  # a built architecture's parameter count may differ from the published one by 2 %
GPU_GIB = 80  # the A100 / H100 the paper's setup uses
GIB = 2 ** 30
INSTRUCTION_TOKENS = 64  # the dry-run sample's instruction; subject tags are counted per subject
TAG_TOKENS = 3  # " [12]" in Qwen's tokenizer: space + bracket, digits, bracket
TOKENS_PER_WORD = 1.5  # English in Qwen's BPE is about 1.3 tokens a word; a word here may carry a comma
JSON_TOKENS = 16  # the answer's `{"instruction": "`, `", "cot": "`, `"}` and eos


class DryRunError(UserError):
    """A full-profile role that cannot be built from the repository's configs, or a size far from the published."""


@dataclass
class Part:
    """One built architecture: a model, or one component of a pipeline."""

    folder: str  # relative to configs/full (the Hub repo's layout)
    cls: str
    parameters: int
    published: float
    counted: int  # parameters of the architecture the published figure covers (usually the built one)

    @property
    def deviation(self) -> float:
        return self.counted / self.published - 1


@dataclass
class Memory:
    """Peak training memory of one process, in bytes, by term."""

    weights: int
    gradients: int
    buckets: int  # DistributedDataParallel's all-reduce buffers (more than one process)
    optimizer: int
    casts: int  # autocast's compute-dtype copies of the trainable weights
    activations: int
    activations_checkpointed: int
    trainable: int
    frozen: int

    def total(self, checkpointing: bool) -> int:
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.gradients + self.buckets + self.optimizer + self.casts + act


@dataclass
class Report:
    roles: dict[str, list[Part]] = field(default_factory=dict)
    music: Memory | None = None
    detokenizer: Memory | None = None
    music_batch: int = 0
    music_tokens: int = 0
    detokenizer_batch: int = 0
    music_checkpointing: bool = False
    detokenizer_checkpointing: bool = False
    plan: str = ""  # the plan budget and the longest plan the data config allows

    @property
    def music_gib(self) -> float:
        return self.music.total(self.music_checkpointing) / GIB

    @property
    def detokenizer_gib(self) -> float:
        return self.detokenizer.total(self.detokenizer_checkpointing) / GIB


# ---------------------------------------------------------------------------------------------------------------
# The configs kept in the repository
def read_sources() -> dict:
    return _json(SOURCES)


def config_folder(spec) -> Path:
    """The folder holding a spec's config: the repository's copy of a Hub folder (`configs/full/<org>/<repo>
    [/<subfolder>]`), or a local checkpoint's own folder (the tiny zoo's, which `scripts/gpu_full_size_check.py`
    builds at the tiny profile's sizes)."""
    local = spec.local_path
    folder = local if local is not None else CONFIGS / spec.id.removeprefix("hf-hub:")
    return folder / spec.subfolder if spec.subfolder else folder


def part_folders(folder: Path) -> list[Path]:
    """The model folders of a Hub folder: a pipeline's components (its `model_index.json`), or the folder itself."""
    index = folder / "model_index.json"
    if not index.is_file():
        return [folder]
    components = json.loads(index.read_text())
    return [folder / name for name in sorted(components) if (folder / name / "config.json").is_file()]


def _json(path: Path) -> dict:
    if not path.is_file():
        raise DryRunError(f"{path.relative_to(PROJECT_ROOT)} is missing (configs/full/README.md)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DryRunError(f"{path.relative_to(PROJECT_ROOT)}: not readable JSON ({e})") from None


def build(folder: Path, role: str | None = None, cls: str | None = None, dtype=None, device="meta"):
    """The architecture a config folder describes, on the meta device (no weights, no memory), or on `device` with
    its library's random initialisation. A role's own folder is built with the class its loader uses
    (`loaders.HF_MODEL_CLASSES`); `cls` asks for another class of the same config (the published figure's scope)."""
    import torch

    if (folder / "open_clip_config.json").is_file():
        import open_clip

        with torch.device(device):
            return open_clip.CLIP(**_json(folder / "open_clip_config.json")["model_cfg"])
    config = _json(folder / "config.json")
    if "_class_name" in config:
        import diffusers

        with torch.device(device):
            return getattr(diffusers, config["_class_name"]).from_config(config)
    if "architecture" in config:  # a timm model's config: its architecture and arguments, as `load_role` reads it
        import timm

        with torch.device(device):
            return timm.create_model(f"local-dir:{folder}", pretrained=False)
    import transformers

    from music_dagster.zoo.loaders import HF_MODEL_CLASSES

    name, extra = HF_MODEL_CLASSES[role] if role in HF_MODEL_CLASSES and cls is None else (
        cls or config["architectures"][0], {})
    klass = getattr(transformers, name)
    auto = hasattr(klass, "from_config")  # an Auto class; else the class's own config reads its part of the file
    hf_config = (transformers.AutoConfig if auto else klass.config_class).from_pretrained(folder)
    if dtype is not None:
        extra = {**extra, "dtype": dtype}
    with torch.device(device):
        return klass.from_config(hf_config, **extra) if auto else klass._from_config(hf_config, **extra)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_role(role: str, spec, sources: dict) -> list[Part]:
    """Every architecture of a full-profile role, built on meta, with its count and published size."""
    parts = []
    for folder in part_folders(config_folder(spec)):
        key = folder.relative_to(CONFIGS).as_posix()
        source = sources["parts"].get(key)
        if source is None:
            raise DryRunError(f"{role}: configs/full/sources.json names no published size for {key}")
        try:
            model = build(folder, role)
            n = count(model)
            counted = count(build(folder, role, source["published_class"])) if "published_class" in source else n
        # how the libraries refuse a config (timm: RuntimeError for an unknown architecture)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise DryRunError(f"{role}: configs/full/{key} does not build ({first.strip()})") from None
        parts.append(Part(key, type(model).__name__, n, float(source["published"]), counted))
    return parts


def check_sizes(role: str, parts: list[Part]) -> list[Part]:
    """`parts`, after checking each is within `TOLERANCE` of its published size (else one line naming it)."""
    for part in parts:
        if abs(part.deviation) > TOLERANCE:
            raise DryRunError(f"{role}: {part.folder} builds {part.counted:,} parameters, {part.deviation:+.1%} "
                              f"from the published {part.published:,.0f} (configs/full/sources.json)")
    return parts


# ---------------------------------------------------------------------------------------------------------------
# Counting what a training step keeps for backward
@contextmanager
def fused_attention():
    """`scaled_dot_product_attention` as a GPU runs it (the memory-efficient kernel: it keeps q, k, v, the output
    and the log-sum-exp) instead of the meta device's math path, which keeps the whole attention matrix."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class Fused(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not F.scaled_dot_product_attention:
                return func(*args, **kwargs)
            q, k, v = args[:3]
            if k.shape[-3] != q.shape[-3]:  # grouped-query attention: the kernel takes one key per head
                groups = q.shape[-3] // k.shape[-3]
                k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, kwargs.get("attn_mask"), True, 0.0, bool(kwargs.get("is_causal", False)),
                scale=kwargs.get("scale"))[0]

    with Fused():
        yield


# CUDA autocast's casting rules (torch.amp's op reference), by function name
LOWER_PRECISION_OPS = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu",
    "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "addr", "mv",
    "einsum", "chain_matmul", "multi_dot", "scaled_dot_product_attention",
    "multi_head_attention_forward",  # its projections and attention, which a function mode does not see inside
})
FLOAT32_OPS = frozenset({
    "group_norm", "layer_norm", "softmax", "log_softmax", "softmin", "mse_loss", "cross_entropy", "nll_loss",
    "l1_loss", "smooth_l1_loss", "kl_div", "binary_cross_entropy_with_logits", "pow", "__pow__", "__rpow__",
    "__rdiv__", "__rtruediv__", "exp", "expm1", "log", "log1p", "log2", "log10", "rsqrt", "reciprocal", "sum",
    "prod", "cumsum", "cumprod", "norm", "normalize", "softplus", "erfinv", "acos", "asin", "cosh", "sinh", "tan",
    "cosine_similarity", "dist", "cdist", "pdist", "renorm",
})
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # accelerate's `mixed_precision`; "no": none


def compute_dtype(mixed_precision: str):
    """The dtype accelerate's autocast computes matmuls in for a section's `mixed_precision`; None for "no"."""
    import torch

    name = COMPUTE_DTYPES.get(mixed_precision)
    return getattr(torch, name) if name else None


class MixedPrecision:
    """CUDA autocast's casting on meta tensors, where `torch.autocast` does not run: the floating arguments of a
    matmul-like function cast to `dtype`, of a norm, softmax, reduction or loss to fp32 (the cast is an autograd op,
    so what the function saves is the cast copy, as on a GPU). An fp32 trainable leaf (a weight) is cast once per
    forward and its copy kept, as autocast's cache keeps it until the forward ends; `on_weight_cast(copy)` is called
    for each."""

    def __init__(self, dtype, on_weight_cast):
        self.dtype, self.on_weight_cast = dtype, on_weight_cast
        self.cache: dict[int, object] = {}

    def cast(self, value, dtype):
        import torch

        if isinstance(value, (list, tuple)):
            return type(value)(self.cast(v, dtype) for v in value)
        if not isinstance(value, torch.Tensor) or value.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
                or value.dtype == dtype:
            return value
        weight = value.is_leaf and value.requires_grad and value.dtype == torch.float32 and dtype == self.dtype
        if not weight:
            return value.to(dtype)
        if id(value) not in self.cache:
            self.cache[id(value)] = copy = value.to(dtype)
            self.on_weight_cast(copy)
        return self.cache[id(value)]

    @contextmanager
    def active(self):
        import torch
        from torch.overrides import TorchFunctionMode

        rules = self

        class Autocast(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                target = rules.dtype if name in LOWER_PRECISION_OPS else \
                    torch.float32 if name in FLOAT32_OPS and kwargs.get("dtype") is None else None
                if target is not None:
                    args = tuple(rules.cast(a, target) for a in args)
                    kwargs = {k: rules.cast(v, target) for k, v in kwargs.items()}
                return func(*args, **kwargs)

        with Autocast():
            yield


class SavedTensors:
    """Bytes autograd saves for backward while active, each storage once, parameters excluded, split between the
    checkpointable `units` (by unit) and the rest; plus each unit's input bytes. With a `compute_dtype` the step
    runs under `MixedPrecision`, whose weight copies are counted in `casts` instead."""

    def __init__(self, model, units, compute_dtype=None):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.compute_dtype = compute_dtype
        self.casts = 0
        self.units = list(units)
        self.seen: set[int] = set()
        self.outside = 0
        self.inside = [0] * len(self.units)
        self.inputs = [0] * len(self.units)
        self._current: int | None = None

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            if self._current is None:
                self.outside += storage.nbytes()
            else:
                self.inside[self._current] += storage.nbytes()
        return tensor

    @contextmanager
    def counting(self):
        import torch

        def enter(i):
            def hook(module, args, kwargs):
                self._current = i
                self.inputs[i] += sum(a.untyped_storage().nbytes() for a in (*args, *kwargs.values())
                                      if isinstance(a, torch.Tensor) and a.requires_grad)
            return hook

        def leave(module, args, output):
            self._current = None

        def weight_cast(copy):
            self.params.add(copy.untyped_storage()._cdata)
            self.casts += copy.untyped_storage().nbytes()

        handles = [h for i, u in enumerate(self.units) for h in (
            u.register_forward_pre_hook(enter(i), with_kwargs=True), u.register_forward_hook(leave))]
        autocast = MixedPrecision(self.compute_dtype, weight_cast).active() if self.compute_dtype else nullcontext()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t), fused_attention(), autocast:
                yield self
        finally:
            for h in handles:
                h.remove()

    @property
    def total(self) -> int:
        return self.outside + sum(self.inside)

    @property
    def checkpointed(self) -> int:
        return self.outside + sum(self.inputs) + max(self.inside, default=0)


def memory(modules, saved: SavedTensors, processes: int = 1) -> Memory:
    """The formula of the module doc over the parameters of `modules` (each counted once), after `saved` counted a
    step; `processes`: the training's process count (DDP's buckets from 2 on)."""
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    return Memory(
        weights=sum(p.numel() * p.element_size() for p in params),
        gradients=4 * n_trainable, buckets=4 * n_trainable if processes > 1 else 0, optimizer=8 * n_trainable,
        casts=saved.casts, activations=saved.total, activations_checkpointed=saved.checkpointed,
        trainable=n_trainable, frozen=sum(p.numel() for p in frozen))


# ---------------------------------------------------------------------------------------------------------------
# The token budgets the data config implies
def plan_tokens(config) -> tuple[int, int]:
    """Estimated Qwen tokens of (the longest plan MUSIC learns, the VLM's longest instruction + CoT answer): for
    `data.max_subjects` subjects, a CoT sentence of `data.cot_words_per_subject` words each (`schemas.cot_pattern`:
    tag, words, full stop), the `data.grid` layout (`layout:`, then a space and one token per digit a row: Qwen
    splits digits), and an instruction of at most four words around each tag (`schemas.instruction_pattern`)."""
    data = config.profile.data
    n, grid = data.max_subjects, data.grid
    cot = n * (TAG_TOKENS + data.cot_words_per_subject * TOKENS_PER_WORD + 1)
    plan = 1 + cot + 1 + 3 + grid * (grid + 1) + 1  # a space before the CoT and before the layout, eos
    instruction = (1 + 4 * (n + 1)) * TOKENS_PER_WORD + n * TAG_TOKENS + 1
    return math.ceil(plan), math.ceil(instruction + cot + JSON_TOKENS)


def check_budgets(config) -> tuple[int, int]:
    """`plan_tokens`, or one line naming the budget (`train.max_plan_tokens`, `data.max_new_tokens`) too short for
    them: a plan or an annotation cut off there would be lost."""
    plan, answer = plan_tokens(config)
    data, train = config.profile.data, config.profile.train
    longest = f"{data.max_subjects} subjects x {data.cot_words_per_subject} CoT words (data.cot_words_per_subject)"
    if train.max_plan_tokens < plan:
        raise DryRunError(f"train.max_plan_tokens ({train.max_plan_tokens}) is shorter than the longest plan, about "
                          f"{plan} tokens for {longest} and the layout: raise it or shorten the CoT")
    if data.max_new_tokens < answer:
        raise DryRunError(f"data.max_new_tokens ({data.max_new_tokens}) is shorter than the VLM's longest answer, "
                          f"about {answer} tokens for {longest} and the instruction: raise it or shorten the CoT")
    return plan, answer


# ---------------------------------------------------------------------------------------------------------------
# MUSIC and the de-tokenizer at full size
def music_step(config):
    """MUSIC built on meta at full size (LoRA on `music_llm`, the resamplers, queries and markers), and one training
    step's forward and backward at `train.batch_size` samples of `data.max_subjects` subjects with a plan of
    `train.max_plan_tokens` tokens (`check_budgets`: at least the longest plan the data config allows). Returns
    (memory, tokens per sample)."""
    import torch
    import torch.nn.functional as F

    from music_dagster.model.music import MusicModel, MusicSettings
    from music_dagster.zoo.loaders import ModelHandle

    models, train = config.models, config.profile.train
    dtype = getattr(torch, config.profile.dtype)  # the backbones' weights, as `load_role` loads them on a GPU
    llm = build(config_folder(models["music_llm"]), "music_llm", dtype=dtype)
    vision = build(config_folder(models["music_vision"]), "music_vision", dtype=dtype)
    tokenizer = SimpleNamespace(eos_token_id=llm.config.eos_token_id, bos_token_id=None)
    settings = MusicSettings.from_config(train, grid=config.profile.data.grid)
    with torch.device("meta"):
        model = MusicModel(ModelHandle("music_llm", "meta", dtype, model=llm, tokenizer=tokenizer),
                           ModelHandle("music_vision", "meta", dtype, model=vision, processor=None), settings)
    model.train()  # LoRA and resamplers in fp32, the backbones in bf16

    B, n, q_in, q_out = train.batch_size, config.profile.data.max_subjects, train.input_queries, train.image_queries
    vcfg = vision.config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    hidden, vdim = llm.config.hidden_size, vcfg.hidden_size
    text = INSTRUCTION_TOKENS + n * TAG_TOKENS + train.max_plan_tokens
    tokens = text + n * (q_in + 2) + q_out
    meta = {"device": "meta"}
    base = model.llm.get_base_model()
    saved = SavedTensors(model, base.model.layers, compute_dtype(train.mixed_precision))
    with saved.counting():
        # The pieces of a sequence as `MusicModel.embed` places them (their order does not change any shape).
        ids = torch.zeros(B, text, dtype=torch.long, **meta)
        refs = model.input_resampler(torch.zeros(B * n, patches, vdim, **meta))
        x = torch.cat([
            base.get_input_embeddings()(ids).float(), refs.reshape(B, n * q_in, hidden),
            model.image_markers.repeat(n, 1).expand(B, -1, -1), model.image_queries.expand(B, -1, -1)], 1)
        assert x.shape == (B, tokens, hidden)
        h = base.model(inputs_embeds=x.to(model.llm_dtype), attention_mask={"full_attention": None},
                       position_ids=torch.arange(tokens, **meta).expand(B, -1), use_cache=False).last_hidden_state
        plan = h[:, text - train.max_plan_tokens - 1:text - 1]  # the positions that predict the plan's tokens
        l1 = F.cross_entropy(base.lm_head(plan).float().flatten(0, 1), ids[:, :train.max_plan_tokens].flatten())
        pred = model.output_resampler(h[:, -q_out:].float())
        l2 = F.mse_loss(pred, torch.zeros(B, q_out, vdim, **meta))
        loss = settings.w1 * l1 + settings.w2 * l2
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise DryRunError(f"MUSIC dry run: trainable {missing[0]} gets no gradient")
    return memory([model], saved, train.num_processes), tokens


def detokenizer_step(config):
    """The de-tokenizer built on meta at full size (SDXL's UNet trained whole in fp32, its token resampler, the
    frozen VAE and vision encoder), and one training step at `detokenizer.batch_size` at the UNet's sample size,
    under `detokenizer.mixed_precision`."""
    import torch

    from music_dagster.model.detokenizer import Detokenizer, DetokenizerSettings

    detok_cfg, models = config.profile.detokenizer, config.models
    unet = build(config_folder(models["music_unet"]), "music_unet")
    vae = build(config_folder(detok_cfg.vae), None) if detok_cfg.vae is not None else None
    vision = build(config_folder(models["music_vision"]), "music_vision", dtype=getattr(torch, config.profile.dtype))
    settings = DetokenizerSettings.from_config(detok_cfg, vision.config.hidden_size)
    with torch.device("meta"):
        detok = Detokenizer(unet.float(), settings, vae=vae)
    detok.train()

    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    units = [m for m in detok.unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    saved = SavedTensors(detok, units, compute_dtype(detok_cfg.mixed_precision))
    B, size = detok_cfg.batch_size, unet.config.sample_size
    meta = {"device": "meta"}
    with saved.counting():
        x0 = torch.zeros(B, unet.config.in_channels, size, size, **meta)
        tokens = torch.zeros(B, config.profile.train.image_queries, vision.config.hidden_size, **meta)
        loss = detok.noise_loss(x0, tokens, torch.zeros(B, dtype=torch.long, **meta), torch.zeros_like(x0))
    loss.backward()
    return memory([detok, vision.requires_grad_(False)], saved, detok_cfg.num_processes)


# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def quiet_libraries():
    """transformers' and diffusers' notes about what a dry run never uses (token ids, a bf16 cast of a model with
    no weights) stay off the console."""
    import diffusers
    import transformers

    levels = transformers.logging.get_verbosity(), diffusers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(levels[0])
        diffusers.logging.set_verbosity(levels[1])


def check_full(config=None) -> Report:
    """Build every role of the full profile and both trainable models on meta; see the module doc."""
    import torch

    config = config or load_config(profile="full")
    plan, _ = check_budgets(config)
    sources = read_sources()
    data = config.profile.data
    report = Report(plan=f"MUSIC's plan budget: {config.profile.train.max_plan_tokens} tokens (train.max_plan_tokens); "
                         f"the longest plan: about {plan} ({data.max_subjects} subjects x "
                         f"{data.cot_words_per_subject} CoT words, then the layout)")
    with quiet_libraries(), torch.no_grad():
        for role in ROLES:
            report.roles[role] = check_sizes(role, build_role(role, config.models[role], sources))
    train, detok = config.profile.train, config.profile.detokenizer
    with quiet_libraries():
        report.music, report.music_tokens = music_step(config)
        report.detokenizer = detokenizer_step(config)
    report.music_batch, report.detokenizer_batch = train.batch_size, detok.batch_size
    report.music_checkpointing = train.gradient_checkpointing
    report.detokenizer_checkpointing = detok.gradient_checkpointing
    return report


def _b(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_report(report: Report) -> list[str]:
    lines = [f"{'role':<13} {'part (configs/full/...)':<52} {'class':<34} {'built':>10} {'compared':>10} "
             f"{'published':>10} {'diff':>6}"]
    for role, parts in report.roles.items():
        for part in parts:
            lines.append(f"{role:<13} {part.folder:<52} {part.cls:<34} {_b(part.parameters):>10} "
                         f"{_b(part.counted):>10} {_b(part.published):>10} {part.deviation:>+6.1%}")
    lines.append("(compared: the architecture the published figure covers; SAM 2.1's includes its video memory, "
                 "SigLIP's its text tower)")
    lines.append("")
    lines.append(f"{'training (per GPU)':<30} {'trainable':>10} {'frozen':>10} {'weights':>9} {'grads':>9} "
                 f"{'DDP':>9} {'AdamW':>9} {'autocast':>9} {'act.':>9} {'act.+ckpt':>9} {'peak':>9} {'peak+ckpt':>9}")
    for name, mem in ((f"MUSIC, batch {report.music_batch} x {report.music_tokens} tok", report.music),
                      (f"de-tokenizer, batch {report.detokenizer_batch}", report.detokenizer)):
        gib = [f"{v / GIB:.1f}G" for v in (mem.weights, mem.gradients, mem.buckets, mem.optimizer, mem.casts,
                                          mem.activations, mem.activations_checkpointed, mem.total(False),
                                          mem.total(True))]
        lines.append(f"{name:<30} {_b(mem.trainable):>10} {_b(mem.frozen):>10} " + " ".join(f"{g:>9}" for g in gib))
    if report.plan:
        lines.append(report.plan)
    lines.append(f"gradient checkpointing in the profile: MUSIC {'on' if report.music_checkpointing else 'off'}, "
                 f"de-tokenizer {'on' if report.detokenizer_checkpointing else 'off'}")
    lines.append(f"de-tokenizer training at batch {report.detokenizer_batch} needs {report.detokenizer_gib:.1f} GiB "
                 f"per GPU (fits {GPU_GIB} GiB: {'yes' if report.detokenizer_gib <= GPU_GIB else 'no'})")
    gib = report.music_gib
    lines.append(f"full profile: {len(report.roles)} roles built without weights; MUSIC training at batch "
                 f"{report.music_batch} needs {gib:.1f} GiB per GPU (fits {GPU_GIB} GiB: "
                 f"{'yes' if gib <= GPU_GIB else 'no'})")
    return lines


def run_check(profile: str) -> int:
    """`music check <profile>`: print the report; exit status 1 when MUSIC or de-tokenizer training does not fit."""
    report = check_full(load_config(profile=profile))
    for line in format_report(report):
        print(line, flush=True)
    return 0 if max(report.music_gib, report.detokenizer_gib) <= GPU_GIB else 1
