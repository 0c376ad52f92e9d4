"""Stage 1, `category_combos`: sample 2..12 Objects365 categories per sample; the LLM keeps a semantically
compatible subset (at least the minimum) and names the scene. Candidates are drawn from the file's names and
written as their display names (`category_names`): what every later prompt and query reads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from music_dagster.synthesis import SynthesisError, prompts, schemas
from music_dagster.synthesis.category_names import display_name
from music_dagster.synthesis.common import ShardContext, StageResult, check_subject_range
from music_dagster.synthesis.structured import AnswerError, ask_llm

STAGE = "category_combos"


def load_categories(path: str | Path, subset: Sequence[str] | None = None) -> list[str]:
    """The Objects365 category names in file order, stripped; `subset` restricts them (each must be a name).

    The file is a JSON list of `{"id": int, "name": str}` (or of plain names). Raises `SynthesisError` (one line)
    when it is missing, unreadable, empty, has an entry without a usable name or a repeated name, or when `subset`
    is empty or names an unknown category.
    """
    path = Path(path)
    if not path.is_file():
        raise SynthesisError(f"Objects365 category file {path} does not exist")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SynthesisError(f"Objects365 category file {path} is not readable JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise SynthesisError(f"Objects365 category file {path} holds no categories (expected a non-empty list)")
    names: list[str] = []
    for number, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not name.strip():
            raise SynthesisError(f"Objects365 category file {path}: entry {number} has no category name: {entry!r}")
        name = " ".join(name.split())
        if name in names:
            raise SynthesisError(f"Objects365 category file {path}: category {name!r} appears twice")
        names.append(name)
    if subset is None:
        return names
    subset = [" ".join(str(s).split()) for s in subset]
    if not subset:
        raise SynthesisError("data.categories is empty: name at least one Objects365 category, or leave it unset")
    unknown = [s for s in subset if s not in names]
    if unknown:
        raise SynthesisError(f"data.categories: unknown Objects365 category {unknown[0]!r}")
    return [n for n in names if n in set(subset)]


def sample_candidates(rng, names: Sequence[str], lo: int, hi: int) -> list[str]:
    """lo..hi distinct categories (uniform count, then uniform without replacement), in the drawn order."""
    check_subject_range(lo, hi)
    if len(names) < lo:
        raise SynthesisError(f"{len(names)} categories cannot give the {lo} a sample needs")
    count = int(rng.integers(lo, min(hi, len(names)) + 1))
    return [names[i] for i in rng.choice(len(names), size=count, replace=False)]


def category_combos(llm, ctx: ShardContext, data, names: Sequence[str]) -> StageResult:
    """`data.shard_size` samples of this shard: candidates drawn from `names` (the file's) with the shard's seed,
    shown to the LLM by their display names, filtered by the LLM."""
    import numpy as np

    check_subject_range(data.min_categories, data.max_subjects)
    rng = np.random.default_rng(ctx.seed_for("candidates"))
    ids = [f"{ctx.key}-{i:05d}" for i in range(data.shard_size)]
    candidates = [[display_name(c) for c in sample_candidates(rng, names, data.min_categories, data.max_subjects)]
                  for _ in ids]
    answer_schemas = [schemas.category_filter(c, data.min_categories) for c in candidates]

    def check(item: int, value: dict) -> None:
        kept = list(dict.fromkeys(value["keep"]))
        if len(kept) < data.min_categories:
            raise AnswerError(f"kept {len(kept)} distinct categories, fewer than {data.min_categories}")

    answers = ask_llm(
        llm, [prompts.category_filter(c, data.min_categories) for c in candidates], answer_schemas,
        batch_size=data.batch_size, max_retries=data.max_retries, max_new_tokens=data.max_new_tokens,
        temperature=data.temperature, seed=ctx.seed_for("llm"), check=check)
    result = StageResult()
    for sample_id, cands, answer in zip(ids, candidates, answers):
        record = {"sample_id": sample_id, "parent_ids": [], "shard": ctx.key, "candidates": cands}
        if not answer.ok:
            result.drop(record, STAGE, "llm_answer", answer.error)
            continue
        kept = list(dict.fromkeys(answer.value["keep"]))  # distinct, in the LLM's order
        result.records.append({**record, "categories": kept, "scene": answer.value["scene"].strip(),
                               "combo_attempts": answer.attempts})
    return result
