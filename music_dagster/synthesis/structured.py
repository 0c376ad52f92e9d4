"""Schema-constrained answers from the LLM and the VLM: outlines' engine inside transformers' `generate`.

Why outlines: transformers 5 has no grammar decoding of its own, and of the libraries that hook into it, outlines
(outlines_core's regex index) was the only one whose JSON was valid in every run (shared/notes/feasibility.md).
We use its engine directly: `outlines_core.json_schema.build_regex_from_schema` turns a JSON schema into a regex,
`Index` compiles it against the tokenizer's vocabulary (built by outlines' own backend helper) and one `Guide` per
row walks it. The mask is applied with plain tensor ops in `GuidedLogitsProcessor`, not with outlines_core's
`torch.compile` kernel: that kernel needs a C compiler and ~14 s to compile on a CPU, for an operation that takes
microseconds uncompiled. Owning the processor also lets every row of a batch follow its own schema (each sample's
category enum and caption words differ), which outlines' processor (one index per batch) cannot.

Model output is never trusted: `parse_answer` re-validates the text against the schema (jsonschema), `ask` retries
the failures a bounded number of times with fresh sampling seeds, and what still fails comes back with its reason.
"""
from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

_VOCABULARIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_INDEX_CACHE_SIZE = 256


class AnswerError(ValueError):
    """A model answer that is not valid JSON for its schema, or fails a semantic check (the sample is retried)."""


def schema_regex(schema: dict) -> str:
    """The regex outlines_core derives from `schema` (property order is the order of the dict)."""
    from outlines_core.json_schema import build_regex_from_schema

    return build_regex_from_schema(json.dumps(schema))


def _token_to_string(tokenizer, token: str) -> str:
    # As outlines' TransformerTokenizer does (sentencepiece word starts carry their space), without its side effect
    # of setting the tokenizer's pad token.
    text = tokenizer.convert_tokens_to_string([token])
    return " " + text if token.startswith("\u2581") or token == "<0x20>" else text


def _vocab_entry(tokenizer) -> dict:
    entry = _VOCABULARIES.get(tokenizer)
    if entry is None:
        from outlines.backends.outlines_core import OutlinesCoreBackend

        vocabulary = OutlinesCoreBackend.create_outlines_core_vocabulary(
            tokenizer.get_vocab(), tokenizer.eos_token_id, tokenizer.eos_token,
            lambda token: _token_to_string(tokenizer, token),
        )
        entry = {"vocabulary": vocabulary, "indexes": OrderedDict()}
        _VOCABULARIES[tokenizer] = entry
    return entry


def regex_index(tokenizer, regex: str):
    """The outlines_core `Index` of `regex` over `tokenizer`'s vocabulary (cached per tokenizer, LRU)."""
    from outlines_core import Index

    entry = _vocab_entry(tokenizer)
    indexes = entry["indexes"]
    if regex in indexes:
        indexes.move_to_end(regex)
        return indexes[regex]
    index = Index(regex, entry["vocabulary"])
    indexes[regex] = index
    if len(indexes) > _INDEX_CACHE_SIZE:
        indexes.popitem(last=False)
    return index


class GuidedLogitsProcessor:
    """A transformers logits processor: row i may only emit tokens that keep its text inside regex index i.

    Stateful: make a new one for every `generate` call.
    """

    def __init__(self, indexes: Sequence):
        from outlines_core import Guide

        self.guides = [Guide(index) for index in indexes]
        self._started = False

    def __call__(self, input_ids, scores):
        import torch

        if input_ids.shape[0] != len(self.guides):
            raise ValueError(f"batch of {input_ids.shape[0]} rows for {len(self.guides)} guides")
        if self._started:
            last = input_ids[:, -1].tolist()
            for guide, token in zip(self.guides, last):
                # A finished row is fed padding: advance only while the guide can take the token (as outlines does).
                if not guide.is_finished() or guide.accepts_tokens([token]):
                    guide.advance(token_id=token, return_tokens=False)
        self._started = True
        vocab = scores.shape[-1]
        words = (vocab + 31) // 32
        bits = torch.arange(32, dtype=torch.int32)
        allowed = torch.empty((len(self.guides), words * 32), dtype=torch.bool)
        for row, guide in enumerate(self.guides):
            mask = torch.zeros((1, words), dtype=torch.int32)
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            allowed[row] = ((mask.unsqueeze(-1) >> bits) & 1).bool().view(-1)
        allowed = allowed[:, :vocab].to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))


@dataclass(frozen=True)
class Generation:
    """One constrained `generate` call: the decoded texts, and (when asked) the generated ids and step scores."""

    texts: list[str]
    tokens: list[list[int]] | None = None
    scores: list | None = None  # per step, a [batch, vocab] tensor of processed scores (disallowed = -inf)


