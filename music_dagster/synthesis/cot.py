"""Stage 9, `cot_annotations`: the VLM sees the target image with its numbered boxes and writes the simulated user
instruction (every subject by its tag `[i]`) and the visual CoT (one sentence per subject of at most
`data.cot_words_per_subject` words: role, relations, placement; in detail also appearance and pose), as JSON
validated against the schema; retried, else dropped."""
from __future__ import annotations

from music_dagster.synthesis import prompts, schemas
from music_dagster.synthesis.common import OpenImage, ShardContext, StageResult, child, draw_numbered_boxes
from music_dagster.synthesis.decimation import tags_in
from music_dagster.synthesis.structured import AnswerError, ask_vlm

STAGE = "cot_annotations"


def check_tags(value: dict, n: int) -> None:
    """Every tag in the answer names one of the n subjects, and the instruction names each of them."""
    for key in ("instruction", "cot"):
        bad = sorted({i for i in tags_in(value[key]) if not 1 <= i <= n})
        if bad:
            raise AnswerError(f"{key} tags unknown subject [{bad[0]}] (subjects 1..{n})")
    missing = sorted(set(range(1, n + 1)) - set(tags_in(value["instruction"])))
    if missing:
        raise AnswerError(f"instruction does not refer to [{missing[0]}]")


def cot_annotations(vlm, ctx: ShardContext, data, records: list[dict], open_image: OpenImage) -> StageResult:
    annotated = [draw_numbered_boxes(open_image(r["image"]), [s["box"] for s in r["subjects"]],
                                     [schemas.phrase(s["category"]) for s in r["subjects"]]) for r in records]
    counts, words = [len(r["subjects"]) for r in records], data.cot_words_per_subject
    answers = ask_vlm(
        vlm, [prompts.annotation([schemas.phrase(s["category"]) for s in r["subjects"]], words) for r in records],
        annotated, [schemas.annotation(n, words) for n in counts], batch_size=data.batch_size,
        max_retries=data.max_retries, max_new_tokens=data.max_new_tokens, temperature=data.temperature,
        seed=ctx.seed_for("vlm"), check=lambda item, value: check_tags(value, counts[item]))
    result = StageResult()
    for record, image, answer in zip(records, annotated, answers):
        if not answer.ok:
            result.drop(record, STAGE, "vlm_answer", answer.error)
            continue
        name = f"{record['sample_id']}_boxes.png"
        result.images[name] = image
        result.records.append(child(record, instruction=answer.value["instruction"], cot=answer.value["cot"],
                                    annotated=ctx.ref(name), annotation_attempts=answer.attempts))
    return result
