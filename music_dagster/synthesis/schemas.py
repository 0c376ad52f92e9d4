"""JSON schemas: (1) what the LLM and the VLM may answer (compiled into constrained decoding, then re-validated),
(2) what each data asset's manifest records hold (validated by the shard writer).

Answer schemas bound every string and array, so a generation always terminates inside its schema: a random model
would otherwise write forever. Free text is a bounded number of bounded words; words the answer must contain
(categories in a caption, subject tags `[i]` in an instruction) are literal parts of the pattern.
"""
from __future__ import annotations

from music_dagster.config import MAX_SUBJECTS
from music_dagster.storage import record_schema
from music_dagster.synthesis.decimation import tag

# Free-text pieces. Gaps between required words are at most a few words, each at most 12 characters.
_LOWER_WORD = r"[a-z,'-]{1,12}"
_WORD = r"[A-Za-z0-9,'-]{1,12}"
_OPENER = r"[A-Z][a-z]{0,11}"
_SCENE = r"^[a-z][a-z ,'-]{2,40}$"

YES, NO = "yes", "no"


def regex_literal(text: str) -> str:
    """`text` as a regex matching itself (letters, digits and spaces stay; anything else is escaped)."""
    return "".join(c if c.isalnum() or c == " " else "\\" + c for c in text)


def phrase(category: str) -> str:
    """How a category is written in text (captions, detector queries, CLIP prompts): lower case, stripped."""
    return " ".join(category.lower().split())


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def category_filter(candidates: list[str], min_keep: int) -> dict:
    """The LLM keeps a compatible subset of `candidates` (at least `min_keep`) and names the scene. Repeats are
    not excluded here (the decoder cannot enforce `uniqueItems`); the stage de-duplicates, then checks the count."""
    return _object({
        "keep": {"type": "array", "items": {"enum": list(candidates)}, "minItems": min(min_keep, len(candidates)),
                 "maxItems": len(candidates)},
        "scene": {"type": "string", "pattern": _SCENE},
    })


def caption_pattern(phrases: list[str]) -> str:
    """A one-sentence caption holding every phrase, in order, with at most four words between them."""
    gap = f"( {_LOWER_WORD}){{0,4}}"
    return "^" + _OPENER + gap + "".join(" " + regex_literal(p) + gap for p in phrases) + r"\.$"


def caption(phrases: list[str]) -> dict:
    return _object({"caption": {"type": "string", "pattern": caption_pattern(phrases)}})


VERIFY = _object({"answer": {"enum": [YES, NO]}})


def _tag_alternatives(n: int) -> str:
    return "(" + "|".join(regex_literal(tag(i)) for i in range(1, n + 1)) + ")"


def instruction_pattern(n: int) -> str:
    """The simulated user instruction: tags [1]..[n] each once, in order, a few words around them."""
    gap = f"( {_WORD}){{0,4}}"
    return "^" + _OPENER + "".join(gap + " " + regex_literal(tag(i)) for i in range(1, n + 1)) + gap + r"\.$"


def cot_pattern(n: int, words: int) -> str:
    """The visual CoT: one sentence per subject, opening with its tag and holding 1..`words` words
    (`data.cot_words_per_subject`: its role, relations and placement; in detail, also its appearance and pose),
    which may refer to other subjects by tag."""
    if words < 1:
        raise ValueError(f"a CoT sentence needs at least one word, got words={words}")
    word = f"({_WORD}|{_tag_alternatives(n)})"
    sentence = lambda i: regex_literal(tag(i)) + f"( {word}){{1,{words}}}" + r"\."  # noqa: E731
    return "^" + " ".join(sentence(i) for i in range(1, n + 1)) + "$"


def annotation(n: int, words: int) -> dict:
    """The VLM's instruction and CoT for n subjects, at most `words` words per subject's CoT sentence."""
    return _object({
        "instruction": {"type": "string", "pattern": instruction_pattern(n)},
        "cot": {"type": "string", "pattern": cot_pattern(n, words)},
    })


