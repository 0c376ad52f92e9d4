"""The tiny model zoo: one folder per role under `models/tiny/`, random weights, offline tokenizers.

Every role is a small config of the *same architecture* as its full-profile checkpoint, saved with the library's own
`save_pretrained` (open_clip: `open_clip_config.json` + `open_clip_model.safetensors`, its `local-dir:` layout; timm:
`save_for_hf`'s `config.json` + `model.safetensors`), so `loaders.load_role` loads both with one code path. Each
role is built into a temporary folder and renamed into place; the same seed gives byte-identical files (checked by
`zoo.json`'s hashes). Heavy imports happen inside functions.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from music_dagster.config import ROLES
from music_dagster.errors import UserError

MANIFEST = "zoo.json"
# A role whose manifest entry has another fingerprint was built by other code and is rebuilt by `ensure_zoo`.
BUILDER_FINGERPRINT = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


class ZooError(UserError):
    """A bad zoo request (unknown role)."""


# ---------------------------------------------------------------------------------------------------------------
# Embedded tokenizer corpus: the words and formats the pipeline's prompts and answers use (categories, captions,
# JSON answers, yes/no, instructions with subject ids, CoT, digit layouts), generated in a fixed order.
_OBJECTS = (
    "person sneakers chair hat car lamp glasses bottle desk cup plate helmet book gloves boat flower bench plant "
    "bowl flag pillow boots vase microphone necklace ring wine glass belt monitor backpack umbrella traffic light "
    "speaker watch tie trash can slippers bicycle stool barrel van couch sandals basket drum guitar bus horse dog "
    "cat cake teddy bear balloon apple banana orange pizza clock kite sofa laptop phone camera truck bird sheep cow"
).split()
_COLORS = "red green blue yellow white black brown orange purple pink gray golden".split()
_SCENES = ("a kitchen", "a living room", "a park", "a street", "a beach", "an office", "a garden", "a table")
_RELATIONS = ("next to", "on top of", "in front of", "behind", "to the left of", "to the right of", "under", "near")
_REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
_SHAPES = ("circle", "square", "triangle")


def corpus() -> list[str]:
    """About 700 short lines in a fixed order (the tokenizers' training text)."""
    lines = []
    n = len(_OBJECTS)
    for i, obj in enumerate(_OBJECTS):
        other, third = _OBJECTS[(i * 7 + 3) % n], _OBJECTS[(i * 11 + 5) % n]
        color, scene = _COLORS[i % len(_COLORS)], _SCENES[i % len(_SCENES)]
        rel, region = _RELATIONS[i % len(_RELATIONS)], _REGIONS[i % len(_REGIONS)]
        lines += [
            f"a photo of a {obj}",
            f"a {color} {obj} {rel} a {other} in {scene}.",
            f"A {obj} and a {other} with a {third} in {scene}, high quality photo.",
            f'{{"keep": ["{obj}", "{other}", "{third}"], "scene": "{scene}"}}',
            f'{{"caption": "a {color} {obj} {rel} the {other}"}}',
            f"Does the box contain a {obj}? Answer yes or no. {'yes' if i % 2 else 'no'}",
            f"Place subject {i % 12 + 1} at the {region} and subject {(i + 5) % 12 + 1} {rel} it.",
            f"subject {i % 12 + 1} is the {obj}: it stands {rel} subject {(i + 3) % 12 + 1} at the {region}.",
            f"make the {obj} {color} and show it from the side",
            f"subject {i % 4 + 1} is a {color} {_SHAPES[i % 3]} at the {region}.",
        ]
    for k in range(64):  # 8x8 layouts serialised as digits, rows separated by spaces
        rows = [
            "".join(str((r * 3 + c * 5 + k) % 13 if (r + c + k) % 4 else 0) for c in range(8)) for r in range(8)
        ]
        lines.append("layout: " + " ".join(rows))
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers, trained offline with `tokenizers` and wrapped in the full checkpoints' tokenizer classes.
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
MUSIC_SPECIALS = ("<pad>", "<bos>", "<eos>", "<img>", "</img>")

# Qwen's ChatML format (thinking switch as in Qwen3), without tool calling.
LLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Qwen2-VL's template: an image entry of a message's content becomes the vision placeholder the processor expands.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_bpe(specials, vocab_size, pre_tokenizer):
    """(vocab, merges) of a byte-level BPE trained on the embedded corpus. Deterministic: with every byte in the
    initial alphabet the trainer numbers symbols in sorted order, and it breaks count ties by those numbers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def make_qwen_tokenizer(specials=QWEN_SPECIALS, vocab_size=1024, **special_tokens):
    """A Qwen2Tokenizer (the class of Qwen3 and Qwen2.5-VL) over a BPE trained with Qwen's own pre-tokenizer
    (its regex splits every digit on its own, as the layout serialisation needs)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    # An empty tokenizer's pre-tokenizer is exactly Qwen's, so the BPE is trained on the same word split.
    vocab, merges = _train_bpe(specials, vocab_size, Qwen2Tokenizer().backend_tokenizer.pre_tokenizer)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, **special_tokens)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    return tok


