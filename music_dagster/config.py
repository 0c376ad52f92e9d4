"""The project's one config: `params.yaml`, shared by Dagster and DVC.

`load_config()` validates the whole file before any work starts; every problem becomes a one-line
`ConfigError` naming the key (`profiles.tiny.models.llm: ...`). Nothing here imports torch.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from music_dagster.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = PROJECT_ROOT / "params.yaml"

ROLES = (
    "llm", "vlm", "t2i", "i2i", "detector", "segmenter", "clip", "dino", "eval_clip",
    "music_llm", "music_vision", "music_unet", "select_clip",
)
ZOO_COMMAND = "music zoo build"
MAX_SUBJECTS = 12  # the paper's bound on subjects per sample (1..12): configs, records, the model, generation, MSIC
_HUB_ID = re.compile(r"^(hf-hub:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


TOP_KEYS = ("profile", "seed", "paths", "profiles")  # params.yaml's top level
ABLATIONS = ("none", "no_cot", "no_layout", "neither", "no_decimation")  # `train.ablation`


def plan_parts(ablation: str) -> tuple[bool, bool]:
    """(CoT, layout): the parts of the plan a model trained with `train.ablation` = `ablation` writes."""
    return ablation not in ("no_cot", "neither"), ablation not in ("no_layout", "neither")


class ConfigError(UserError):
    """A bad config value: the message is one line naming the key and the problem."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2's numbers: `1e-4` and `1.0e4` are floats, as DVC reads params.yaml too (PyYAML's YAML 1.1 reads an
    exponent without a dot and a sign as text, which strict types would then refuse)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def did_you_mean(key, known) -> str:
    """` (did you mean 'x'?)` for the closest known name, or nothing."""
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Section(BaseModel):
    """A block of params.yaml. Strict: no bool read as a number, no string as a number (an int is still a float),
    no NaN or infinity; an unknown key is refused with the closest known one."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise PydanticCustomError("unknown_key", "unknown key{hint}",
                                              {"key": key, "hint": did_you_mean(key, cls.model_fields)})
        return data


class _Spelled(_Section):
    """A profile or one of its sections: params.yaml spells out every key, so no default applies unseen (the
    code's defaults are the paper's full-scale values, wrong for the tiny profile)."""

    @model_validator(mode="before")
    @classmethod
    def _every_key(cls, data):
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if name in data:
                    continue
                if isinstance(field.annotation, type) and issubclass(field.annotation, _Spelled):
                    raise PydanticCustomError("missing_section", "section missing (each profile spells out "
                                              "every section; the code's defaults are the paper's full-scale "
                                              "values)", {"key": name})
                default = "" if field.is_required() else f"; the default would be {_shown(field.default)}"
                raise PydanticCustomError("missing_key", "key missing (each profile spells out every key{default})",
                                          {"key": name, "default": default})
        return data


def _shown(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


class ModelSpec(_Section):
    """Where a role's checkpoint lives: a Hub id, or a folder relative to the project root."""

    id: str
    subfolder: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def local_path(self) -> Path | None:
        """The folder this spec names, or None for a Hub id."""
        path = Path(self.id).expanduser()
        if not path.is_absolute():
            path = PROJECT_ROOT / path
        if path.exists() or not _HUB_ID.match(self.id):
            return path
        return None

    @property
    def source(self) -> str:
        """What `from_pretrained` is given: the absolute folder, or the Hub id."""
        local = self.local_path
        return str(local) if local is not None else self.id


