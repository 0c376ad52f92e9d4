"""The MUSIC model: a SEED-X-style multimodal LLM built from Hugging Face parts (one file, nanoGPT style).

One sequence serves both stages of the paper:

    [bos] instruction  " [1]" <img> q..q </img>  ...  " [N]" <img> q..q </img>               (prompt)
    " " CoT " layout: 0011..."  <eos>                                                      (plan: f1, L1)
    <query> x image_queries                                                                (f2, L2)

- a frozen vision encoder (`music_vision`: SiglipVisionModel) encodes each subject image; the *input resampler*
  (learned queries cross-attending to the patch features) maps them to `input_queries` LLM embeddings, placed
  between two learned marker embeddings (`<img>`, `</img>`: learned vectors, so no tokenizer or vocabulary change
  is needed in either profile);
- the causal LM (`music_llm`: Qwen3ForCausalLM) is adapted with peft LoRA; `modules_to_save` makes the embeddings
  and output layer trainable where the config says so (a *random* tiny LLM cannot learn the format without them);
- the plan (CoT + the layout in `layout_to_text` form) is predicted with cross-entropy (L1);
- `image_queries` learned query embeddings follow the plan; the *output resampler* maps their last hidden states to
  the target image's vision features pooled to `image_queries` tokens, standardised per channel (MSE, L2).

L = w1 L1 + w2 L2. `plan` samples or greedily decodes plans for N branches in one batch (left padding, KV cache);
`image_tokens` returns the predicted visual tokens (in raw vision-feature space, what the de-tokenizer reads).

This module imports torch at its top: import it inside asset functions, never at the top of a module that
`music_dagster.definitions` imports (transformers, peft and safetensors are imported where they are used).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from music_dagster.config import ABLATIONS, MAX_SUBJECTS, plan_parts
from music_dagster.errors import UserError
from music_dagster.model.layout import TEXT_PREFIX, LayoutError, layout_from_text, layout_to_text
from music_dagster.storage import file_sha256, read_json, resolve_stored, staged_dir
from music_dagster.synthesis.decimation import tag

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

MODEL_CONFIG = "music_config.json"
MODULES_FILE = "music_modules.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Position kinds in a sequence (see `MusicModel.collate`).
TEXT, IMG_START, IMG, IMG_END, QUERY = 0, 1, 2, 3, 4
IGNORE = -100


class CheckpointError(UserError):
    """A MUSIC checkpoint folder that is missing, incomplete or does not fit the given backbone."""


# What a checkpoint's configs must hold: anything else (hand edits, garbage, an older format) is one line naming
# the file. `sha256` records each weight file's content hash at save time; loading verifies it.
_POSITIVE = {"type": "integer", "minimum": 1}
_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}}
SHA256_SCHEMA = {"type": "object", "minProperties": 1,
                 "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}
MODEL_CONFIG_SCHEMA = {
    "type": "object", "required": ["settings", "vision_hidden", "llm_hidden", "sha256"], "additionalProperties": False,
    "properties": {
        "settings": {
            "type": "object", "additionalProperties": False,
            "required": ["input_queries", "image_queries", "resampler_depth", "resampler_heads", "lora_rank",
                         "lora_alpha", "lora_dropout", "lora_targets", "modules_to_save", "w1", "w2",
                         "max_plan_tokens", "grid"],
            "properties": {
                **{k: _POSITIVE for k in ("input_queries", "image_queries", "resampler_depth", "resampler_heads",
                                          "lora_rank", "max_plan_tokens", "grid")},
                "lora_alpha": {"type": "number", "exclusiveMinimum": 0},
                "lora_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                "lora_targets": {**_NAMES, "minItems": 1}, "modules_to_save": _NAMES,
                "w1": {"type": "number", "minimum": 0}, "w2": {"type": "number", "minimum": 0},
                # not required: a checkpoint saved before it was recorded was trained with the full plan ("none")
                "ablation": {"enum": list(ABLATIONS)},
            },
        },
        "vision_hidden": _POSITIVE, "llm_hidden": _POSITIVE, "sha256": SHA256_SCHEMA,
    },
}
ADAPTER_CONFIG_SCHEMA = {  # the keys of peft's LoRA config that MUSIC writes and checks; peft's others may follow
    "type": "object", "required": ["peft_type", "r", "lora_alpha", "target_modules"],
    "properties": {"peft_type": {"const": "LORA"}, "r": _POSITIVE, "lora_alpha": {"type": "number"},
                   "target_modules": {"anyOf": [_NAMES, {"type": "string"}]},
                   "base_model_name_or_path": {"type": ["string", "null"]}},
}


class ModelInputError(UserError):
    """A prompt the model cannot take (no subject, too many subjects, an empty instruction)."""


# ---------------------------------------------------------------------------------------------------------------
# Settings and data
@dataclass(frozen=True)
class MusicSettings:
    """The architecture and loss settings of a MusicModel (a `TrainConfig` subset; saved as `music_config.json`)."""

    input_queries: int = 16
    image_queries: int = 16
    resampler_depth: int = 1
    resampler_heads: int = 4
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    modules_to_save: tuple[str, ...] = ("embed_tokens", "lm_head")
    w1: float = 0.5
    w2: float = 0.5
    max_plan_tokens: int = 256
    grid: int = 8
    ablation: str = "none"  # the `train.ablation` it was trained with: which parts its plans hold (`plan_text`)

    @classmethod
    def from_config(cls, train, grid: int = 8) -> "MusicSettings":
        """The settings named by a `TrainConfig` (plus the layout grid size of the data config)."""
        names = {f for f in cls.__dataclass_fields__ if f != "grid"}
        values = {k: getattr(train, k) for k in names}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}, grid=grid)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Sample:
    """One training or evaluation sample in memory: the data assets' record with its images loaded.

    `references[i]` is the reference image of subject `i + 1`; `instruction` and `cot` refer to subjects by id;
    `layout` is a grid of subject ids (0 = background). `cot`, `layout` and `target` are None for a bare prompt."""

    instruction: str
    references: list
    cot: str | None = None
    layout: np.ndarray | None = None
    target: "Image.Image | None" = None
    id: str = ""
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """One decoded plan: the raw text, its CoT, its layout (None when it does not parse) and the token ids."""

    text: str
    cot: str
    layout: np.ndarray | None
    token_ids: tuple[int, ...]

    @property
    def parsed(self) -> bool:
        return self.layout is not None


def subject_label(i: int) -> str:
    """How subject `i` (1-based) is introduced before its image: its id tag, as instructions and CoTs use it."""
    return f" {tag(i)}"


def plan_text(cot: str, layout: np.ndarray, ablation: str = "none") -> str:
    """The text the model learns to write: the CoT then the layout exactly as the data assets serialise it.
    The `train.ablation`s `no_cot`, `no_layout` and `neither` leave out the CoT, the layout or both (with
    neither, the plan is empty: the image queries follow the eos right after the prompt)."""
    writes_cot, writes_layout = plan_parts(ablation)
    parts = [cot.strip()] if writes_cot else []
    if writes_layout:
        parts.append(layout_to_text(np.asarray(layout)))
    return "".join(f" {part}" for part in parts)


def split_plan(text: str, grid: int | None = None) -> tuple[str, np.ndarray | None]:
    """(CoT, layout) of a decoded plan; the layout is None when the text after the last `layout:` does not parse."""
    at = text.rfind(TEXT_PREFIX)
    if at < 0:
        return text.strip(), None
    try:
        layout = layout_from_text(text[at:], grid)
    except LayoutError:
        layout = None
    return text[:at].strip(), layout


# ---------------------------------------------------------------------------------------------------------------
# Vision features
def vision_features(encoder, processor, images: Sequence) -> torch.Tensor:
    """The frozen encoder's patch features [N, P, D] (float32, on the encoder's device) of PIL images;
    `encoder` and `processor` are a `music_vision` handle's `.model` and `.processor`."""
    if not images:
        return torch.zeros(0, 0, encoder.config.hidden_size)
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    param = next(encoder.parameters())
    with torch.no_grad():
        out = encoder(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state
    return out.float()


def pool_tokens(features: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Patch features [N, P, D] (P a square number) average-pooled to [N, n_tokens, D] (n_tokens a square)."""
    n, p, d = features.shape
    side, out = math.isqrt(p), math.isqrt(n_tokens)
    if side * side != p or out * out != n_tokens:
        raise ValueError(f"pooling needs square token counts, got {p} patches -> {n_tokens} tokens")
    grid = features.transpose(1, 2).reshape(n, d, side, side)
    return F.adaptive_avg_pool2d(grid, out).flatten(2).transpose(1, 2)


def target_tokens(encoder, processor, images: Sequence, n_tokens: int) -> torch.Tensor:
    """The visual tokens of target images [N, n_tokens, D]: vision features pooled to `n_tokens` (what MUSIC
    regresses and the de-tokenizer decodes)."""
    return pool_tokens(vision_features(encoder, processor, images), n_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Modules
class Resampler(nn.Module):
    """Perceiver-style resampler: `n_queries` learned queries cross-attend to the input tokens.

    [B, T, in_dim] -> [B, n_queries, out_dim]."""

    def __init__(self, in_dim: int, dim: int, out_dim: int, n_queries: int, heads: int = 4, depth: int = 1):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.proj_in = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim))
        self.blocks = nn.ModuleList(ResamplerBlock(dim, heads) for _ in range(depth))
        self.proj_out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim))

    def forward(self, x):
        kv = self.proj_in(x)
        q = self.queries.expand(x.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        return self.proj_out(q)


class ResamplerBlock(nn.Module):
    """Pre-norm cross-attention of the queries to the inputs, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q, kv):
        kv = self.ln_kv(kv)
        q = q + self.attn(self.ln_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.ln_mlp(q))


class MusicModel(nn.Module):
    """SEED-X-style MUSIC model over a `music_llm` handle and a `music_vision` handle (see the module doc).

    The LLM handle's model is wrapped by peft *in place* (LoRA layers are injected into it): give each
    MusicModel its own freshly loaded LLM handle."""

    def __init__(self, llm, vision, settings: MusicSettings, base_model_name: str | None = None):
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig, get_peft_model

        super().__init__()
        self.settings = settings
        self.tokenizer = llm.tokenizer
        if self.tokenizer.eos_token_id is None:
            raise CheckpointError("music_llm: the tokenizer has no eos token (the plan needs an end)")
        self.processor = vision.processor
        self.vision = vision.model.eval().requires_grad_(False)
        for name, n in (("image_queries", settings.image_queries), ("input_queries", settings.input_queries)):
            if n < 1:
                raise CheckpointError(f"{name} must be positive, got {n}")
        base = llm.model
        lora = LoraConfig(
            r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
            target_modules=list(settings.lora_targets), modules_to_save=list(settings.modules_to_save) or None,
            task_type="CAUSAL_LM",
        )
        self._llm_dtype = base.dtype
        self.llm = get_peft_model(base, lora)
        # trained in float32 over bf16 backbones (AdamW's small updates would round away in bf16): peft upcasts the
        # LoRA weights itself, not the full trainable copies of `modules_to_save`
        cast_training_params(self.llm, dtype=torch.float32)
        if base_model_name is not None:  # a portable name (Hub id or project-relative folder), not a local path
            self.llm.peft_config["default"].base_model_name_or_path = base_model_name
        hidden = base.config.hidden_size
        vdim = vision.model.config.hidden_size
        device = next(base.parameters()).device
        self.input_resampler = Resampler(vdim, hidden, hidden, settings.input_queries,
                                         settings.resampler_heads, settings.resampler_depth).to(device)
        self.output_resampler = Resampler(hidden, hidden, vdim, settings.image_queries,
                                          settings.resampler_heads, settings.resampler_depth).to(device)
        self.image_queries = nn.Parameter(torch.randn(settings.image_queries, hidden, device=device) * 0.02)
        self.image_markers = nn.Parameter(torch.randn(2, hidden, device=device) * 0.02)
        # Per-channel statistics of target tokens: L2 is computed on standardised features.
        self.register_buffer("feature_mean", torch.zeros(vdim, device=device))
        self.register_buffer("feature_std", torch.ones(vdim, device=device))

    # ---- plumbing -----------------------------------------------------------------------------------
    @property
    def device(self):
        return self.image_queries.device

    @property
    def llm_dtype(self):
        """The dtype the LLM was loaded in (its trained parts are float32)."""
        return self._llm_dtype

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # frozen encoder: never in training mode
        return self

    def trainable_state_dict(self) -> dict:
        """Every trainable tensor outside the LLM (resamplers, queries, markers) plus the feature statistics."""
        names = ("input_resampler", "output_resampler", "image_queries", "image_markers",
                 "feature_mean", "feature_std")
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in names}

    def set_feature_stats(self, tokens: torch.Tensor) -> None:
        """Standardise L2 targets with the per-channel mean and std of `tokens` [N, Q, D] (training targets)."""
        flat = tokens.reshape(-1, tokens.shape[-1]).to(self.device, torch.float32)
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0) + 1e-6)

    def standardise(self, tokens):
        return (tokens.to(self.device, torch.float32) - self.feature_mean) / self.feature_std

    def encode_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- encoding samples ---------------------------------------------------------------------------
    def tokens(self, sample: Sample, with_target: bool = True, ablation: str = "none") -> dict:
        """Token ids, position kinds, labels and prompt length of one sample, from its text alone (no image is
        encoded). `with_target`: the plan (as `plan_text` writes it for `ablation`), eos and image queries follow
        the prompt."""
        n = len(sample.references)
        if n < 1 or n > MAX_SUBJECTS:
            raise ModelInputError(f"sample {sample.id or '?'}: {n} subjects (expected 1..{MAX_SUBJECTS})")
        if not sample.instruction.strip():
            raise ModelInputError(f"sample {sample.id or '?'}: empty instruction")
        ids, kinds = [], []

        def text(t, ids=ids, kinds=kinds):
            new = self.encode_ids(t)
            ids.extend(new)
            kinds.extend([TEXT] * len(new))

        if self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            kinds.append(TEXT)
        text(sample.instruction.strip())
        q = self.settings.input_queries
        for i in range(1, n + 1):
            text(subject_label(i))
            ids.extend([0] * (q + 2))
            kinds.extend([IMG_START] + [IMG] * q + [IMG_END])
        labels = [IGNORE] * len(ids)
        prompt_len = len(ids)
        if with_target:
            if sample.cot is None or sample.layout is None or sample.target is None:
                raise ModelInputError(f"sample {sample.id or '?'}: a training sample needs cot, layout and target")
            plan_ids = self.encode_ids(plan_text(sample.cot, sample.layout, ablation)) + [self.tokenizer.eos_token_id]
            ids += plan_ids
            kinds += [TEXT] * len(plan_ids)
            labels += plan_ids
            ids += [0] * self.settings.image_queries
            kinds += [QUERY] * self.settings.image_queries
            labels += [IGNORE] * self.settings.image_queries
        return {"ids": ids, "kinds": kinds, "labels": labels, "prompt_len": prompt_len}

    def encode(self, sample: Sample, with_target: bool = True, ablation: str = "none") -> dict:
        """`tokens` as tensors, with the vision features of the references and (`with_target`) the target's
        visual tokens (no grad; the training loop caches these)."""
        tokens = self.tokens(sample, with_target, ablation)
        out = {"prompt_len": tokens["prompt_len"]}
        if with_target:
            target = target_tokens(self.vision, self.processor, [sample.target], self.settings.image_queries)
            out["target"] = target[0].cpu()
        references = vision_features(self.vision, self.processor, sample.references)
        out.update(ids=torch.tensor(tokens["ids"]), kinds=torch.tensor(tokens["kinds"], dtype=torch.int8),
                   labels=torch.tensor(tokens["labels"]), references=references.cpu())
        return out

    def collate(self, encoded: Sequence[dict], left_pad: bool = False, extra=None) -> dict:
        """Pad encoded samples into one batch. `extra[b]` (ids, kinds) is appended to row b (plans + queries
        at inference). Positions follow each row's own tokens, so left and right padding give the same values."""
        rows = []
        for b, e in enumerate(encoded):
            ids, kinds, labels = e["ids"], e["kinds"], e["labels"]
            if extra is not None and extra[b] is not None:
                x_ids, x_kinds = extra[b]
                ids = torch.cat([ids[: e["prompt_len"]], x_ids])
                kinds = torch.cat([kinds[: e["prompt_len"]], x_kinds])
                labels = torch.full_like(ids, IGNORE)
            rows.append((ids, kinds, labels))
        length = max(len(r[0]) for r in rows)
        B = len(rows)
        ids = torch.zeros(B, length, dtype=torch.long)
        kinds = torch.full((B, length), -1, dtype=torch.int8)
        labels = torch.full((B, length), IGNORE, dtype=torch.long)
        mask = torch.zeros(B, length, dtype=torch.long)
        for b, (i, k, l) in enumerate(rows):
            s = slice(length - len(i), length) if left_pad else slice(0, len(i))
            ids[b, s], kinds[b, s], labels[b, s], mask[b, s] = i, k, l, 1
        batch = {
            "ids": ids, "kinds": kinds, "labels": labels, "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "references": torch.cat([e["references"] for e in encoded]),
        }
        if all("target" in e for e in encoded):
            batch["targets"] = torch.stack([e["target"] for e in encoded])
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- the network ----------------------------------------------------------------------------------
    def embed(self, batch: dict) -> torch.Tensor:
        """Input embeddings of a collated batch: token embeddings with image slots and queries filled in."""
        base = self.llm.get_base_model()
        kinds = batch["kinds"]
        x = base.get_input_embeddings()(batch["ids"]).float()
        x = x.masked_fill((kinds != TEXT).unsqueeze(-1), 0.0)
        n_img = int((kinds == IMG).sum())
        if n_img:
            refs = self.input_resampler(batch["references"].to(self.device, torch.float32))
            # under autocast the resampler answers in bf16/fp16; the embeddings are assembled in float32
            x = x.index_put((kinds == IMG).nonzero(as_tuple=True), refs.reshape(-1, refs.shape[-1]).to(x.dtype))
        x = x + (kinds == IMG_START).unsqueeze(-1) * self.image_markers[0]
        x = x + (kinds == IMG_END).unsqueeze(-1) * self.image_markers[1]
        n_query = int((kinds == QUERY).sum())
        if n_query:
            q = self.image_queries.repeat(n_query // self.settings.image_queries, 1)
            x = x.index_put((kinds == QUERY).nonzero(as_tuple=True), q.to(x.dtype))
        return x.to(self.llm_dtype)

    def hidden(self, batch: dict, cache=None, use_cache: bool = False, inputs_embeds=None):
        """The LLM's last hidden states (and cache) for a collated batch or for given embeddings."""
        base = self.llm.get_base_model()
        out = base.model(
            inputs_embeds=self.embed(batch) if inputs_embeds is None else inputs_embeds,
            attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
            cache=cache, use_cache=use_cache,
        )
        return out.last_hidden_state, out.cache

    def logits(self, h) -> torch.Tensor:
        """Float32 next-token logits of hidden states (a trained `lm_head` copy is float32 over a bf16 LLM)."""
        head = self.llm.get_base_model().lm_head
        return head(h.to(head.weight.dtype)).float()

    def predict_tokens(self, h, kinds) -> torch.Tensor:
        """Output resampler over the query positions' hidden states -> standardised visual tokens [B, Q, D]."""
        B = h.shape[0]
        hq = h[kinds == QUERY].reshape(B, self.settings.image_queries, -1).float()
        return self.output_resampler(hq)

    def forward(self, batch: dict) -> dict:
        """Losses of a collated training batch: {"L1", "L2", "loss", "pred"} (pred standardised)."""
        h, _ = self.hidden(batch)
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        logits = self.logits(h[:, :-1][keep])
        l1 = F.cross_entropy(logits, labels[keep])
        pred = self.predict_tokens(h, batch["kinds"])
        l2 = F.mse_loss(pred, self.standardise(batch["targets"]))
        loss = self.settings.w1 * l1 + self.settings.w2 * l2
        return {"L1": l1, "L2": l2, "loss": loss, "pred": pred}

    # ---- inference ------------------------------------------------------------------------------------
    @torch.no_grad()
    def plan(self, prompts: Sequence[Sample], branches: int = 1, sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, max_new_tokens: int | None = None,
             seed: int = 0, encoded: Sequence[dict] | None = None, constrained: bool = False
             ) -> list[list[Plan]]:
        """Decode `branches` plans per prompt, all rows in one batch (left padding, KV cache).

        Greedy when `sample` is False (then branches are identical); else multinomial sampling at
        `temperature` (top-k when > 0) from a generator seeded with `seed`. `constrained`: decode under the
        plan's grammar for each prompt's subject count and the parts the model was trained to write
        (`settings.ablation`: the CoT only, the layout only; `plan_grammar`: a layout always parses when the token
        limit holds the shortest plan; `neither`'s plan is empty, so nothing is decoded); inference does,
        training's teacher forcing and the procedural experiment (which scores what the model writes unguided)
        do not. Returns one list per prompt."""
        if branches < 1:
            raise ModelInputError(f"branches must be >= 1, got {branches}")
        if sample and temperature <= 0:
            raise ModelInputError(f"temperature must be > 0 for sampling, got {temperature}")
        if constrained and plan_parts(self.settings.ablation) == (False, False):
            return [[Plan(text="", cot="", layout=None, token_ids=())] * branches for _ in prompts]
        was_training = self.training
        self.eval()
        encoded = encoded or [self.encode(p, with_target=False) for p in prompts]
        rows = [e for e in encoded for _ in range(branches)]
        batch = self.collate(rows, left_pad=True)
        eos = self.tokenizer.eos_token_id
        limit = max_new_tokens or self.settings.max_plan_tokens
        gen = torch.Generator(device=self.device).manual_seed(seed)
        processor = None
        if constrained:
            from music_dagster.model.plan_grammar import plan_processor

            processor = plan_processor(self.tokenizer, [len(p.references) for p in prompts for _ in range(branches)],
                                       self.settings.grid, limit, self.settings.ablation)
        base = self.llm.get_base_model()
        emb = base.get_input_embeddings()
        h, cache = self.hidden(batch, use_cache=True)
        mask, pos = batch["attention_mask"], batch["position_ids"][:, -1:]
        B = len(rows)
        out = torch.zeros(B, 0, dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for _ in range(limit):
            logits = self.logits(h[:, -1])
            if processor is not None:
                logits = processor(out, logits)
            if sample:
                logits = logits / temperature
                if top_k > 0:
                    kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == eos
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=self.device)], 1)
            pos = pos + 1
            step = {"attention_mask": mask, "position_ids": pos}
            h, cache = self.hidden(step, cache=cache, use_cache=True,
                                   inputs_embeds=emb(nxt[:, None]).to(self.llm_dtype))
        self.train(was_training)
        plans = []
        for row in out.tolist():
            ids = tuple(row[: row.index(eos)] if eos in row else row)
            text = self.tokenizer.decode(list(ids))
            cot, layout = split_plan(text, self.settings.grid)
            plans.append(Plan(text=text, cot=cot, layout=layout, token_ids=ids))
        return [plans[i * branches:(i + 1) * branches] for i in range(len(encoded))]

    @torch.no_grad()
    def image_tokens(self, prompts: Sequence[Sample], plans: Sequence[Plan],
                     encoded: Sequence[dict] | None = None) -> torch.Tensor:
        """Predicted visual tokens [B, image_queries, D] (raw vision-feature space) for row b = (prompts[b],
        plans[b]): the plan's tokens, eos, then the image queries, in one batched forward."""
        if len(prompts) != len(plans):
            raise ModelInputError(f"{len(prompts)} prompts but {len(plans)} plans")
        was_training = self.training
        self.eval()
        encoded = encoded or [self.encode(p, with_target=False) for p in prompts]
        q = self.settings.image_queries
        extra = []
        for plan in plans:
            ids = list(plan.token_ids) + [self.tokenizer.eos_token_id]
            extra.append((torch.tensor(ids + [0] * q),
                          torch.tensor([TEXT] * len(ids) + [QUERY] * q, dtype=torch.int8)))
        batch = self.collate(encoded, left_pad=True, extra=extra)
        h, _ = self.hidden(batch)
        pred = self.predict_tokens(h, batch["kinds"])
        self.train(was_training)
        return pred * self.feature_std + self.feature_mean

    # ---- persistence ----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the peft adapter (`adapter_model.safetensors`, `adapter_config.json`), the resamplers, query
        and marker embeddings and feature statistics (`music_modules.safetensors`) and `music_config.json` (with
        the sha256 of both weight files), atomically (a temporary sibling folder renamed into place)."""
        from safetensors.torch import save_file

        with staged_dir(directory) as tmp:
            lora = self.llm.peft_config["default"]
            if isinstance(lora.target_modules, set):  # peft writes a set in hash order: differs per process
                lora.target_modules = sorted(lora.target_modules)
            self.llm.save_pretrained(str(tmp), safe_serialization=True)
            (tmp / "README.md").unlink(missing_ok=True)  # peft's model card names the local base path: not portable
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
                       for k, v in self.trainable_state_dict().items()}
            save_file(tensors, str(tmp / MODULES_FILE), metadata={"format": "pt"})
            meta = {"settings": self.settings.to_json(), "vision_hidden": self.vision.config.hidden_size,
                    "llm_hidden": self.llm.get_base_model().config.hidden_size, "sha256": weight_hashes(tmp)}
            (tmp / MODEL_CONFIG).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return Path(directory)

    def load_trainable(self, directory: str | os.PathLike) -> None:
        """Load the adapter and module weights of a `save_pretrained` folder into this (trainable) model."""
        directory = Path(directory)
        check_checkpoint(directory)
        self._load_weights(directory)

    def _load_weights(self, directory: Path) -> None:
        """Both weight files, after checking that their tensor names and shapes are this model's (so that a
        checkpoint of other settings or backbones loads nothing)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter, modules = directory / ADAPTER_FILES[1], directory / MODULES_FILE
        check_tensors(adapter, safetensors_shapes(adapter, CheckpointError),
                      get_peft_model_state_dict(self.llm), CheckpointError)
        check_tensors(modules, safetensors_shapes(modules, CheckpointError), self.trainable_state_dict(),
                      CheckpointError)
        set_peft_model_state_dict(self.llm, load_file(str(adapter), device=str(self.device)))
        self.load_state_dict(load_file(str(modules), device=str(self.device)), strict=False)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, llm, vision, saved: "SavedModel | None" = None
                        ) -> "MusicModel":
        """Load a `save_pretrained` folder onto fresh backbone handles, after `check_checkpoint` (`saved`: its
        result, when the caller has just run it: it hashes every weight file). The result is in eval mode."""
        directory = Path(directory)
        saved = saved or check_checkpoint(directory)
        if saved.vision_hidden != vision.model.config.hidden_size or \
                saved.llm_hidden != llm.model.config.hidden_size:
            raise CheckpointError(f"{directory}: made for other backbones (hidden sizes differ)")
        model = cls(llm, vision, saved.settings, base_model_name=saved.base_model_name)
        model._load_weights(directory)
        # A frozen adapter, as peft loads one for inference. The resamplers keep their flags: frozen, their
        # attention would take another kernel, with other float sums.
        model.llm.requires_grad_(False)
        return model.eval()