def _learn_merges(words: dict[tuple[str, ...], int], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE merge learning with ties broken by the pair itself. (`tokenizers`' trainer numbers end-of-word
    symbols in hash order, so its tie-breaking, and the merges, change from run to run.)"""
    merges = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def make_clip_tokenizer(max_length=77, n_merges=200):
    """CLIPTokenizer (Flux's first tokenizer), laid out as openai/clip's: every byte, every byte + '</w>', the
    merges learned on the corpus, then the two specials."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # CLIP's own normaliser and word split
    words: dict[tuple[str, ...], int] = {}
    for line in corpus():
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            key = (*word[:-1], word[-1] + "</w>")
            words[key] = words.get(key, 0) + 1
    merges = _learn_merges(words, n_merges)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def make_t5_tokenizer():
    """T5Tokenizer (Flux's second tokenizer) in T5's id layout (<pad>, </s>, <unk>, pieces): a unigram model whose
    pieces are the corpus's words and characters scored by log frequency (the unigram trainer's seed vocabulary;
    the trainer itself sums floats in parallel, so its scores differ in the last digits between runs)."""
    import math

    from transformers import T5Tokenizer

    counts: dict[str, int] = {}
    for line in corpus():
        for word in line.split():
            for piece in ["▁" + word, "▁", *word]:
                counts[piece] = counts.get(piece, 0) + 1
    total = sum(counts.values())
    pieces = sorted(((p, round(math.log(c / total), 4)) for p, c in counts.items()), key=lambda ps: (-ps[1], ps[0]))
    return T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces], extra_ids=0)


