"""One clean display name per Objects365 category, in every prompt: the file keeps Objects365's own names
(aliases, typos), `category_names` maps them, and `category_combos` writes display names into its records."""
import json

from music_dagster.config import load_config
from music_dagster.synthesis import checks, combos, schemas
from music_dagster.synthesis.category_names import DISPLAY_NAMES, display_name
from music_dagster.synthesis.common import ShardContext, shard_seed
from music_dagster.synthesis.structured import Answer

CONFIG = load_config(profile="tiny")
NAMES = combos.load_categories(CONFIG.paths.resolve("objects365"))
RAW = ["Moniter/TV", "Cabinet/shelf", "Bakset", "Other Fish", "Tennis", "Cigar/Cigarette"]


def test_every_category_has_one_clean_display_name():
    shown = [display_name(n) for n in NAMES]
    assert len(set(shown)) == len(NAMES) == 365  # still one category per name
    assert set(DISPLAY_NAMES) <= set(NAMES)  # the mapping names only categories of the file
    assert all("/" not in s and s == " ".join(s.split()) and s for s in shown)
    assert not set(RAW) & set(shown)
    assert [display_name(n) for n in RAW] == ["Monitor", "Cabinet", "Basket", "Fish", "Tennis Ball", "Cigarette"]
    assert display_name("Person") == "Person" and display_name("Cigar/Cigarette ") == "Cigarette"
    # the file itself keeps Objects365's names as published
    raw = {e["name"] for e in json.loads(CONFIG.paths.resolve("objects365").read_text())}
    assert {"Moniter/TV", "Cabinet/shelf", "Bakset"} <= raw


def test_category_combos_prompts_and_records_use_display_names(monkeypatch):
    seen = {}

    def fake_ask_llm(llm, prompts, answer_schemas, **kwargs):
        seen["prompts"], seen["schemas"] = prompts, answer_schemas
        return [Answer({"keep": s["properties"]["keep"]["items"]["enum"], "scene": "a room"}, "", 1)
                for s in answer_schemas]

    monkeypatch.setattr(combos, "ask_llm", fake_ask_llm)
    data = CONFIG.profile.data.model_copy(update={"shard_size": 3, "min_categories": 2, "max_subjects": 6})
    ctx = ShardContext("category_combos", "shard-00000", shard_seed(CONFIG.seed, "shard-00000"))
    result = combos.category_combos(None, ctx, data, RAW)
    assert result.records
    for prompt in seen["prompts"]:
        assert not any(raw in prompt for raw in ("Moniter", "shelf", "Bakset", "Other Fish", "Cigar/"))
    enums = {c for s in seen["schemas"] for c in s["properties"]["keep"]["items"]["enum"]}
    assert enums <= {display_name(n) for n in RAW}
    for record in result.records:
        assert set(record["categories"]) <= {display_name(n) for n in RAW}
        assert all(schemas.phrase(c) in {"monitor", "cabinet", "basket", "fish", "tennis ball", "cigarette"}
                   for c in record["categories"])
    assert checks.categories_valid(result.records, set(RAW), 2, 6, 2).passed
    # a record that names a category by its raw alias is refused by the stage's check
    bad = [{**result.records[0], "candidates": ["Moniter/TV", *result.records[0]["candidates"][1:]]}]
    verdict = checks.categories_valid(bad, set(RAW), 2, 6, 2)
    assert not verdict.passed and "Moniter/TV" in verdict.detail