class DataConfig(_Spelled):
    shard_size: int = Field(gt=0)
    num_shards: int = Field(gt=0)
    min_categories: int = Field(ge=1, le=MAX_SUBJECTS)
    max_subjects: int = Field(ge=1, le=MAX_SUBJECTS)
    image_size: int = Field(ge=16)
    t2i_steps: int = Field(gt=0)
    i2i_steps: int = Field(gt=0)
    guidance_scale: float = Field(ge=0)
    batch_size: int = Field(gt=0)
    max_retries: int = Field(ge=0)
    max_new_tokens: int = Field(gt=0)
    min_box_area: float = Field(ge=0, lt=1)
    box_threshold: float = Field(ge=0, le=1)
    text_threshold: float = Field(ge=0, le=1)
    grid: int = Field(gt=0)
    lam: float = Field(ge=0, lt=1)  # a patch is in a subject's layout when its IoU > lam x mean IoU
    msic_holdout_every: int = Field(gt=1)
    # fewest subjects a sample keeps; decimation stops there (paper: 2)
    min_subjects: int = Field(ge=1, le=MAX_SUBJECTS)
    temperature: float = Field(ge=0)  # LLM/VLM sampling temperature for free-text answers (retries resample)
    verify_threshold: float = Field(ge=0, lt=1)  # keep a box when the VLM's P(yes) exceeds this
    reference_size: int = Field(ge=16)  # I2I reference images are reference_size x reference_size
    # most words in each subject's CoT sentence (the answer schema's cap): tiny 8, short; full 48, detailed: from
    # `synthesis.prompts.DETAILED_COT_WORDS` on the VLM is asked for each subject's appearance, pose, position and
    # relations (the paper). The plan MUSIC learns grows with it (`music check full` holds max_plan_tokens to it)
    cot_words_per_subject: int = Field(ge=1, le=64)
    categories: list[str] | None = None  # optional subset of the Objects365 names to sample from

    @model_validator(mode="after")
    def _subject_range(self):
        if self.min_categories > self.max_subjects:
            raise ValueError(f"min_categories ({self.min_categories}) exceeds max_subjects ({self.max_subjects})")
        if self.min_subjects > self.min_categories:
            raise ValueError(f"min_subjects ({self.min_subjects}) exceeds min_categories ({self.min_categories})")
        return self


def _check_launch(section) -> None:
    if section.accelerate_config is not None and section.num_processes == 1:  # it would be silently ignored
        raise ValueError(f"accelerate_config ({section.accelerate_config}) needs num_processes above 1 (the "
                         "processes of every machine together)")


def _square(name: str, value: int) -> None:
    if int(value ** 0.5 + 0.5) ** 2 != value:
        raise ValueError(f"{name} must be a square number (tokens pooled from a square patch grid), got {value}")


class _Optimized(_Spelled):
    """A trained section's optimizer keys that every training shares (`training.train.run_loop`); each section sets
    its own `lr`, `warmup_steps` and `batch_size`."""

    weight_decay: float = Field(default=0.0, ge=0)
    # after the warmup: "constant", or "linear", falling to 0 at the run's last step
    lr_schedule: Literal["constant", "linear"] = "constant"
    # an exponential moving average of the trained weights (diffusers' EMAModel), the run's result; 0: none
    ema_decay: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)