def make_bert_uncased_tokenizer():
    """BertTokenizer with bert-base-uncased's special-id layout: GroundingDINO hard-codes [CLS]=101, [SEP]=102,
    '.'=1012, '?'=1029 to split phrases. Ids 999.. are punctuation, digits and lowercase letters as in BERT."""
    from transformers import BertTokenizer

    v = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    v += [f"[unused{i}]" for i in range(99, 99 + 999 - len(v))]
    v += [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    v += ["##" + chr(c) for c in range(97, 123)] + ["##" + chr(c) for c in range(48, 58)]
    words = sorted({w for line in corpus() for w in line.lower().split() if w.isalpha()})
    v += [w for w in words if w not in set(v)]  # a duplicate would leave an id gap
    vocab = {t: i for i, t in enumerate(v)}
    assert (vocab["[CLS]"], vocab["[SEP]"], vocab["."], vocab["?"]) == (101, 102, 1012, 1029)
    return BertTokenizer(vocab=vocab, do_lower_case=True)


# ---------------------------------------------------------------------------------------------------------------
# Role builders: each writes one role's folder and returns the object it saved.
def _build_llm(out: Path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = make_qwen_tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = LLM_CHAT_TEMPLATE
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    _set_generation(model, tok, cfg.bos_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model


def _set_generation(model, tok, bos_token_id) -> None:
    """`generate` stops at the tokenizer's eos and pads with its pad, as the released checkpoints do."""
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = bos_token_id, tok.eos_token_id, tok.pad_token_id


def _build_vlm(out: Path):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok = make_qwen_tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    # 56..112 px images: 2x2..4x4 merged tokens, the real processor's resize rule at a small scale.
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tok, chat_template=VLM_CHAT_TEMPLATE,
    )
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            # mrope_section sums to head_dim / 2
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    _set_generation(model, tok, ids["<|endoftext|>"])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model


def _flux_components() -> dict:
    """FLUX.1's component classes at toy sizes (Kontext uses the very same components)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = make_clip_tokenizer(), make_t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    vae = AutoencoderKL(  # transformer in_channels = 4 * latent_channels (2x2 latent packing)
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        shift=3.0,
    )
    for m in (text_encoder, text_encoder_2, transformer, vae):
        m.eval()  # fresh models are in training mode (T5 dropout)
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                text_encoder_2=text_encoder_2, tokenizer_2=tok2, transformer=transformer)


def _build_t2i(out: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**_flux_components())
    pipe.save_pretrained(out)
    return pipe


def _build_i2i(out: Path):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**_flux_components())
    pipe.save_pretrained(out)
    return pipe


def _build_detector(out: Path):
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    tok = make_bert_uncased_tokenizer()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}), tokenizer=tok,
    )
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 2],
                                   window_size=4, out_features=["stage1", "stage2", "stage3"]),
        text_config=BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=256),
        d_model=32, encoder_layers=1, decoder_layers=2,  # 1 decoder layer breaks the tied-weights regex
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=20, num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=256,
    )
    model = GroundingDinoForObjectDetection(cfg).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model


SAM_SIZE = 128  # model input side (SAM 2.1: 1024); feature maps at /4, /8, /16


def _build_segmenter(out: Path):
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2ImageProcessor, Sam2Model, Sam2Processor

    s = SAM_SIZE
    cfg = Sam2Config(
        vision_config=dict(
            backbone_config=Sam2HieraDetConfig(  # an object: a plain dict lacks model_type
                image_size=[s, s], hidden_size=16, num_attention_heads=1, blocks_per_stage=[1, 2, 2, 1],
                embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 2, 2],
                window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[4],  # not a stage's first block
                window_positional_embedding_background_size=[4, 4],
            ),
            backbone_channel_list=[128, 64, 32, 16], backbone_feature_sizes=[[s // 4] * 2, [s // 8] * 2, [s // 16] * 2],
            fpn_hidden_size=32,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=s, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
    )
    model = Sam2Model(cfg).eval()
    processor = Sam2Processor(image_processor=Sam2ImageProcessor(
        size={"height": s, "width": s}, mask_size={"height": s // 4, "width": s // 4}))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model


OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 16, "patch_size": 16, "mlp_ratio": 2.0},
    # open_clip's SimpleTokenizer (its BPE ships in the wheel) has 49408 tokens
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _build_clip(out: Path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    model = open_clip.CLIP(**OPEN_CLIP_CFG).eval()
    # open_clip's hf-hub layout, which its `local-dir:` schema reads back
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    _write_json(out / "open_clip_config.json", {"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": preprocess})
    state = {k: v.contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={"format": "pt"})
    return model


def _build_dino(out: Path):
    import timm
    from timm.models import save_for_hf

    # timm's DINO ViT-S/16 (`vit_small_patch16_224.dino`: no head) narrowed, in its Hub layout (`config.json` with
    # the arguments, `model.safetensors`); at 224 px the eval protocol's crop gives the real 14x14 patch grid.
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    model = timm.create_model("vit_small_patch16_224.dino", pretrained=False, **args).eval()
    save_for_hf(model, out, model_args=args, safe_serialization=True)
    return model


def _build_music_llm(out: Path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = make_qwen_tokenizer(MUSIC_SPECIALS, 512, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                              unk_token=None, extra_special_tokens=["<img>", "</img>"])
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    _set_generation(model, tok, cfg.bos_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model


def _build_music_vision(out: Path):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    # 64 px, patch 8: 8x8 = 64 patch tokens, one per layout cell
    cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             image_size=64, patch_size=8)
    model = SiglipVisionModel(cfg).eval()
    processor = SiglipImageProcessor(size={"height": 64, "width": 64})
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model


def _build_music_unet(out: Path):
    from diffusers import UNet2DConditionModel

    # the de-tokenizer: 32 px pixel-space UNet cross-attending to 64-dim visual tokens
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    unet.save_pretrained(out)
    return unet


BUILDERS = {
    "llm": _build_llm, "vlm": _build_vlm, "t2i": _build_t2i, "i2i": _build_i2i, "detector": _build_detector,
    "segmenter": _build_segmenter, "clip": _build_clip, "dino": _build_dino, "eval_clip": _build_clip,
    "music_llm": _build_music_llm, "music_vision": _build_music_vision, "music_unet": _build_music_unet,
    "select_clip": _build_clip,
}
assert tuple(BUILDERS) == ROLES


# ---------------------------------------------------------------------------------------------------------------
def root_of(config) -> Path:
    """Where a config's tiny zoo lives: `<paths.models>/tiny`."""
    return config.paths.resolve("models") / "tiny"


def default_root() -> Path:
    from music_dagster.config import default_config

    return root_of(default_config())


def role_seed(seed: int, role: str) -> int:
    """Each role's own seed, so a role's bytes do not depend on which other roles are built."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{role}".encode()).digest()[:4], "big")


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its relative POSIX path, sorted."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def files_digest(hashes: dict[str, str]) -> str:
    """One hash for a whole folder (what asset metadata shows)."""
    return hashlib.sha256("".join(f"{k}\t{v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()


def _write_json(path: Path, obj) -> None:
    """Atomic, deterministic JSON (sorted keys, trailing newline)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _count_parameters(obj) -> int:
    """Parameters of a model, or of all of a pipeline's models."""
    import torch

    modules = [m for m in obj.components.values() if isinstance(m, torch.nn.Module)] if hasattr(obj, "components") \
        else [obj]
    return sum(p.numel() for m in modules for p in m.parameters())


@contextlib.contextmanager
def _locked(root: Path):
    """One zoo builder at a time per root (parallel test sessions share `models/tiny/`)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_role(role: str, seed: int, root: Path) -> dict:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix=f".{role}.", dir=root))
    try:
        torch.manual_seed(role_seed(seed, role))
        saved = BUILDERS[role](tmp)
        hashes = file_hashes(tmp)
        entry = {"class": type(saved).__name__, "parameters": _count_parameters(saved), "seed": seed,
                 "builder": BUILDER_FINGERPRINT, "files": hashes, "hash": files_digest(hashes)}
        target = root / role
        if target.is_dir() and file_hashes(target) == hashes:
            return entry  # same bytes already in place: leave them untouched for concurrent readers
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{role}.old.", dir=root))
            os.replace(target, old / role)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        return entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"roles": {}}


def build_zoo(seed: int = 0, roles=None, root: str | os.PathLike | None = None, missing_only: bool = False,
              progress=None) -> dict[str, Path]:
    """Build `root/<role>/` (default `models/tiny/`) for `roles` (default: all) and update `root/zoo.json`.

    `missing_only` skips roles already built with this seed by this builder. `progress(role, entry)` is called
    after each role. Returns role -> folder.
    """
    roles = list(ROLES if roles is None else roles)
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ZooError(f"unknown role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    root = Path(root) if root is not None else default_root()
    with _locked(root):
        manifest = _read_manifest(root)
        for role in roles:
            old = manifest["roles"].get(role)
            if missing_only and (root / role).is_dir() and old and old.get("seed") == seed \
                    and old.get("builder") == BUILDER_FINGERPRINT:
                continue
            manifest["roles"][role] = _build_role(role, seed, root)
            _write_json(root / MANIFEST, manifest)
            if progress is not None:
                progress(role, manifest["roles"][role])
    return {role: root / role for role in roles}


def ensure_zoo(seed: int = 0, roles=None, root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Build only the roles that are missing or were built by other code or seed."""
    return build_zoo(seed=seed, roles=roles, root=root, missing_only=True)


def read_manifest(root: str | os.PathLike | None = None) -> dict:
    """`zoo.json` of `root` (role -> class, parameters, seed, files, hash)."""
    return _read_manifest(Path(root) if root is not None else default_root())
