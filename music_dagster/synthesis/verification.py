"""Stage 5, `verified_boxes`: the VLM is shown each box crop and answers whether it holds the category
(`{"answer": "yes"|"no"}`, constrained); rejected subjects are dropped.

The decision uses the VLM's probability of "yes" at the token where its answer is decided (the mass of the allowed
tokens that start "yes" against those that start "no"): a subject is kept when P(yes) > `data.verify_threshold`.
With 0.5 (the full profile) that is "the VLM says yes"; random tiny weights cannot be trusted to, so the tiny
profile keeps every parsed answer (threshold 0). Both the answer text and P(yes) are recorded.
"""
from __future__ import annotations

import math
import re

from music_dagster.synthesis import prompts, schemas
from music_dagster.synthesis.common import OpenImage, ShardContext, StageResult, child, crop
from music_dagster.synthesis.structured import ask_vlm

STAGE = "verified_boxes"
_DECIDED = re.compile(r'"answer"\s*:\s*"([yn])')


def yes_probability(tokenizer, tokens: list[int], step_scores: list) -> float:
    """P(yes) / (P(yes) + P(no)) at the first step whose token reveals the answer's first letter, from that step's
    processed scores (disallowed tokens are -inf). NaN when the answer never got that far."""
    for step in range(len(tokens)):
        if not _DECIDED.search(tokenizer.decode(tokens[: step + 1])):
            continue
        scores = step_scores[step]
        allowed = scores.isfinite().nonzero().flatten().tolist()
        weights = scores[allowed].softmax(dim=-1).tolist()
        mass = {"y": 0.0, "n": 0.0}
        for token, weight in zip(allowed, weights):
            m = _DECIDED.search(tokenizer.decode(tokens[:step] + [token]))
            if m:
                mass[m.group(1)] += weight
        total = mass["y"] + mass["n"]
        return mass["y"] / total if total > 0 else float("nan")
    return float("nan")


def verified_boxes(vlm, ctx: ShardContext, data, records: list[dict], open_image: OpenImage) -> StageResult:
    items = []  # (record index, subject index)
    crops = []
    for r, record in enumerate(records):
        image = open_image(record["image"])
        for s, subject in enumerate(record["subjects"]):
            items.append((r, s))
            crops.append(crop(image, subject["box"]))
    tokenizer = vlm.processor.tokenizer
    answers = ask_vlm(
        vlm, [prompts.verify(schemas.phrase(records[r]["subjects"][s]["category"])) for r, s in items], crops,
        # Greedy, so a retry would repeat the same answer: none.
        [schemas.VERIFY] * len(items), batch_size=data.batch_size, max_retries=0,
        max_new_tokens=data.max_new_tokens, temperature=0.0, seed=ctx.seed_for("vlm"),
        score=lambda tokens, scores: {"p_yes": yes_probability(tokenizer, tokens, scores)})
    by_record: dict[int, list] = {}
    for (r, s), answer in zip(items, answers):
        by_record.setdefault(r, []).append((s, answer))
    result = StageResult()
    for r, record in enumerate(records):
        kept, rejected, missing = [], [], list(record["missing"])
        for s, answer in by_record.get(r, []):
            subject = record["subjects"][s]
            p_yes = answer.extra["p_yes"] if answer.extra else float("nan")
            if not answer.ok or not math.isfinite(p_yes):
                missing.append({"category": subject["category"], "reason": "unverified"})
                continue
            verdict = dict(subject, p_yes=round(p_yes, 6), answer=answer.value["answer"])
            (kept if p_yes > data.verify_threshold else rejected).append(verdict)
        if len(kept) < data.min_subjects:
            result.drop(record, STAGE, "too_few_verified", f"{len(kept)} of {len(record['subjects'])} boxes verified"
                        f" ({len(rejected)} rejected, {len(missing) - len(record['missing'])} without an answer)")
            continue
        result.records.append(child(record, subjects=kept, rejected=rejected, missing=missing))
    return result
