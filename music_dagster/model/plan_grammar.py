"""The plan's grammar: MUSIC's own plan decoded under constraint, so a written layout always parses (issue #13).

The grammar admits exactly the text form the model is trained on (`music.plan_text`), for N subjects:

    " " CoT " layout: " grid rows of grid cells, separated by spaces

- the CoT is N sentences, each opening with a subject tag `[i]` (i in 1..N) and ending with `.`, made of words of
  the data stages' CoT alphabet (letters, digits, `,'-`, at most 12 characters) or subject tags: what the
  data stages' VLM writes (`synthesis.schemas.cot_pattern`: one sentence per subject, in tag order) and what the
  procedural world writes (one sentence per subject, in reading order); no control character, no `:` (so the only
  `layout:` is the layout's);
- the layout is `layout.layout_to_text`'s form: one hex digit per cell, ids 0..N.

A model trained with a `train.ablation` that leaves a part out (`MusicSettings.ablation`, recorded in its
checkpoint) is decoded under the grammar of what it learned: " " CoT (`no_layout`) or " " layout (`no_cot`);
`neither`'s plan is empty and is not decoded at all (`MusicModel.plan`).

It is decoded with the data stages' machinery (`synthesis.structured`): `regex_index` compiles the pattern against
the tokenizer's vocabulary (cached per tokenizer and pattern, i.e. per subject count and grid) and
`GuidedLogitsProcessor` masks each row's logits to the tokens its guide accepts. One thing is added: a *token
budget*. The CoT has no fixed word count (the profiles differ: `data.cot_words_per_subject`), so the decode's own
limit (`max_new_tokens`) bounds it: from each state of the index the fewest tokens that still reach the end of a
plan are known (a breadth-first search over the index's transitions, cached beside the index), and a token is
allowed only if the plan can still be finished within the tokens left. Hence a plan always ends, layout included,
within the limit. A limit below the shortest plan for N subjects cannot hold a layout: the decode then follows the
shortest plan as far as the limit goes and its layout is `None`, as an unconstrained one would be.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict, deque
from typing import Sequence

from music_dagster.config import plan_parts
from music_dagster.model.layout import MAX_TEXT_ID, TEXT_PREFIX
from music_dagster.synthesis.structured import GuidedLogitsProcessor, regex_index

# The words of a CoT sentence: the data stages' CoT alphabet (`synthesis.schemas`' words, at most 12 characters).
COT_WORD = r"[A-Za-z0-9,'-]{1,12}"
_HEX = "0123456789abcdef"
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TABLE_CACHE_SIZE = 64


def layout_pattern(subjects: int, grid: int) -> str:
    """The regex of `layout_to_text`'s form for a `grid x grid` layout of ids 0..`subjects`."""
    if not 1 <= subjects <= MAX_TEXT_ID:
        raise ValueError(f"a text layout holds 1..{MAX_TEXT_ID} subjects, got {subjects}")
    top = _HEX[subjects]
    cell = f"[0-{top}]" if subjects < 10 else f"[0-9a-{top}]"
    row = f"{cell}{{{grid}}}"
    return f"{TEXT_PREFIX} {row}( {row}){{{grid - 1}}}" if grid > 1 else f"{TEXT_PREFIX} {row}"


def plan_pattern(subjects: int, grid: int, ablation: str = "none") -> str:
    """The regex of a whole plan (`music.plan_text`'s form) for `subjects` subjects on a `grid x grid` layout, as
    a model trained with `train.ablation` = `ablation` writes it (the CoT, the layout or both)."""
    from music_dagster.synthesis.decimation import tag
    from music_dagster.synthesis.schemas import regex_literal

    writes_cot, writes_layout = plan_parts(ablation)
    if not (writes_cot or writes_layout):
        raise ValueError(f"a model trained with train.ablation {ablation} writes an empty plan: nothing to decode")
    tags = "(" + "|".join(regex_literal(tag(i)) for i in range(1, subjects + 1)) + ")"
    sentence = f"{tags}( ({COT_WORD}|{tags}))+\\."
    cot = sentence + (f"( {sentence}){{{subjects - 1}}}" if subjects > 1 else "")
    parts = ([cot] if writes_cot else []) + ([layout_pattern(subjects, grid)] if writes_layout else [])
    return "".join(f" {part}" for part in parts)


