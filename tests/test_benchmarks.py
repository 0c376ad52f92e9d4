"""DreamBench loader on the repository subset, the shared copy and broken folders; DreamBench and MSIC scoring on the tiny zoo."""
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from music_dagster.config import PROJECT_ROOT
from music_dagster.evaluation import common, dreambench, msic, report
from music_dagster.evaluation.metrics import Embedder
from music_dagster.images import read_image

torch.set_num_threads(1)
PROMPTS = dreambench.PROMPTS_FILE


SHARED_DREAMBENCH = PROJECT_ROOT.parent / "shared" / "data" / "dreambench"  # 20 subjects: extra test material


@pytest.fixture(scope="module")
def dreambench_root(make_project):
    """The tiny profile's DreamBench: the subset kept in the repository."""
    return make_project().get().dreambench_dir


@pytest.fixture(scope="module")
def shared_dreambench():
    if not (SHARED_DREAMBENCH / PROMPTS).is_file():
        pytest.skip(f"no DreamBench copy at {SHARED_DREAMBENCH}")
    return SHARED_DREAMBENCH


@pytest.fixture(scope="module")
def handles(tiny_zoo, make_project):
    from music_dagster.zoo.loaders import load_role

    roles = ("dino", "eval_clip", "detector")
    cfg = make_project().get()
    return {r: load_role(r, cfg.models[r], "cpu", "float32") for r in roles}


@pytest.fixture()
def embedder(handles):
    return Embedder(handles["dino"], handles["eval_clip"], dino_name="models/tiny/dino", batch_size=4)


