"""Stage 4, `detected_boxes`: GroundingDINO with the category names as the text query, the best box per category;
boxes under `data.min_box_area` of the image (the paper's 0.01) never count, so a category whose boxes are all
smaller is dropped.

Scores are read per category from the model's token logits (a phrase's score for a query is the mean sigmoid over
the phrase's tokens, as GroundingDINO's token-span grounding does), not from the processor's post-processing, whose
text labels are whatever tokens pass a threshold. Each category takes its best-scoring query; a query serves one
category only (the higher score wins), so two subjects never share a box.
"""
from __future__ import annotations

from music_dagster.synthesis import schemas
from music_dagster.synthesis.common import OpenImage, ShardContext, StageResult, batches, box_area, child

STAGE = "detected_boxes"


def query_text(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """GroundingDINO's query `"a. b. c."` and each phrase's character span in it."""
    spans, start = [], 0
    for p in phrases:
        spans.append((start, start + len(p)))
        start += len(p) + 2
    return ". ".join(phrases) + ".", spans


def phrase_scores(probs, offsets, spans):
    """Per phrase, over its tokens: ([queries, phrases] mean token probability, [queries, phrases] max).

    `probs` is [queries, tokens] (sigmoid of the logits), `offsets` the tokens' character spans in the query."""
    import torch

    means, maxes = [], []
    for start, end in spans:
        tokens = [t for t, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        part = probs[:, tokens] if tokens else torch.zeros(probs.shape[0], 1)
        means.append(part.mean(dim=1))
        maxes.append(part.max(dim=1).values)
    return torch.stack(means, dim=1), torch.stack(maxes, dim=1)


def assign_boxes(scores, token_max, boxes: list[list[float]], box_threshold: float, text_threshold: float,
                 min_area: float) -> tuple[dict[int, tuple[int, float]], set[int]]:
    """Phrase index -> (query, score): each phrase's best query among the boxes that pass the thresholds and the
    area filter, one phrase per query (higher scores choose first). Also returns the phrases that had a box above
    the thresholds but none large enough (dropped for area, not for lack of detection)."""
    pairs, too_small = [], set()
    n_queries, n_phrases = scores.shape
    for q in range(n_queries):
        large = box_area(boxes[q]) >= min_area and boxes[q][2] > boxes[q][0] and boxes[q][3] > boxes[q][1]
        for j in range(n_phrases):
            s = float(scores[q, j])
            if s > box_threshold and float(token_max[q, j]) > text_threshold:
                if large:
                    pairs.append((-s, j, q))
                else:
                    too_small.add(j)
    taken, out = set(), {}
    for neg, j, q in sorted(pairs):
        if j not in out and q not in taken:
            out[j] = (q, -neg)
            taken.add(q)
    return out, too_small - set(out)


def _clipped_xyxy(cxcywh) -> list[float]:
    cx, cy, w, h = (float(v) for v in cxcywh)
    return [min(1.0, max(0.0, v)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)]


def ground(detector, images: list, phrase_lists: list[list[str]]) -> list[tuple]:
    """The one GroundingDINO call (the data graph's `detected_boxes` and MSIC's `locate_categories`): one forward
    pass over `images`, each with its own phrases as the query `"a. b. c."`. Per image, (scores, token_max, boxes):
    each phrase's score per query (the mean probability of its tokens) and its best token's probability, both
    [queries, phrases], and each query's box, normalised (x1, y1, x2, y2) clipped to the image, unrounded."""
    import torch

    processor = detector.processor
    queries = [query_text(p) for p in phrase_lists]
    # The processor's two halves, so that the offsets come from the very tokenization the model reads.
    text_inputs = processor.tokenizer([q[0] for q in queries], padding=True, return_offsets_mapping=True,
                                      return_tensors="pt")
    offsets = text_inputs.pop("offset_mapping").tolist()
    inputs = processor.image_processor(images, return_tensors="pt")
    inputs.update(text_inputs)
    with torch.inference_mode():
        out = detector.model(**inputs.to(detector.device, dtype=detector.dtype))  # dtype: floating inputs only
    probs = out.logits.float().sigmoid().cpu()
    pred = out.pred_boxes.float().cpu()
    found = []
    for row, (_, spans) in enumerate(queries):
        scores, token_max = phrase_scores(probs[row, :, :len(offsets[row])], offsets[row], spans)
        found.append((scores, token_max, [_clipped_xyxy(b) for b in pred[row]]))
    return found


def detected_boxes(detector, ctx: ShardContext, data, records: list[dict], open_image: OpenImage) -> StageResult:
    result = StageResult()
    for chunk in batches(records, data.batch_size):
        images = [open_image(r["image"]) for r in chunk]
        grounded = ground(detector, images, [[schemas.phrase(c) for c in r["categories"]] for r in chunk])
        for record, (scores, token_max, clipped) in zip(chunk, grounded):
            boxes = [[round(v, 6) for v in box] for box in clipped]
            chosen, too_small = assign_boxes(scores, token_max, boxes, data.box_threshold, data.text_threshold,
                                             data.min_box_area)
            subjects, missing = [], []
            for j, category in enumerate(record["categories"]):
                if j in chosen:
                    q, score = chosen[j]
                    subjects.append({"category": category, "box": boxes[q], "score": round(score, 6)})
                else:
                    missing.append({"category": category, "reason": "box_area" if j in too_small else "not_detected"})
            if len(subjects) < data.min_subjects:
                result.drop(record, STAGE, "too_few_subjects",
                            f"{len(subjects)} of {len(record['categories'])} categories kept: "
                            + ", ".join(f"{m['category']} ({m['reason']})" for m in missing))
                continue
            result.records.append(child(record, subjects=subjects, missing=missing))
    return result