@dataclass(frozen=True)
class SavedModel:
    """What a checked checkpoint folder's configs say."""

    settings: MusicSettings
    vision_hidden: int
    llm_hidden: int
    base_model_name: str | None
    sha256: dict[str, str]  # weight file -> the content hash recorded at save time


def check_checkpoint(directory: Path) -> SavedModel:
    """What a MUSIC checkpoint folder's configs say (`read_saved`), after also checking that each weight file is a
    complete safetensors file with the sha256 `music_config.json` records. Any fault is one line naming the file;
    nothing is loaded."""
    saved = read_saved(directory)
    verify_weights(directory, saved.sha256, MODEL_CONFIG, CheckpointError)
    return saved


def read_saved(directory: Path) -> SavedModel:
    """What a MUSIC checkpoint folder's configs say, after checking that every file is there and both configs are
    UTF-8 JSON of their schema and agree; the weights are not read (a check before anything loads: a given plan
    against the checkpoint's `ablation`). Any fault is one line naming the file."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    for name in (*ADAPTER_FILES, MODULES_FILE, MODEL_CONFIG):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
    meta = read_json(directory / MODEL_CONFIG, MODEL_CONFIG_SCHEMA, CheckpointError)
    adapter_config = directory / ADAPTER_FILES[0]
    adapter = read_json(adapter_config, ADAPTER_CONFIG_SCHEMA, CheckpointError)
    settings = MusicSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["settings"].items()})
    for key, value in (("r", settings.lora_rank), ("lora_alpha", settings.lora_alpha)):
        if adapter[key] != value:
            raise CheckpointError(f"{adapter_config}: {key} is {adapter[key]} but {MODEL_CONFIG} says {value}")
    return SavedModel(settings, meta["vision_hidden"], meta["llm_hidden"], adapter.get("base_model_name_or_path"),
                      meta["sha256"])


# ---------------------------------------------------------------------------------------------------------------
# Weight files (shared with the de-tokenizer)
def weight_hashes(folder: Path) -> dict[str, str]:
    """The sha256 of every safetensors file under `folder`, by folder-relative POSIX name: what a saved config
    records and `verify_weights` checks."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*.safetensors"))}