class TrainConfig(_Optimized):
    """MUSIC training (`music_dagster.training.train.train_music`); defaults are the paper's where it gives them."""

    source: Literal["synthesized", "procedural", "both"] = "synthesized"  # what `lora_checkpoint` trains on
    # the paper's missing ablations (docs/design.md, the procedural experiment): the plan without its CoT, its
    # layout or both, or training on full subject counts only (no decimation); `none` is the method as published
    ablation: Literal[ABLATIONS] = "none"
    # a `training_samples` shard folder without a manifest is refused; true: train without it (it is logged)
    allow_incomplete_shards: bool = False
    procedural_samples: int = Field(default=512, gt=0)  # size of the procedural world when it is a source
    procedural_image_size: int = Field(default=64, ge=16)
    procedural_min_subjects: int = Field(default=2, ge=1, le=9)
    procedural_max_subjects: int = Field(default=4, ge=1, le=9)
    input_queries: int = Field(default=64, gt=0)  # resampler tokens per subject image
    image_queries: int = Field(default=64, gt=0)  # output image-query tokens = pooled target tokens
    resampler_depth: int = Field(default=1, gt=0)
    resampler_heads: int = Field(default=8, gt=0)
    lora_rank: int = Field(default=64, gt=0)
    lora_alpha: int = Field(default=64, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    # YAML lists: the tuples are the one lax type (a list is accepted; the items stay strict strings)
    lora_targets: tuple[str, ...] = Field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), strict=False)
    modules_to_save: tuple[str, ...] = Field(default=(), strict=False)  # e.g. (embed_tokens, lm_head): tiny LLM
    w1: float = Field(default=0.5, ge=0)  # weight of L1 (CoT + layout cross-entropy)
    w2: float = Field(default=0.5, ge=0)  # weight of L2 (visual-token MSE)
    lr: float = Field(default=1e-4, gt=0)
    warmup_steps: int = Field(default=100, ge=0)
    batch_size: int = Field(default=8, gt=0)  # per process
    # batches of samples of about one length (transformers' `group_by_length`): less padding, the same samples
    group_by_length: bool = False
    epochs: int = Field(default=10, gt=0)
    max_steps: int | None = Field(default=None, gt=0)  # stops earlier than `epochs` when set
    checkpoint_every: int = Field(default=500, gt=0)  # optimizer steps between resumable checkpoints
    checkpoints_kept: int = Field(default=2, gt=0)
    max_plan_tokens: int = Field(default=512, gt=0)  # CoT + layout tokens at inference
    cache_features: bool = False  # keep every sample's vision features in memory (small data only)
    feature_stats_samples: int = Field(default=256, gt=0)  # training targets used for L2 standardisation
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # recompute each decoder layer's activations in the backward pass: memory for about a third more compute
    gradient_checkpointing: bool = True
    # processes of the loop (one per GPU, all machines together): more than 1 runs it under `accelerate launch`;
    # `batch_size` is per process, so the global batch is batch_size * num_processes
    num_processes: int = Field(default=1, gt=0)
    accelerate_config: str | None = None  # an `accelerate config` file (multi-node), relative to the project root

    @model_validator(mode="after")
    def _check(self):
        _square("image_queries", self.image_queries)
        _check_launch(self)
        if self.procedural_min_subjects > self.procedural_max_subjects:
            raise ValueError(f"procedural_min_subjects ({self.procedural_min_subjects}) exceeds "
                             f"procedural_max_subjects ({self.procedural_max_subjects})")
        return self


