"""Stage 2, `scene_captions`: the LLM writes one caption containing every kept category; checked, retried, else
dropped."""
from __future__ import annotations

import re

from music_dagster.synthesis import prompts, schemas
from music_dagster.synthesis.common import ShardContext, StageResult, child
from music_dagster.synthesis.structured import AnswerError, ask_llm

STAGE = "scene_captions"


def missing_phrases(caption: str, phrases: list[str]) -> list[str]:
    """The phrases that do not occur in `caption` as whole words (case-insensitive)."""
    text = caption.lower()
    return [p for p in phrases if not re.search(r"(?<![a-z0-9])" + re.escape(p) + r"(?![a-z0-9])", text)]


def scene_captions(llm, ctx: ShardContext, data, records: list[dict]) -> StageResult:
    phrase_lists = [[schemas.phrase(c) for c in r["categories"]] for r in records]
    answer_schemas = [schemas.caption(p) for p in phrase_lists]

    def check(item: int, value: dict) -> None:
        missing = missing_phrases(value["caption"], phrase_lists[item])
        if missing:
            raise AnswerError(f"caption lacks {missing[0]!r}")

    answers = ask_llm(
        llm, [prompts.caption(p, r["scene"]) for p, r in zip(phrase_lists, records)], answer_schemas,
        batch_size=data.batch_size, max_retries=data.max_retries, max_new_tokens=data.max_new_tokens,
        temperature=data.temperature, seed=ctx.seed_for("llm"), check=check)
    result = StageResult()
    for record, answer in zip(records, answers):
        if answer.ok:
            result.records.append(child(record, caption=answer.value["caption"], caption_attempts=answer.attempts))
        else:
            result.drop(record, STAGE, "llm_answer", answer.error)
    return result