def verify_weights(directory: Path, recorded: dict[str, str], config: str, error: type[UserError]) -> None:
    """Check that the safetensors files under `directory` are those the config file `config` records: the same
    names, each a complete safetensors file (its header read), each with the recorded sha256."""
    where = f"{directory / config}: sha256"
    paths = {name: resolve_stored(directory, name, where) for name in sorted(recorded)}
    unlisted = sorted(set(p.relative_to(directory).as_posix() for p in directory.rglob("*.safetensors")) - set(paths))
    if unlisted:
        raise error(f"{directory / unlisted[0]}: not among the weight files {config} records (copied in by hand?)")
    for name, path in paths.items():
        if not path.is_file():
            raise error(f"{path}: missing ({config} records its sha256)")
        safetensors_shapes(path, error)  # a truncated or foreign file: say so, rather than "hash differs"
        if file_sha256(path) != recorded[name]:
            raise error(f"{path}: content differs from the sha256 {config} records (damaged or replaced)")


def safetensors_shapes(path: Path, error: type[UserError]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors file's header (nothing loaded); a truncated file or another
    format is one line naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise error(f"{path}: not a complete safetensors file ({reason})") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None


def check_tensors(path: Path, shapes: dict[str, tuple[int, ...]], expected: dict, error: type[UserError]) -> None:
    """Refuse weights (`shapes`: name -> shape, read from `path`) whose names or shapes differ from the tensors
    the model has (`expected`: name -> tensor)."""
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing:
        raise error(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing): not made for this model")
    if unexpected:
        raise error(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected): not made for this "
                    "model")
    for name, tensor in sorted(expected.items()):
        if shapes[name] != tuple(tensor.shape):
            raise error(f"{path}: tensor {name} has shape {list(shapes[name])}, this model's is "
                        f"{list(tensor.shape)}")