class DetokenizerConfig(_Optimized):
    """The de-tokenizer (`music_dagster.model.detokenizer`) and its reconstruction training."""

    resampler_queries: int = Field(default=64, gt=0)  # conditioning tokens fed to the UNet's cross-attention
    resampler_depth: int = Field(default=1, gt=0)
    resampler_heads: int = Field(default=8, gt=0)
    vae: ModelSpec | None = None  # a latent-space UNet (in_channels != 3) decodes through this AutoencoderKL
    train_timesteps: int = Field(default=1000, gt=1)  # DDPM noise schedule length
    beta_schedule: Literal["linear", "scaled_linear"] = "scaled_linear"  # SDXL's; a fresh UNet can use DDPM's
    beta_start: float = Field(default=0.00085, gt=0, lt=1)
    beta_end: float = Field(default=0.012, gt=0, lt=1)
    decode_steps: int = Field(default=50, gt=0)  # DDIM steps at inference
    prediction_type: Literal["epsilon", "sample"] = "epsilon"  # the UNet predicts the noise (SDXL's) or the image
    spatial_conditioning: bool = False  # the token grid also as ControlNet-style residuals (not in SEED-X)
    lr: float = Field(default=1e-5, gt=0)
    warmup_steps: int = Field(default=100, ge=0)
    batch_size: int = Field(default=8, gt=0)
    epochs: int = Field(default=10, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    checkpoint_every: int = Field(default=500, gt=0)
    checkpoints_kept: int = Field(default=2, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = True  # recompute each UNet block's activations in the backward pass
    num_processes: int = Field(default=1, gt=0)  # as `train.num_processes`
    accelerate_config: str | None = None  # as `train.accelerate_config`

    @model_validator(mode="after")
    def _check(self):
        _check_launch(self)
        return self


class EvalConfig(_Spelled):
    dreambench: str = "datasets/dreambench"  # the DreamBench copy, relative to the project root
    batch_size: int = Field(default=16, gt=0)  # images per encoder forward pass
    branches: int = Field(default=4, ge=2)  # MUSIC*: CoT/layout branches, the best CLIP-T kept
    dreambench_subjects: int | None = Field(default=None, gt=0)  # None: every subject of the copy
    dreambench_prompts: int | None = Field(default=None, gt=0, le=25)  # None: all 25 of the subject's type
    dreambench_images_per_prompt: int = Field(default=4, gt=0)
    dreambench_live_classes: tuple[str, ...] = Field(default=("cat", "dog"), strict=False)  # the rest are objects
    msic_samples: int | None = Field(default=None, gt=0)  # None: every held-out sample
    box_threshold: float = Field(default=0.35, ge=0, le=1)  # detector thresholds for finding MSIC subjects
    text_threshold: float = Field(default=0.25, ge=0, le=1)


class GenerateConfig(_Spelled):
    """Inference (`music_dagster.model.generate`): how plans are sampled, and the sample generations logged in
    training."""

    temperature: float = Field(default=1.0, gt=0)  # plan sampling when N > 1 branches (one branch decodes greedily)
    top_k: int = Field(default=0, ge=0)  # 0: the whole vocabulary
    max_plan_tokens: int | None = Field(default=None, gt=0)  # None: the checkpoint's own max_plan_tokens
    decode_steps: int | None = Field(default=None, gt=0)  # None: the de-tokenizer's own decode_steps
    logged_samples: int = Field(default=2, ge=0)  # training samples generated and logged to MLflow per training run
    logged_branches: int = Field(default=2, gt=0)  # branches of each logged sample generation


class SelectionConfig(_Optimized):
    """MUSIC*'s selection encoder in the procedural experiment (`experiment.procedural`, its `music_star_clip` row):
    the `select_clip` role's CLIP trained contrastively (open_clip's `ClipLoss`) on the world's training pairs of
    target image and instruction, through the training loop (`training.train.run_loop`, no checkpoints). A CLIP
    that never saw the world (the tiny zoo's random one) chooses at random. `max_steps: 0`: the role's CLIP as it
    is (the paper's off-the-shelf choice)."""

    lr: float = Field(default=1e-5, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=64, gt=1)  # the other pairs of a batch are each pair's negatives
    epochs: int = Field(default=1000, gt=0)
    max_steps: int = Field(default=0, ge=0)


class Profile(_Spelled):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Where concurrent model-heavy steps run, one device per step and per slot of the `gpu` pool (`zoo/devices.py`):
    # `auto` is every visible GPU, or [cpu] without one; a list such as [cuda:0, cuda:1] or [cpu, cpu].
    devices: list[str] | Literal["auto"]
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int = Field(default=1, gt=0)
    pool_wait_s: float = Field(gt=0)  # how long a step waits for a slot of its Dagster pool (`gpu`) before giving up
    models: dict[str, ModelSpec]
    data: DataConfig
    train: TrainConfig
    detokenizer: DetokenizerConfig
    eval: EvalConfig
    generate: GenerateConfig
    selection: SelectionConfig

    @field_validator("devices")
    @classmethod
    def _devices(cls, value):
        if value == "auto":
            return value
        if not value:
            raise ValueError("expected auto or a list of at least one device")
        for device in value:
            if not re.fullmatch(r"cpu|cuda:\d+", device):
                raise ValueError(f"unknown device {device!r} (use cpu or cuda:<index>)")
        gpus = [d for d in value if d != "cpu"]
        if len(set(gpus)) < len(gpus):
            raise ValueError(f"a GPU is listed twice in {value}: two steps would share it")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value):
        if not isinstance(value, dict):
            raise ValueError("expected a mapping of role -> checkpoint")
        unknown = sorted(set(value) - set(ROLES), key=str)
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r}{did_you_mean(unknown[0], ROLES)} "
                             f"(roles: {', '.join(ROLES)})")
        missing = [r for r in ROLES if r not in value]
        if missing:
            raise ValueError(f"role {missing[0]!r} has no checkpoint")
        return {role: {"id": spec} if isinstance(spec, str) else spec for role, spec in value.items()}


class Paths(_Section):
    objects365: str = "data/objects365_categories.json"
    datasets: str = "datasets"
    models: str = "models"
    metrics: str = "metrics"
    mlflow_tracking_uri: str = "sqlite:///mlruns.db"
    mlflow_artifacts: str = "mlartifacts"
    work: str = ".cache"  # resumable training state (`training/`), the procedural experiment's models (`experiment/`)

    def resolve(self, name: str) -> Path:
        """A path of this section as an absolute path (relative ones are relative to the project root)."""
        path = Path(getattr(self, name)).expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path


