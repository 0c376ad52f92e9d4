"""DreamBench loader on the shared copy and on broken folders; DreamBench and MSIC scoring on the tiny zoo."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from music_dagster import benchmarks as bm
from music_dagster.config import default_config
from music_dagster.images import read_image
from music_dagster.metrics import Embedder

torch.set_num_threads(1)
PROMPTS = bm.PROMPTS_FILE


@pytest.fixture(scope="module")
def dreambench_root():
    root = default_config().paths.resolve("dreambench")
    if not (root / PROMPTS).is_file():
        pytest.skip(f"no DreamBench copy at {root}")
    return root


@pytest.fixture(scope="module")
def handles():
    from music_dagster.loaders import load_role
    from music_dagster.zoo import ensure_zoo

    roles = ("dino", "eval_clip", "detector")
    ensure_zoo(roles=list(roles))
    cfg = default_config()
    return {r: load_role(r, cfg.models[r], "cpu", "float32") for r in roles}


@pytest.fixture()
def embedder(handles):
    return Embedder(handles["dino"], handles["eval_clip"], dino_name="models/tiny/dino", batch_size=4)


def _noise(seed, size=(96, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------- loader
def test_loader_reads_shared_copy(dreambench_root):
    bench = bm.load_dreambench(dreambench_root)
    manifest = json.loads((dreambench_root / "manifest.json").read_text())["subjects"]
    assert len(bench.subjects) == 20 == len(manifest)
    assert bench.num_images == sum(len(s["images"]) for s in manifest) == 105
    assert bench.num_prompts == 20 * 25 and all(len(s.prompts) == 25 for s in bench.subjects)
    assert {s.name: s.kind for s in bench.subjects} == {s["subject"]: s["type"] for s in manifest}
    assert {s.name: s.class_noun for s in bench.subjects} == {s["subject"]: s["class"] for s in manifest}
    backpack, dog = bench.subject("backpack"), bench.subject("dog")
    assert backpack.reference.name == "00.jpg" and len(backpack.images) == 6
    assert backpack.prompts[0] == "a backpack in the jungle" and backpack.prompts[-1] == "a cube shaped backpack"
    assert dog.prompts[10] == "a dog wearing a red hat" and dog.instruction(10, "[1]") == "a [1] dog wearing a red hat"
    assert len(bench.unlisted) == 10 and "teapot" in bench.unlisted


def test_subset_spans_both_types(dreambench_root):
    sub = bm.load_dreambench(dreambench_root).subset(2, 3)
    assert [s.name for s in sub.subjects] == ["backpack", "dog5"]
    assert {s.kind for s in sub.subjects} == {"object", "live"} and all(len(s.prompts) == 3 for s in sub.subjects)


def _mini_bench(root, dreambench_root, subjects=("backpack", "dog")):
    root.mkdir()
    shutil.copy(dreambench_root / PROMPTS, root / PROMPTS)
    for s in subjects:
        shutil.copytree(dreambench_root / s, root / s)
    return root


def test_loader_bad_input(tmp_path, dreambench_root):
    with pytest.raises(bm.BenchmarkError, match="does not exist"):
        bm.load_dreambench(tmp_path / "nowhere")
    root = _mini_bench(tmp_path / "db", dreambench_root)
    (root / PROMPTS).unlink()
    with pytest.raises(bm.BenchmarkError, match=f"no {PROMPTS}"):
        bm.load_dreambench(root)
    shutil.copy(dreambench_root / PROMPTS, root / PROMPTS)
    (root / "candle").mkdir()
    with pytest.raises(bm.BenchmarkError, match="subject 'candle' has no images") as err:
        bm.load_dreambench(root)
    assert "\n" not in str(err.value)
    (root / "candle").rmdir()
    (root / "mystery").mkdir()
    with pytest.raises(bm.BenchmarkError, match="mystery: subject folder not listed"):
        bm.load_dreambench(root)
    (root / "mystery").rmdir()
    (root / PROMPTS).write_text("Classes\n\nsubject_name,class\nbackpack,backpack\n\nObject Prompts\n")
    with pytest.raises(bm.BenchmarkError, match="Live Subject Prompts"):
        bm.load_dreambench(root)


# --------------------------------------------------------------------------------------------------- scoring
def test_dreambench_scores_mean_over_real_photos(tmp_path, dreambench_root, embedder):
    bench = bm.load_dreambench(_mini_bench(tmp_path / "db", dreambench_root)).subset(None, 1)
    dog = bench.subject("dog")
    good = tmp_path / "gen.png"
    read_image(dog.images[1]).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    items = [bm.DreamItem("dog/00/0", "dog", dog.prompts[0], good),
             bm.DreamItem("dog/00/1", "dog", dog.prompts[0], bad)]
    result = bm.score_dreambench(bench, items, embedder)
    assert [f["key"] for f in result["failures"]] == ["dog/00/1"] and "broken.png" in result["failures"][0]["error"]
    (record,) = result["images"]
    gen = embedder.images([read_image(good)])
    reals = embedder.images([read_image(p) for p in dog.images])
    assert record["dino"] == pytest.approx(float((reals.dino @ gen.dino[0]).mean()), abs=1e-9)
    assert record["clip_i"] == pytest.approx(float((reals.clip @ gen.clip[0]).mean()), abs=1e-9)
    text = embedder.clip_texts(["a dog in the jungle"])
    assert record["clip_t"] == pytest.approx(float(text[0] @ gen.clip[0]), abs=1e-9)
    assert record["clip_variant"] == embedder.clip_name and record["dino_model"] == "models/tiny/dino"
    assert result["overall"]["n"] == 1 and result["per_subject"]["dog"]["dino"] == record["dino"]


def test_real_vs_real_pairs(tmp_path, dreambench_root, embedder):
    bench = bm.load_dreambench(_mini_bench(tmp_path / "db", dreambench_root))
    result = bm.score_real_vs_real(bench, embedder)
    assert result["per_subject"]["backpack"]["n"] == 6 * 5 and result["per_subject"]["dog"]["n"] == 5 * 4
    assert result["overall"]["n"] == 50 and result["overall"]["clip_t"] is None
    for m in ("dino", "clip_i"):
        assert -1 <= result["overall"][m] < 1 - 1e-6  # distinct photos: never a perfect match


def test_msic_text_replaces_tags():
    item = bm.MsicItem("k", "put [2] on the left of [1]", (bm.MsicSubject(1, "dog", None), bm.MsicSubject(2, "cat", None)),
                       None)
    assert item.text == "put cat on the left of dog"


def _msic_item(tmp_path):
    refs = []
    for i, category in enumerate(("cat", "teapot"), start=1):
        path = tmp_path / f"ref{i}.png"
        _noise(10 + i, (48, 48)).save(path)
        refs.append(bm.MsicSubject(i, category, path))
    gen = tmp_path / "gen.png"
    _noise(20, (128, 96)).save(gen)
    return bm.MsicItem("s0/0", "a [1] next to a [2] on a table", tuple(refs), gen)


def test_msic_scores_use_detected_region(tmp_path, embedder, handles):
    item = _msic_item(tmp_path)
    result = bm.score_msic([item], embedder, handles["detector"], box_threshold=0.0, text_threshold=0.0)
    (sample,) = result["samples"]
    image = read_image(item.path)
    whole = embedder.images([image])
    for sub, ref in zip(sample["subjects"], item.subjects):
        assert sub["found"] and sub["box"] is not None
        x1, y1, x2, y2 = (int(round(v)) for v in sub["box"])
        assert (x2 - x1, y2 - y1) != image.size  # a region, not the whole image
        crop = embedder.images([image.crop((x1, y1, x2, y2))])
        r = embedder.images([read_image(ref.reference)])
        assert sub["dino"] == pytest.approx(float(crop.dino[0] @ r.dino[0]), abs=1e-6)
        assert sub["clip_i"] == pytest.approx(float(crop.clip[0] @ r.clip[0]), abs=1e-6)
        assert abs(sub["dino"] - float(whole.dino[0] @ r.dino[0])) > 1e-6
    assert sample["text"] == "a cat next to a teapot on a table" and sample["found_rate"] == 1.0
    assert result["by_subject_count"]["2"]["n"] == 1 and result["overall"]["subjects"] == 2


def test_msic_whole_image_when_not_found(tmp_path, embedder, handles):
    item = _msic_item(tmp_path)
    result = bm.score_msic([item], embedder, handles["detector"], box_threshold=1.0, text_threshold=1.0)
    (sample,) = result["samples"]
    whole = embedder.images([read_image(item.path)])
    for sub, ref in zip(sample["subjects"], item.subjects):
        r = embedder.images([read_image(ref.reference)])
        assert not sub["found"] and sub["dino"] == pytest.approx(float(whole.dino[0] @ r.dino[0]), abs=1e-6)
    assert result["overall"]["found_rate"] == 0.0


def test_msic_unreadable_image_is_a_recorded_failure(tmp_path, embedder, handles):
    good = _msic_item(tmp_path)
    missing = bm.MsicItem("s0/1", good.instruction, good.subjects, tmp_path / "missing.png")
    result = bm.score_msic([missing, good], embedder, handles["detector"], 0.0, 0.0)
    assert [f["key"] for f in result["failures"]] == ["s0/1"]
    assert [s["key"] for s in result["samples"]] == ["s0/0"]