def generate_constrained(model, tokenizer, inputs: dict, schemas: Sequence[dict], *, max_new_tokens: int,
                         seed: int, temperature: float, keep_scores: bool = False) -> Generation:
    """Run `model.generate(**inputs)` with row i constrained to `schemas[i]`.

    `inputs` are the tokenizer's or the VLM processor's tensors (left-padded batch). Sampling (temperature > 0) uses
    `seed` inside a forked RNG, so the caller's random state is untouched and the same call gives the same text.
    """
    import torch
    from transformers import LogitsProcessorList

    processor = GuidedLogitsProcessor([regex_index(tokenizer, schema_regex(s)) for s in schemas])
    sampling = temperature > 0
    options = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sampling else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    device = model.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(
            **inputs, logits_processor=LogitsProcessorList([processor]), max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True, output_scores=keep_scores, **options,
        )
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    if not keep_scores:
        return Generation(texts)
    return Generation(texts, generated.tolist(), [s.float().cpu() for s in out.scores])


def parse_answer(text: str, schema: dict) -> dict:
    """The JSON object in `text`, validated against `schema`; `AnswerError` (one line) otherwise."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnswerError(f"not JSON ({e.msg} at char {e.pos}): {text[:60]!r}") from None
    error = best_match(Draft202012Validator(schema).iter_errors(value))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "answer"
        raise AnswerError(f"{where}: {error.message.splitlines()[0][:120]}")
    return value


@dataclass(frozen=True)
class Answer:
    """The outcome of asking one sample: its parsed (and checked) value, or the last error."""

    value: dict | None
    text: str
    attempts: int
    error: str | None = None
    extra: dict | None = None  # what `run` reported beside the text (e.g. a yes-probability)

    @property
    def ok(self) -> bool:
        return self.value is not None


def ask(run: Callable[[list[int], int], list], schemas: Sequence[dict], max_retries: int,
        check: Callable[[int, dict], None] | None = None) -> list[Answer]:
    """Ask every item, retrying the failed ones up to `max_retries` times.

    `run(items, attempt)` answers the item indexes `items` (it batches them itself) and returns one text, or one
    `(text, extra)` pair, per item. `check(item, value)` raises `AnswerError` for a valid-JSON answer that is still
    unusable (a caption missing a category, too few distinct categories, ...).
    """
    answers: list[Answer | None] = [None] * len(schemas)
    pending = list(range(len(schemas)))
    for attempt in range(max_retries + 1):
        if not pending:
            break
        failed = []
        for item, got in zip(pending, run(pending, attempt)):
            text, extra = got if isinstance(got, tuple) else (got, None)
            try:
                value = parse_answer(text, schemas[item])
                if check is not None:
                    check(item, value)
            except AnswerError as e:
                answers[item] = Answer(None, text, attempt + 1, str(e), extra)
                failed.append(item)
            else:
                answers[item] = Answer(value, text, attempt + 1, None, extra)
        pending = failed
    return answers


def ask_llm(llm, prompts: Sequence[str], schemas: Sequence[dict], *, batch_size: int, max_retries: int,
            max_new_tokens: int, temperature: float, seed: int,
            check: Callable[[int, dict], None] | None = None) -> list[Answer]:
    """Ask the LLM handle (`.model`, `.tokenizer`, `.device`) one chat prompt per item, `batch_size` rows per
    `generate`, each row constrained to its schema; see `ask` for retries and checks."""
    from music_dagster.synthesis.common import batches, derive_seed
    from music_dagster.synthesis.prompts import chat_text

    tokenizer = llm.tokenizer
    texts = [chat_text(tokenizer, p) for p in prompts]

    def run(items: list[int], attempt: int) -> list[str]:
        out = []
        for number, chunk in enumerate(batches(items, batch_size)):
            enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, padding_side="left")
            gen = generate_constrained(
                llm.model, tokenizer, enc.to(llm.device), [schemas[i] for i in chunk], max_new_tokens=max_new_tokens,
                seed=derive_seed(seed, attempt, number), temperature=temperature)
            out += gen.texts
        return out

    return ask(run, schemas, max_retries, check)


def ask_vlm(vlm, prompts: Sequence[str], images: Sequence, schemas: Sequence[dict], *, batch_size: int,
            max_retries: int, max_new_tokens: int, temperature: float, seed: int,
            check: Callable[[int, dict], None] | None = None,
            score: Callable[[list[int], list], dict] | None = None) -> list[Answer]:
    """Ask the VLM handle (`.model`, `.processor`, `.device`, `.dtype`) about one image per item. With `score`,
    generation keeps its step scores and `score(tokens, step_scores)` of each row lands in `Answer.extra`."""
    from music_dagster.synthesis.common import batches, derive_seed
    from music_dagster.synthesis.prompts import chat_text

    processor = vlm.processor
    tokenizer = processor.tokenizer
    texts = [chat_text(processor, p, with_image=True) for p in prompts]

    def run(items: list[int], attempt: int) -> list:
        out = []
        for number, chunk in enumerate(batches(items, batch_size)):
            enc = processor(images=[images[i] for i in chunk], text=[texts[i] for i in chunk], return_tensors="pt",
                            padding=True, padding_side="left")
            gen = generate_constrained(
                vlm.model, tokenizer, enc.to(vlm.device, dtype=vlm.dtype), [schemas[i] for i in chunk],
                max_new_tokens=max_new_tokens, seed=derive_seed(seed, attempt, number), temperature=temperature,
                keep_scores=score is not None)
            if score is None:
                out += gen.texts
            else:
                out += [(text, score(gen.tokens[row], [s[row] for s in gen.scores]))
                        for row, text in enumerate(gen.texts)]
        return out

    return ask(run, schemas, max_retries, check)