class _BudgetTable:
    """For each state of an index: the tokens it may take, and the fewest tokens from where each leads to a final
    state (`rows[state]`: two tensors, so a step masks a row in one operation; `shortest`: from the start).

    Built once per (tokenizer, pattern) with numpy: at a 150k-token vocabulary and 12 subjects the index has ~17M
    transitions (~3 s and ~130 MiB here; Python loops over them took a minute)."""

    def __init__(self, index):
        import numpy as np
        import torch

        transitions = index.get_transitions()
        moves = {state: (np.fromiter(m.keys(), np.int64, len(m)), np.fromiter(m.values(), np.int64, len(m)))
                 for state, m in transitions.items()}
        reverse: dict[int, list[int]] = {}
        for state, (_, nexts) in moves.items():
            for nxt in np.unique(nexts).tolist():
                reverse.setdefault(nxt, []).append(state)
        distance = {state: 0 for state in index.get_final_states()}
        queue = deque(distance)
        while queue:
            state = queue.popleft()
            for before in reverse.get(state, ()):
                if before not in distance:
                    distance[before] = distance[state] + 1
                    queue.append(before)
        self.shortest = distance.get(index.get_initial_state())
        top = max([*distance, *moves, *(int(n.max()) for _, n in moves.values() if len(n))], default=0)
        far = np.iinfo(np.int32).max  # a state from which no final state can be reached
        lookup = np.full(top + 1, far, np.int64)
        lookup[list(distance)] = list(distance.values())
        self.rows = {}
        for state, (tokens, nexts) in moves.items():
            steps = lookup[nexts]
            keep = steps < far
            if keep.any():
                self.rows[state] = (torch.from_numpy(tokens[keep].astype(np.int32)),
                                    torch.from_numpy(steps[keep].astype(np.int32)))


def _budget_table(tokenizer, regex: str, index) -> _BudgetTable:
    tables = _TABLES.setdefault(tokenizer, OrderedDict())
    if regex in tables:
        tables.move_to_end(regex)
        return tables[regex]
    table = tables[regex] = _BudgetTable(index)
    if len(tables) > _TABLE_CACHE_SIZE:
        tables.popitem(last=False)
    return table


def plan_processor(tokenizer, subjects: Sequence[int], grid: int, limit: int,
                   ablation: str = "none") -> "BudgetedPlanProcessor":
    """A logits processor for one plan decode: row i follows the plan grammar for `subjects[i]` subjects (and the
    parts `ablation` writes) and ends within `limit` new tokens (see the module doc). Stateful: one per decode."""
    patterns = {n: plan_pattern(n, grid, ablation) for n in sorted(set(subjects))}
    indexes = {n: regex_index(tokenizer, p) for n, p in patterns.items()}
    tables = {n: _budget_table(tokenizer, patterns[n], indexes[n]) for n in patterns}
    return BudgetedPlanProcessor([indexes[n] for n in subjects], [tables[n] for n in subjects], limit)


def shortest_plan(tokenizer, subjects: int, grid: int, ablation: str = "none") -> int:
    """The fewest tokens a plan for `subjects` subjects (of the parts `ablation` writes) takes with this tokenizer
    (eos not counted)."""
    pattern = plan_pattern(subjects, grid, ablation)
    return _budget_table(tokenizer, pattern, regex_index(tokenizer, pattern)).shortest


class BudgetedPlanProcessor(GuidedLogitsProcessor):
    """`structured.GuidedLogitsProcessor` (each row inside its grammar) plus the token budget: called with the
    tokens generated so far ([B, k]) and the next token's logits ([B, V]), it also masks every token after which
    the row's plan could no longer end within `limit` tokens (when no token can, the nearest-to-the-end ones stay,
    so the decode never has nothing to pick)."""

    def __init__(self, indexes: Sequence, tables: Sequence[_BudgetTable], limit: int):
        super().__init__(indexes)
        self.tables = list(tables)
        self.limit = limit

    def __call__(self, input_ids, scores):
        scores = super().__call__(input_ids, scores)
        left = self.limit - input_ids.shape[1] - 1  # tokens that may follow this one
        for row, (guide, table) in enumerate(zip(self.guides, self.tables)):
            if guide.is_finished():
                continue
            entry = table.rows.get(guide.get_state())
            if entry is None:
                continue
            tokens, steps = entry
            over = steps > max(left, int(steps.min()))
            if bool(over.any()):
                scores[row, tokens[over].long().to(scores.device)] = float("-inf")
        return scores