def _noise(seed, size=(96, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------- loader
def test_loader_reads_the_repository_subset(dreambench_root):
    """The subset the tiny profile evaluates on: one object and two live subjects, small, each photo licensed."""
    bench = dreambench.load_dreambench(dreambench_root)
    assert {s.name: (s.class_noun, s.kind) for s in bench.subjects} == \
        {"backpack": ("backpack", "object"), "cat": ("cat", "live"), "dog": ("dog", "live")}
    assert bench.num_images == 16 and bench.unlisted == ()
    assert all(len(s.prompts) == 25 for s in bench.subjects)
    files = sorted(p for p in dreambench_root.rglob("*") if p.is_file())
    assert sum(p.stat().st_size for p in files) < 200_000
    licences = (dreambench_root / "references_and_licenses.txt").read_text()
    for s in bench.subjects:
        for image in s.images:
            assert max(Image.open(image).size) <= 128
            line = rf"^{s.name}/{image.name}\s+Unsplash @\S+\s+https://unsplash\.com/photos/\S+"
            assert re.search(line, licences, re.MULTILINE), image
    sub = bench.subset(2, 2)  # what the tiny profile scores: both kinds
    assert [s.name for s in sub.subjects] == ["backpack", "cat"]


def test_loader_reads_shared_copy(shared_dreambench):
    dreambench_root = shared_dreambench
    bench = dreambench.load_dreambench(dreambench_root)
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


def test_subset_spans_both_types(shared_dreambench):
    sub = dreambench.load_dreambench(shared_dreambench).subset(2, 3)
    assert [s.name for s in sub.subjects] == ["backpack", "dog5"]
    assert {s.kind for s in sub.subjects} == {"object", "live"} and all(len(s.prompts) == 3 for s in sub.subjects)


def _mini_bench(root, dreambench_root, subjects=("backpack", "dog")):
    root.mkdir()
    shutil.copy(dreambench_root / PROMPTS, root / PROMPTS)
    for s in subjects:
        shutil.copytree(dreambench_root / s, root / s)
    return root


def test_loader_bad_input(tmp_path, dreambench_root):
    with pytest.raises(common.BenchmarkError, match="does not exist"):
        dreambench.load_dreambench(tmp_path / "nowhere")
    root = _mini_bench(tmp_path / "db", dreambench_root)
    (root / PROMPTS).unlink()
    with pytest.raises(common.BenchmarkError, match=f"no {PROMPTS}"):
        dreambench.load_dreambench(root)
    shutil.copy(dreambench_root / PROMPTS, root / PROMPTS)
    (root / "cat").mkdir()
    with pytest.raises(common.BenchmarkError, match="subject 'cat' has no images") as err:
        dreambench.load_dreambench(root)
    assert "\n" not in str(err.value)
    (root / "cat").rmdir()
    (root / "mystery").mkdir()
    with pytest.raises(common.BenchmarkError, match="mystery: subject folder not listed"):
        dreambench.load_dreambench(root)
    (root / "mystery").rmdir()
    (root / PROMPTS).write_text("Classes\n\nsubject_name,class\nbackpack,backpack\n\nObject Prompts\n")
    with pytest.raises(common.BenchmarkError, match="Live Subject Prompts"):
        dreambench.load_dreambench(root)


# --------------------------------------------------------------------------------------------------- scoring
def test_dreambench_scores_mean_over_real_photos(tmp_path, dreambench_root, embedder):
    bench = dreambench.load_dreambench(_mini_bench(tmp_path / "db", dreambench_root)).subset(None, 1)
    dog = bench.subject("dog")
    good = tmp_path / "gen.png"
    read_image(dog.images[1]).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    items = [dreambench.DreamItem("dog/00/0", "dog", dog.prompts[0], good),
             dreambench.DreamItem("dog/00/1", "dog", dog.prompts[0], bad)]
    result = dreambench.score_dreambench(bench, items, embedder)
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
    bench = dreambench.load_dreambench(_mini_bench(tmp_path / "db", dreambench_root))
    result = dreambench.score_real_vs_real(bench, embedder)
    assert result["per_subject"]["backpack"]["n"] == 6 * 5 and result["per_subject"]["dog"]["n"] == 5 * 4
    assert result["overall"]["n"] == 50 and result["overall"]["clip_t"] is None
    for m in ("dino", "clip_i"):
        assert -1 <= result["overall"][m] < 1 - 1e-6  # distinct photos: never a perfect match


def test_msic_text_replaces_tags():
    sample = msic.MsicSample("k", "put [2] on the left of [1].", (msic.MsicSubject(1, "dog", None),
                                                               msic.MsicSubject(2, "cat", None)))
    assert sample.text == "put cat on the left of dog."


def _msic_item(tmp_path):
    refs = []
    for i, category in enumerate(("cat", "teapot"), start=1):
        path = tmp_path / f"ref{i}.png"
        _noise(10 + i, (48, 48)).save(path)
        refs.append(msic.MsicSubject(i, category, path))
    gen = tmp_path / "gen.png"
    _noise(20, (128, 96)).save(gen)
    return msic.MsicItem(msic.MsicSample("s0/0", "a [1] next to a [2] on a table", tuple(refs)), gen)


def test_msic_scores_use_detected_region(tmp_path, embedder, handles):
    item = _msic_item(tmp_path)
    result = msic.score_msic([item], embedder, handles["detector"], box_threshold=0.0, text_threshold=0.0)
    (sample,) = result["samples"]
    image = read_image(item.path)
    whole = embedder.images([image])
    for sub, ref in zip(sample["subjects"], item.sample.subjects):
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
    result = msic.score_msic([item], embedder, handles["detector"], box_threshold=1.0, text_threshold=1.0)
    (sample,) = result["samples"]
    whole = embedder.images([read_image(item.path)])
    for sub, ref in zip(sample["subjects"], item.sample.subjects):
        r = embedder.images([read_image(ref.reference)])
        assert not sub["found"] and sub["dino"] == pytest.approx(float(whole.dino[0] @ r.dino[0]), abs=1e-6)
    assert result["overall"]["found_rate"] == 0.0


def test_msic_unreadable_image_is_a_recorded_failure(tmp_path, embedder, handles):
    good = _msic_item(tmp_path)
    other = msic.MsicSample("s0/1", good.sample.instruction, good.sample.subjects)
    missing = msic.MsicItem(other, tmp_path / "missing.png")
    result = msic.score_msic([missing, good], embedder, handles["detector"], 0.0, 0.0)
    assert [f["key"] for f in result["failures"]] == ["s0/1"]
    assert [s["key"] for s in result["samples"]] == ["s0/0"]


def test_music_star_is_chosen_both_ways_from_one_generation(tmp_path, dreambench_root, embedder):
    """MUSIC*'s branches are generated once per request and scored once: `music_star` keeps the branch the
    selection encoder kept, `music_star_eval_clip` the branch whose evaluation CLIP-T is highest, so on the same
    branches it never scores a lower CLIP-T."""
    from music_dagster.synthesis.common import derive_seed

    bench = dreambench.load_dreambench(dreambench_root).subset(2, 2)
    calls = []

    def generate(references, instruction, branches, seed):
        calls.append(branches)
        # distinct images per branch; the kept branch is set by the seed, independent of the evaluation's CLIP
        return common.Generated(tuple(_noise(seed + i) for i in range(branches)), best=seed % branches)

    folder = tmp_path / "out"
    rep = dreambench.evaluate_dreambench(bench, generate, embedder, folder, branches=3, images_per_prompt=1, seed=0,
                                         selector="models/tiny/select_clip")
    assert sorted(calls) == [1] * 4 + [3] * 4  # 4 requests: once for MUSIC, once for both MUSIC* rows
    methods = rep["methods"]
    assert list(methods) == list(common.METHODS) and rep["selected_by"] == {
        "music_star": "models/tiny/select_clip", "music_star_eval_clip": embedder.clip_name}
    star, by_eval = methods["music_star"]["images"], methods["music_star_eval_clip"]["images"]
    assert [r["key"] for r in star] == [r["key"] for r in by_eval] and len(star) == 4
    differ = 0
    for kept, best in zip(star, by_eval):
        stem = common.Job(kept["key"], (), "", 0).file_name[:-len(".png")]
        branches = [folder / "music_star" / "branches" / f"{stem}-{i}.png" for i in range(3)]
        text = embedder.clip_texts([kept["prompt"]])[0]
        clip_t = [float(embedder.clip_images([read_image(b)])[0] @ text) for b in branches]
        assert kept["branch"] == derive_seed("dreambench", 0, kept["key"]) % 3
        assert kept["clip_t"] == pytest.approx(clip_t[kept["branch"]], abs=1e-6)
        assert (folder / "music_star" / f"{stem}.png").read_bytes() == branches[kept["branch"]].read_bytes()
        assert best["branch"] == int(np.argmax(clip_t)) and best["clip_t"] == pytest.approx(max(clip_t), abs=1e-6)
        assert best["clip_t"] >= kept["clip_t"]
        differ += best["branch"] != kept["branch"]
    assert differ > 0  # the two encoders disagree on some request: the rows differ
    overall = {m: methods[m]["overall"]["clip_t"] for m in ("music_star", "music_star_eval_clip")}
    assert overall["music_star_eval_clip"] > overall["music_star"]
    assert overall["music_star_eval_clip"] == pytest.approx(np.mean([r["clip_t"] for r in by_eval]), abs=1e-12)
    assert all(r["branch"] == 0 for r in methods["music"]["images"])
    assert not (folder / "music" / "branches").exists()


# ------------------------------------------------------------------------------------------------ MSIC loader
def _shard(path, counts, split="msic"):
    from music_dagster.storage import ShardWriter, record_schema

    with ShardWriter(path, record_schema(additional=True)) as w:
        for i, n in enumerate(counts):
            sid = f"{path.name}-{i}"
            # references are datasets-relative: <asset>/<key>/<file>
            subjects = [{"id": k, "category": f"thing{k}", "reference": f"{path.parent.name}/{path.name}/"
                         + w.add_image(f"{sid}/ref{k}.png", _noise(k, (16, 16)))} for k in range(1, n + 1)]
            w.add_record({"sample_id": sid, "parent_ids": [], "split": split, "num_subjects": n,
                          "instruction": " and ".join(f"[{k}]" for k in range(1, n + 1)) + ".", "subjects": subjects})


def test_load_msic_round_robin_over_subject_counts(tmp_path):
    root = tmp_path / "training_samples"
    _shard(root / "a", [3, 3, 1, 12])
    _shard(root / "b", [2, 2, 2], split="train")  # training shards are never MSIC
    _shard(root / "c", [3, 1])
    everything = msic.load_msic(root)
    assert len(everything) == 6 and {len(s.subjects) for s in everything} == {1, 3, 12}
    picked = msic.load_msic(root, limit=4)
    assert [len(s.subjects) for s in picked] == [1, 3, 12, 1]
    assert [s.key for s in picked] == ["a-2", "a-0", "a-3", "c-1"]
    three = picked[1]
    assert three.subjects[0].reference.is_file() and three.text == "thing1 and thing2 and thing3."


def test_load_msic_bad_input(tmp_path):
    with pytest.raises(common.BenchmarkError, match="no MSIC samples"):
        msic.load_msic(tmp_path / "training_samples")
    _shard(tmp_path / "training_samples" / "a", [2], split="train")
    with pytest.raises(common.BenchmarkError, match="no MSIC samples"):
        msic.load_msic(tmp_path / "training_samples")
    manifest = tmp_path / "training_samples" / "a" / "manifest.jsonl"
    record = json.loads(manifest.read_text())
    record["split"] = "msic"
    record["subjects"][0]["reference"] = "training_samples/a/gone.png"
    manifest.write_text(json.dumps(record) + "\n")
    with pytest.raises(common.BenchmarkError, match="subject 1's reference .*gone.png is missing"):
        msic.load_msic(tmp_path / "training_samples")


# ---------------------------------------------------------------------------------------------------- reports
def _report():
    def result(n, dino):
        rows = {"2": {"dino": dino, "clip_i": 0.5, "clip_t": 0.1, "found_rate": 1.0, "n": n, "subjects": 2 * n}}
        return {"overall": {"dino": dino, "clip_i": 0.5, "clip_t": 0.1, "found_rate": 1.0, "n": n, "subjects": 2 * n},
                "by_subject_count": rows, "samples": [], "failures": [{"key": "x", "error": "bad"}], "branches": 1}
    return {"benchmark": "msic", "encoders": {"dino_model": "d", "clip_variant": "c"}, "branches": 2,
            "selected_by": {"music_star": "s", "music_star_eval_clip": "c"},
            "methods": {"music": result(3, 0.25), "music_star": result(3, 0.5),
                        "music_star_eval_clip": result(3, 0.75)}}


def test_summary_table_and_range_check():
    rep = _report()
    s = report.summary(rep)
    assert s["music"]["overall"]["failures"] == 1 and s["music_star"]["by_subject_count"]["2"]["dino"] == 0.5
    assert s["music_star_eval_clip"]["overall"]["dino"] == 0.75 and s["selected_by"]["music_star"] == "s"
    table = report.table_markdown(rep)
    assert table.splitlines()[0].startswith("| subjects | MUSIC DINO | MUSIC CLIP-I |")
    assert "| MUSIC* (eval CLIP) CLIP-T |" in table.splitlines()[0]
    assert "| 2 | 0.2500 |" in table and table.splitlines()[-1].startswith("| all |")
    assert report.out_of_range(rep) == []
    rep["methods"]["music"]["by_subject_count"]["2"]["clip_t"] = float("nan")
    rep["methods"]["music_star"]["overall"]["found_rate"] = -0.5
    assert report.out_of_range(rep) == ["methods.music.by_subject_count.2.clip_t=nan",
                                        "methods.music_star.overall.found_rate=-0.5"]


def test_plot_is_a_deterministic_png():
    first, again = report.plot_png(_report()), report.plot_png(_report())
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and first == again
    assert Image.open(io.BytesIO(first)).size == (1200, 360)


def test_an_interrupt_dropped_during_a_generation_stops_the_evaluation_before_the_next(tmp_path, raising_handlers):
    """A SIGTERM whose exception a weakref callback drops while the first request generates, inside
    `interrupts_kept` (every model step's: `step_devices`), stops the evaluation before its second request, with
    only the first image written."""
    import signal

    from music_dagster.interrupts import interrupts_kept
    from signals import Interrupted, signal_inside_a_weakref_callback

    jobs = [common.Job(f"request {i}", (), "a dog on a beach", i) for i in range(3)]

    def generate(references, instruction, branches, seed):
        signal_inside_a_weakref_callback(signal.SIGTERM)
        return common.Generated((_noise(seed),), best=0)

    with interrupts_kept(), pytest.raises(Interrupted, match="SIGTERM"):
        common.generate_images(jobs, generate, 1, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [jobs[0].file_name]