class Config(_Section):
    profile_name: str
    seed: int
    paths: Paths
    profile: Profile

    @property
    def models(self) -> dict[str, ModelSpec]:
        return self.profile.models

    def check_models(self, roles=ROLES) -> None:
        """Fail before any work when a local checkpoint folder is missing."""
        for role in roles:
            spec = self.models[role]
            path = spec.local_path
            if path is not None and not path.is_dir():
                raise ConfigError(
                    f"profiles.{self.profile_name}.models.{role}: folder {spec.id} is missing "
                    f"(make it with `{ZOO_COMMAND}`)"
                )

    def with_values(self, section: str, **values) -> Config:
        """A copy of this config with fields of `profile.<section>` replaced (`train`, `detokenizer`, ...), e.g.
        `config.with_values("train", max_steps=2)`. The values are not validated again: pass values of the
        field's type."""
        part = getattr(self.profile, section).model_copy(update=values)
        return self.model_copy(update={"profile": self.profile.model_copy(update={section: part})})

    def with_models(self, specs: dict[str, ModelSpec]) -> Config:
        """A copy of this config with the checkpoints of some roles replaced (`{role: ModelSpec}`): what a
        run's model resources load, so what is keyed and logged by the config names them."""
        models = {**self.profile.models, **specs}
        return self.model_copy(update={"profile": self.profile.model_copy(update={"models": models})})

    @property
    def dreambench_dir(self) -> Path:
        """The profile's DreamBench copy (`eval.dreambench`) as an absolute path."""
        path = Path(self.profile.eval.dreambench).expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path

    def require_file(self, name: str) -> Path:
        """A `paths.<name>` entry that must exist, with a one-line error when it does not."""
        path = self.paths.resolve(name)
        if not path.exists():
            raise ConfigError(f"paths.{name}: {path} does not exist")
        return path


def _one_line(error: ValidationError, prefix: str) -> str:
    first = error.errors()[0]
    loc = [prefix, *first["loc"]]
    if "key" in first.get("ctx", {}):  # the error of a whole block names one of its keys
        loc.append(first["ctx"]["key"])
    got = first.get("input")
    if first["type"] in ("unknown_key", "missing_section", "missing_key"):
        got = ""
    elif isinstance(got, (str, int, float, bool)) or got is None:
        got = f" (got {got!r})"
    else:
        got = ""
    message = first["msg"].removeprefix("Value error, ").replace("a valid tuple", "a list")  # YAML has lists
    return f"{'.'.join(str(p) for p in loc if p != '')}: {message}{got}"


def parse_config(raw: dict, profile: str | None = None, source: str = "params.yaml") -> Config:
    """Validate a parsed params mapping (every profile of it) and select one profile."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{source}: {key}: unknown key{did_you_mean(key, TOP_KEYS)}")
    profiles = raw.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        raise ConfigError(f"{source}: profiles: expected a mapping of profile name -> settings")
    name = profile or os.environ.get("MUSIC_PROFILE") or raw.get("profile")
    if name not in profiles:
        raise ConfigError(f"{source}: profile: unknown profile {name!r} (profiles: {', '.join(map(str, profiles))})")
    checked = {}
    for each, settings in profiles.items():  # a typo in a profile not used today is still a typo
        try:
            checked[each] = Profile.model_validate(settings)
        except ValidationError as e:
            raise ConfigError(f"{source}: {_one_line(e, f'profiles.{each}')}") from None
    try:
        return Config.model_validate({"profile_name": name, "seed": raw.get("seed", 0), "paths": raw.get("paths", {}),
                                      "profile": checked[name]})
    except ValidationError as e:
        raise ConfigError(f"{source}: {_one_line(e, '')}") from None


def load_config(path: str | os.PathLike | None = None, profile: str | None = None) -> Config:
    """Read and validate `params.yaml` (or MUSIC_PARAMS, or `path`)."""
    path = Path(path or os.environ.get("MUSIC_PARAMS") or PARAMS_FILE)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path.name}: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) is not "
                          f"UTF-8; save the file as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_config(raw, profile, source=path.name)


@functools.cache
def default_config() -> Config:
    """The config of this process, read once."""
    return load_config()
