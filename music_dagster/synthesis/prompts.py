"""The prompts of the LLM, VLM and I2I stages, and how they become model inputs.

Chat models get their own chat template (Qwen3 with thinking off: the answer is the JSON itself); every prompt
spells out the JSON it expects, since constrained decoding only guarantees the form, not the sense.
"""
from __future__ import annotations

import json

from music_dagster.synthesis import SynthesisError
from music_dagster.synthesis.decimation import tag

# I2I edits that change viewpoint or appearance while keeping identity (the paper's guard against copy-paste).
REFERENCE_EDITS = (
    "Show the {name} from a different viewpoint, alone on a plain white background.",
    "Rotate the {name} to show it from the side, alone on a plain background, same identity.",
    "Show the same {name} from above under soft studio lighting, isolated on a plain background.",
    "Show the {name} from a new angle with different lighting, isolated, keeping its colours and details.",
)
# From this many words per subject (`data.cot_words_per_subject`) the CoT prompt asks for the paper's detailed CoT:
# four things per subject (appearance, pose, position, relations) need about six words each. Below it the prompt is
# the short one (the tiny profile's, unchanged: its shards are pinned).
DETAILED_COT_WORDS = 24


def category_filter(candidates: list[str], min_keep: int) -> str:
    return (
        "You plan photos that contain several objects. Candidate object categories: "
        + ", ".join(json.dumps(c) for c in candidates)
        + f". Keep at least {min_keep} categories that plausibly appear together in one realistic photo, and name "
        'that scene in a few lowercase words. Answer with JSON only: {"keep": [categories], "scene": "..."}.'
    )


def caption(phrases: list[str], scene: str) -> str:
    return (
        f"Write one sentence describing a photo of {scene} that shows: " + ", ".join(phrases)
        + ". Mention every object by exactly these words, in this order, with at most four words between them. "
        'Answer with JSON only: {"caption": "..."}.'
    )


def verify(phrase: str) -> str:
    return (f"Does this image region clearly show a {phrase}? "
            'Answer with JSON only: {"answer": "yes"} or {"answer": "no"}.')


def reference_edit(phrase: str, choice: int) -> str:
    return REFERENCE_EDITS[choice % len(REFERENCE_EDITS)].format(name=phrase)


def annotation(phrases: list[str], words: int) -> str:
    """The instruction + CoT prompt; `words` (`data.cot_words_per_subject`) from DETAILED_COT_WORDS on asks for each
    subject's appearance, pose, position and relations in at most `words` words."""
    listing = "; ".join(f"{tag(i)} {p}" for i, p in enumerate(phrases, start=1))
    if words >= DETAILED_COT_WORDS:
        cot = ("(2) cot: your detailed visual reasoning, one sentence per subject starting with its tag, of at most "
               f"{words} words: its appearance (colour, material, shape), its pose or orientation, where it is "
               "placed in the image, and its relations to the other subjects (by tag). ")
    else:
        cot = ("(2) cot: your visual reasoning, one sentence per subject starting with its tag: its role in the scene, "
               "its relations to the other subjects (by tag) and where it is placed. ")
    return (
        f"The image shows numbered boxes: {listing}. Write two things. (1) instruction: what a user would ask to "
        "get this image from photos of these subjects, referring to each subject by its tag, e.g. [1]. "
        + cot + 'Answer with JSON only: {"instruction": "...", "cot": "..."}.'
    )


def chat_text(tokenizer_or_processor, prompt: str, with_image: bool = False) -> str:
    """The model's chat-formatted text for one user turn (an image placeholder first when `with_image`).
    Text-only turns switch Qwen3's thinking off: the answer must be the JSON itself."""
    if not getattr(tokenizer_or_processor, "chat_template", None):
        raise SynthesisError(f"{type(tokenizer_or_processor).__name__} has no chat template (the llm and vlm roles "
                             "need one)")
    if with_image:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return tokenizer_or_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer_or_processor.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False)