# ---------------------------------------------------------------------------------------------------------------
# Manifest records. Each stage's record is its parent's plus its own fields, so the schemas accumulate.
_STR = {"type": "string", "minLength": 1}
_INT = {"type": "integer", "minimum": 0}
_PROB = {"type": "number", "minimum": 0, "maximum": 1}
_BOX = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 4, "maxItems": 4}
_NAMES = {"type": "array", "items": _STR, "minItems": 1, "maxItems": 12}


def _subjects(properties: dict) -> dict:
    return {"type": "array", "minItems": 1, "maxItems": 12, "items": _object(properties)}


_S_DETECTED = {"category": _STR, "box": _BOX, "score": _PROB}
_S_VERIFIED = {**_S_DETECTED, "p_yes": _PROB, "answer": {"enum": [YES, NO]}}
_S_REFERENCE = {**_S_VERIFIED, "crop": _STR, "reference": _STR, "reference_prompt": _STR}
_S_MASKED = {**_S_REFERENCE, "mask": _STR, "sim_mask": {"type": "number"}, "sim_unmask": {"type": "number"},
             "region": {"enum": ["mask", "box"]}}
_MISSING = {"type": "array", "items": _object({"category": _STR, "reason": _STR})}

_COMBO = {"shard": _STR, "candidates": _NAMES, "categories": _NAMES, "scene": _STR, "combo_attempts": _INT}
_CAPTION = {**_COMBO, "caption": _STR, "caption_attempts": _INT}
_TARGET = {**_CAPTION, "image": _STR, "width": _INT, "height": _INT}
_DETECTED = {**_TARGET, "subjects": _subjects(_S_DETECTED), "missing": _MISSING}
_VERIFIED = {**_DETECTED, "subjects": _subjects(_S_VERIFIED),
             "rejected": {"type": "array", "items": _object({**_S_VERIFIED})}}
_REFERENCED = {**_VERIFIED, "subjects": _subjects(_S_REFERENCE)}
_MASKED = {**_REFERENCED, "subjects": _subjects(_S_MASKED)}
_CELL = {"type": "integer", "minimum": 0, "maximum": MAX_SUBJECTS}  # 0: background, else a subject id
_GRID = {"type": "array", "items": {"type": "array", "items": _CELL}}
_LAYOUT = {**_MASKED, "layout": _GRID, "layout_text": _STR, "overlay": _STR,
           "tau": {"type": "array", "items": {"type": "number"}}}
_ANNOTATED = {**_LAYOUT, "instruction": _STR, "cot": _STR, "annotated": _STR, "annotation_attempts": _INT}

_S_SAMPLE = {"id": {"type": "integer", "minimum": 1, "maximum": MAX_SUBJECTS}, "category": _STR, "box": _BOX,
             "reference": _STR, "region": {"enum": ["mask", "box"]}, "mask": _STR}
_SAMPLE = {
    "shard": _STR, "split": {"enum": ["train", "msic"]}, "num_subjects": {"type": "integer", "minimum": 1,
                                                                          "maximum": MAX_SUBJECTS},
    "source_subjects": {"type": "integer", "minimum": 1, "maximum": MAX_SUBJECTS}, "image": _STR, "caption": _STR,
    "scene": _STR, "instruction": _STR, "cot": _STR, "layout": _GRID, "layout_text": _STR,
    "subjects": _subjects(_S_SAMPLE),
}

RECORDS = {
    "category_combos": record_schema(_COMBO, required=list(_COMBO)),
    "scene_captions": record_schema(_CAPTION, required=list(_CAPTION)),
    "target_images": record_schema(_TARGET, required=list(_TARGET)),
    "detected_boxes": record_schema(_DETECTED, required=list(_DETECTED)),
    "verified_boxes": record_schema(_VERIFIED, required=list(_VERIFIED)),
    "reference_subjects": record_schema(_REFERENCED, required=list(_REFERENCED)),
    "subject_masks": record_schema(_MASKED, required=list(_MASKED)),
    "grid_layouts": record_schema(_LAYOUT, required=list(_LAYOUT)),
    "cot_annotations": record_schema(_ANNOTATED, required=list(_ANNOTATED)),
    "training_samples": record_schema(_SAMPLE, required=list(_SAMPLE)),
}
