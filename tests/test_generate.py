"""`music generate`: bad input (exit code 2, no output folder), odd images accepted, and real generations on a tiny
checkpoint trained here (1 and 4 branches; the branches run as one batch), and on checkpoints of other
`train.ablation`s (what they decode, what the image stage reads, given plans they refuse)."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import QUICK_TRAINING, train_checkpoint
from music_dagster import cli
from music_dagster.model import generate
from music_dagster.model import runtime
def _image(tmp_path, name="s.png", size=(40, 30), mode="RGB", **kw):
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(arr).convert(mode).save(path, **kw)
    return path


def _run(capsys, *argv):
    code = cli.main(["generate", *map(str, argv)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["no_subject", "thirteen", "missing", "unreadable", "empty_prompt",
                                  "zero_branches", "negative_branches", "missing_checkpoint", "out_exists"])
def test_bad_input_exits_2_with_one_line_and_no_output(case, tmp_path, capsys):
    good = _image(tmp_path)
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    out = tmp_path / "gen" / "out"
    args = {"subjects": [good], "prompt": "put [1] on the left", "branches": 1, "checkpoint": tmp_path / "nope"}
    if case == "no_subject":
        args["subjects"] = []
    elif case == "thirteen":
        args["subjects"] = [good] * 13
    elif case == "missing":
        args["subjects"] = [good, tmp_path / "absent.png"]
    elif case == "unreadable":
        args["subjects"] = [junk]
    elif case == "empty_prompt":
        args["prompt"] = "   "
    elif case == "zero_branches":
        args["branches"] = 0
    elif case == "negative_branches":
        args["branches"] = -3
    elif case == "out_exists":
        out.mkdir(parents=True)
    argv = [a for s in args["subjects"] for a in ("--subject", s)]
    argv += ["--prompt", args["prompt"], "--branches", args["branches"], "--checkpoint", args["checkpoint"],
             "--out", out]
    code, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("music: error: ") and err.count("\n") == 1, err
    expected = {"no_subject": "no subject", "thirteen": "13 subjects", "missing": "absent.png",
                "unreadable": "junk.png", "empty_prompt": "prompt is empty", "zero_branches": "--branches",
                "negative_branches": "--branches", "missing_checkpoint": "nope", "out_exists": "already exists"}
    assert expected[case] in err
    if case == "out_exists":
        assert list(out.iterdir()) == []
    else:
        assert not out.exists() and not out.parent.exists()


def test_odd_but_valid_images_are_accepted(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    paths = [
        _image(tmp_path, "rgba.png", mode="RGBA"),
        _image(tmp_path, "cmyk.jpg", mode="CMYK"),
        _image(tmp_path, "gray.png", mode="L"),
        _image(tmp_path, "palette.png", mode="P"),
        _image(tmp_path, "large.jpg", size=(4000, 3000), quality=70),
    ]
    sixteen = tmp_path / "16bit.png"
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(sixteen)
    paths.append(sixteen)
    images, names = generate.read_subjects(paths + [Image.fromarray(rgb).convert("LA")])
    assert [im.mode for im in images] == ["RGB"] * 7
    assert images[4].size == (4000, 3000)
    assert names[-1] == "<image 7>" and names[0] == str(paths[0])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_zoo, make_project):
    """A de-tokenizer and a LoRA checkpoint trained for two steps on the procedural world, and params using them."""
    root = tmp_path_factory.mktemp("generate")
    project = make_project(root, paths={"models": root / "models"}, **QUICK_TRAINING)
    config = project.get()
    samples = train_checkpoint(config, root)
    refs = []
    for i, ref in enumerate(samples[0].references):
        refs.append(root / f"ref{i}.png")
        ref.save(refs[-1])
    return {"project": project, "config": config, "refs": refs, "prompt": samples[0].instruction}


@pytest.mark.slow
@pytest.mark.parametrize("branches", [1, 4])
def test_cli_writes_image_plan_and_overlay(branches, tiny_checkpoint, tmp_path, use_project, capsys):
    use_project(tiny_checkpoint["project"])
    out = tmp_path / "out"
    argv = [a for r in tiny_checkpoint["refs"] for a in ("--subject", r)]
    code, err = _run(capsys, *argv, "--prompt", tiny_checkpoint["prompt"], "--branches", branches,
                     "--seed", 3, "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["image.png", "layout.png", "plan.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it
    plan = json.loads((out / "plan.json").read_text())
    scores = [b["clip_score"] for b in plan["branches"]]
    assert plan["num_branches"] == branches == len(scores)
    assert plan["best"] == int(np.argmax(scores)) and all(-1 <= s <= 1 for s in scores)
    assert plan["cot"] == plan["branches"][plan["best"]]["cot"]
    assert plan["seed"] == 3 and plan["subjects"] == [str(r) for r in tiny_checkpoint["refs"]]
    image, overlay = Image.open(out / "image.png"), Image.open(out / "layout.png")
    unet = json.loads((runtime.detokenizer_dir(tiny_checkpoint["config"]) / "unet" / "config.json").read_text())
    assert image.size == overlay.size == (unet["sample_size"],) * 2  # the de-tokenizer's resolution
    if plan["layout"] is not None:
        assert np.asarray(plan["layout"]).shape == (8, 8)


@pytest.mark.slow
def test_branches_run_as_one_batch_and_are_deterministic(tiny_checkpoint, monkeypatch):
    generator = generate.Generator(tiny_checkpoint["config"])
    calls = {"plan": [], "tokens": [], "decode": []}
    plan, tokens, decode = generator.model.plan, generator.model.image_tokens, generator.detokenizer.decode
    monkeypatch.setattr(generator.model, "plan", lambda *a, **k: calls["plan"].append(k["branches"]) or plan(*a, **k))
    monkeypatch.setattr(generator.model, "image_tokens",
                        lambda p, *a, **k: calls["tokens"].append(len(p)) or tokens(p, *a, **k))
    monkeypatch.setattr(generator.detokenizer, "decode",
                        lambda t, **k: calls["decode"].append(len(t)) or decode(t, **k))
    first = generator.generate(tiny_checkpoint["refs"], tiny_checkpoint["prompt"], branches=4, seed=5)
    assert calls == {"plan": [4], "tokens": [4], "decode": [4]}
    assert len({b.text for b in first.branches}) > 1  # sampled, not four copies of one greedy plan
    again = generator.generate(tiny_checkpoint["refs"], tiny_checkpoint["prompt"], branches=4, seed=5)
    assert first.plan() == again.plan()
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert torch.tensor([1e-40]).mul(1.0).item() != 0.0  # generation turns denormal flushing off again


def _corner_layout(subjects: int, corner: tuple[int, int]) -> np.ndarray:
    """Subject 1 owns the 2x2 block at `corner`; subject i > 1 owns cell (7, i) of the bottom row."""
    layout = np.zeros((8, 8), np.int64)
    layout[corner[0]:corner[0] + 2, corner[1]:corner[1] + 2] = 1
    for sid in range(2, subjects + 1):
        layout[7, sid] = sid
    return layout


@pytest.mark.slow
def test_moving_a_subjects_cells_moves_what_the_image_stage_reads(tiny_checkpoint, monkeypatch):
    from music_dagster.model.layout import layout_to_text

    generator = generate.Generator(tiny_checkpoint["config"])
    seen = []
    tokens = generator.model.image_tokens
    monkeypatch.setattr(generator.model, "image_tokens", lambda r, p, **k: seen.append((p, tokens(r, p, **k))) or seen[-1][1])
    n = len(tiny_checkpoint["refs"])
    results = {}
    for corner in ((0, 0), (5, 5)):
        given = generate.GivenPlan(layout=_corner_layout(n, corner), cot="[1] stands apart")
        results[corner] = generator.generate(tiny_checkpoint["refs"], tiny_checkpoint["prompt"], branches=2,
                                             seed=1, given=given)
    (left, left_tokens), (right, right_tokens) = seen
    for plans, corner in ((left, (0, 0)), (right, (5, 5))):
        text = generator.model.tokenizer.decode(list(plans[0].token_ids))
        assert text.strip() == f"[1] stands apart {layout_to_text(_corner_layout(n, corner))}"
        assert plans[0].token_ids == plans[1].token_ids  # a given plan: every branch reads the same plan
    assert not torch.equal(left_tokens, right_tokens)  # the image stage is conditioned on where subject 1 is
    assert np.array_equal(results[(5, 5)].layout, _corner_layout(n, (5, 5)))
    assert results[(0, 0)].plan()["plan_source"] == "given"


@pytest.mark.slow
def test_a_given_layout_keeps_the_models_cot(tiny_checkpoint):
    generator = generate.Generator(tiny_checkpoint["config"])
    n = len(tiny_checkpoint["refs"])
    own = generator.generate(tiny_checkpoint["refs"], tiny_checkpoint["prompt"], branches=2, seed=4)
    given = generator.generate(tiny_checkpoint["refs"], tiny_checkpoint["prompt"], branches=2, seed=4,
                               given=generate.GivenPlan(layout=_corner_layout(n, (0, 0))))
    plan = given.plan()
    assert plan["plan_source"] == "given_layout"
    for mine, theirs in zip(plan["branches"], own.plan()["branches"]):
        assert mine["layout"] == _corner_layout(n, (0, 0)).tolist()
        assert mine["cot"] == theirs["text"].split("layout:")[0].strip()  # the model's CoT, the given layout


@pytest.mark.slow
def test_a_hand_edited_plan_redraws_through_the_cli(tiny_checkpoint, tmp_path, use_project, capsys):
    use_project(tiny_checkpoint["project"])
    argv = [a for r in tiny_checkpoint["refs"] for a in ("--subject", r)]
    argv += ["--prompt", tiny_checkpoint["prompt"], "--branches", 2]
    code, err = _run(capsys, *argv, "--out", tmp_path / "first")
    assert code == 0, err
    # The user moves subject 1 to the top-left corner of the plan the model wrote and redraws.
    plan = json.loads((tmp_path / "first" / "plan.json").read_text())
    assert plan["plan_source"] == "model"
    plan["layout"] = _corner_layout(len(tiny_checkpoint["refs"]), (0, 0)).tolist()
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    code, err = _run(capsys, *argv, "--plan", tmp_path / "edited.json", "--out", tmp_path / "second")
    assert code == 0, err
    redrawn = json.loads((tmp_path / "second" / "plan.json").read_text())
    assert redrawn["plan_source"] == "given"
    assert redrawn["layout"] == plan["layout"] and redrawn["cot"] == plan["cot"].strip()
    assert {json.dumps(b["layout"]) for b in redrawn["branches"]} == {json.dumps(plan["layout"])}


@pytest.mark.slow
def test_music_pipeline_in_diffusers_style_gives_the_generators_bytes(tiny_checkpoint):
    from diffusers.utils import BaseOutput

    from music_dagster.model.pipeline import MusicPipeline
    from music_dagster.storage import png_bytes

    config = tiny_checkpoint["config"]
    pipe = MusicPipeline.from_pretrained(runtime.lora_dir(config), config).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    subjects = [Image.open(r) for r in tiny_checkpoint["refs"]]
    out = pipe(subjects=subjects, prompt=tiny_checkpoint["prompt"], branches=3,
               generator=torch.Generator().manual_seed(5))
    assert isinstance(out, BaseOutput) and out[0] is out.images
    assert len(out.images) == len(out.plans) == len(out.scores) == 3
    assert out.best == int(np.argmax(out.scores)) and out.plans[out.best]["cot"] == out.result.plan()["cot"]
    direct = generate.Generator(config).generate(subjects, tiny_checkpoint["prompt"], branches=3, seed=5)
    assert direct.plan() == out.result.plan()
    assert [png_bytes(im) for im in out.images] == [png_bytes(b.image) for b in direct.branches]
    # A given plan as plan.json's keys: every branch is drawn from it.
    layout = _corner_layout(len(subjects), (0, 0)).tolist()
    given = pipe(subjects=subjects, prompt=tiny_checkpoint["prompt"], branches=2, plan={"cot": "c", "layout": layout})
    assert [p["layout"] for p in given.plans] == [layout, layout] and given.result.plan_source == "given"
    with pytest.raises(generate.PlanError, match="subject 1 has no cell"):
        pipe(subjects=subjects, prompt="x", plan={"layout": np.zeros((8, 8), int).tolist()})


def test_generator_is_the_pipelines_internal():
    """`MusicPipeline` is the one inference path: no module outside `model/` imports `generate.Generator`."""
    import ast
    from pathlib import Path

    import music_dagster

    package = Path(music_dagster.__file__).parent
    users = []
    for path in sorted(package.rglob("*.py")):
        if path.parent == package / "model":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = isinstance(node, ast.ImportFrom) and node.module == "music_dagster.model.generate" and \
                any(alias.name == "Generator" for alias in node.names)
            attribute = isinstance(node, ast.Attribute) and node.attr == "Generator" and \
                isinstance(node.value, ast.Name) and node.value.id == "generate"
            if named or attribute:
                users.append(f"{path.relative_to(package)}:{node.lineno}")
    assert users == []


@pytest.mark.slow
def test_the_models_own_plan_is_decoded_under_the_plans_grammar(tiny_checkpoint):
    """A two-step checkpoint's plans parse (the grammar and its token budget: `model/plan_grammar.py`) once the
    token limit holds a whole plan (the fixture's 24 tokens do not: a layout alone is ~75 tiny-tokenizer tokens)."""
    from music_dagster.model.pipeline import MusicPipeline

    config = tiny_checkpoint["config"].with_values("generate", max_plan_tokens=160)
    pipe = MusicPipeline.from_pretrained(runtime.lora_dir(config), config)
    pipe.set_progress_bar_config(disable=True)
    n = len(tiny_checkpoint["refs"])
    for branches, seed in ((1, 0), (3, 2)):
        out = pipe(subjects=tiny_checkpoint["refs"], prompt=tiny_checkpoint["prompt"], branches=branches,
                   generator=seed)
        for plan in out.plans:
            layout = np.asarray(plan["layout"])
            assert plan["parsed"] and layout.shape == (8, 8) and 0 <= layout.min() and layout.max() <= n
            assert plan["text"].isprintable() and plan["text"].count("layout:") == 1
        assert out.result.plan()["layout"] == out.plans[out.best]["layout"]


@pytest.fixture(scope="module")
def no_layout_checkpoint(tmp_path_factory, tiny_checkpoint, make_project):
    """MUSIC trained for two steps with `train.ablation: no_layout` (the de-tokenizer copied from `tiny_checkpoint`),
    and plan budget enough for a whole CoT."""
    root = tmp_path_factory.mktemp("no_layout")
    sections = {**QUICK_TRAINING, "train": {**QUICK_TRAINING["train"], "ablation": "no_layout"},
                "generate": {"max_plan_tokens": 96}}
    project = make_project(root, paths={"models": root / "models"}, **sections)
    train_checkpoint(project.get(), root, detokenizer=runtime.detokenizer_dir(tiny_checkpoint["config"]))
    return {"project": project, "lora": runtime.lora_dir(project.get())}


def _relabelled(tiny_checkpoint, folder, ablation):
    """A copy of the tiny checkpoint whose config records `ablation` (None: no record, as one saved before the
    ablation was recorded): the weights are the full-plan ones, what is checked is that inference follows the record."""
    import shutil

    shutil.copytree(runtime.lora_dir(tiny_checkpoint["config"]), folder)
    config = folder / "music_config.json"
    meta = json.loads(config.read_text())
    if ablation is None:
        del meta["settings"]["ablation"]
    else:
        meta["settings"]["ablation"] = ablation
    config.write_text(json.dumps(meta))
    return folder


def _plan_files(tmp_path, n):
    layout = _corner_layout(n, (0, 0)).tolist()
    (tmp_path / "plan.json").write_text(json.dumps({"cot": "[1] stands apart.", "layout": layout}))
    (tmp_path / "grid.json").write_text(json.dumps(layout))
    return {"--plan": tmp_path / "plan.json", "--layout": tmp_path / "grid.json"}


@pytest.mark.slow
def test_a_no_layout_checkpoint_writes_its_cot_alone_and_the_image_stage_reads_just_that(no_layout_checkpoint,
                                                                                        tiny_checkpoint):
    from music_dagster.model.music import plan_text
    from music_dagster.model.pipeline import MusicPipeline

    config = no_layout_checkpoint["project"].get()
    pipe = MusicPipeline.from_pretrained(no_layout_checkpoint["lora"], config)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.ablation == "no_layout"
    seen = []
    image_tokens = pipe.generator.model.image_tokens
    pipe.generator.model.image_tokens = lambda r, p, **k: seen.append(p) or image_tokens(r, p, **k)
    n = len(tiny_checkpoint["refs"])
    out = pipe(subjects=tiny_checkpoint["refs"], prompt=tiny_checkpoint["prompt"], branches=2, generator=1)
    plan = out.result.plan()
    assert plan["ablation"] == "no_layout" and plan["layout"] is None
    for branch, read in zip(plan["branches"], seen[0]):
        assert branch["layout"] is None and not branch["parsed"] and ":" not in branch["text"]
        assert len(re.findall(r"\[(\d+)\][^.]*\.", branch["cot"])) == n  # one tagged sentence per subject
        # the image stage reads what training taught this checkpoint to write: the CoT, then eos
        assert pipe.generator.model.tokenizer.decode(list(read.token_ids)) == plan_text(branch["cot"], None,
                                                                                         "no_layout")
    layout = _corner_layout(n, (0, 0)).tolist()
    for given in ({"cot": "[1] stands apart.", "layout": layout}, {"layout": layout}):
        with pytest.raises(generate.PlanError, match="trained with train.ablation no_layout: its plans hold no "
                                                     "layout"):
            pipe(subjects=tiny_checkpoint["refs"], prompt="x", plan=given)


@pytest.mark.slow
@pytest.mark.parametrize("ablation, refused", [("no_layout", ["--plan", "--layout"]), ("no_cot", ["--plan"]),
                                                ("neither", ["--plan", "--layout"])])
def test_a_given_part_the_checkpoint_never_wrote_is_one_line_before_any_model_loads(
        ablation, refused, no_layout_checkpoint, tiny_checkpoint, tmp_path, use_project, capsys, monkeypatch):
    from music_dagster.model.pipeline import MusicPipeline

    use_project(tiny_checkpoint["project"])
    checkpoint = (no_layout_checkpoint["lora"] if ablation == "no_layout" else
                  _relabelled(tiny_checkpoint, tmp_path / ablation, ablation))
    monkeypatch.setattr(MusicPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    files = _plan_files(tmp_path, len(tiny_checkpoint["refs"]))
    argv = [a for r in tiny_checkpoint["refs"] for a in ("--subject", r)]
    for flag in refused:
        out = tmp_path / f"out{flag}"
        code, err = _run(capsys, *argv, "--prompt", tiny_checkpoint["prompt"], "--checkpoint", checkpoint,
                         flag, files[flag], "--out", out)
        assert code == 2 and err.count("\n") == 1, err
        assert f"checkpoint {checkpoint} was trained with train.ablation {ablation}: its plans hold no " in err
        assert ("give the layout alone (--layout)" in err) == (ablation == "no_cot")
        assert not out.exists()


@pytest.mark.slow
def test_relabelled_checkpoints_decode_and_condition_on_what_their_ablation_writes(tiny_checkpoint, tmp_path,
                                                                                  use_project, capsys):
    """`no_cot` with a given layout: that layout is the whole plan (planning skipped); `neither`: an empty plan,
    nothing decoded; no record (a checkpoint saved before the ablation was recorded): the full plan, as before."""
    from music_dagster.model.layout import layout_to_text
    from music_dagster.model.music import read_saved

    use_project(tiny_checkpoint["project"])
    n = len(tiny_checkpoint["refs"])
    files = _plan_files(tmp_path, n)
    argv = [a for r in tiny_checkpoint["refs"] for a in ("--subject", r)]
    argv += ["--prompt", tiny_checkpoint["prompt"], "--branches", 2, "--seed", 3]
    old = _relabelled(tiny_checkpoint, tmp_path / "old", None)
    assert read_saved(old).settings.ablation == "none"
    code, err = _run(capsys, *argv, "--checkpoint", old, "--out", tmp_path / "old_out")
    assert code == 0, err
    code, err = _run(capsys, *argv, "--out", tmp_path / "new_out")  # the same weights, "none" recorded
    assert code == 0, err
    before, now = (json.loads((tmp_path / f / "plan.json").read_text()) for f in ("old_out", "new_out"))
    assert before["ablation"] == now["ablation"] == "none"
    assert {k: v for k, v in before.items() if k != "checkpoint"} == {k: v for k, v in now.items() if k != "checkpoint"}

    generator = generate.Generator(tiny_checkpoint["config"], _relabelled(tiny_checkpoint, tmp_path / "no_cot",
                                                                          "no_cot"))
    seen = []
    plan, image_tokens = generator.model.plan, generator.model.image_tokens
    generator.model.plan = lambda *a, **k: pytest.fail("planned although the whole plan was given")
    generator.model.image_tokens = lambda r, p, **k: seen.append(p) or image_tokens(r, p, **k)
    layout = _corner_layout(n, (0, 0))
    result = generator.generate(tiny_checkpoint["refs"], tiny_checkpoint["prompt"], branches=2, seed=3,
                                given=generate.GivenPlan(layout=layout))
    assert [generator.model.tokenizer.decode(list(p.token_ids)) for p in seen[0]] == [f" {layout_to_text(layout)}"] * 2
    record = result.plan()
    assert (record["ablation"], record["plan_source"], record["cot"]) == ("no_cot", "given_layout", "")
    assert record["layout"] == layout.tolist()

    generator = generate.Generator(tiny_checkpoint["config"], _relabelled(tiny_checkpoint, tmp_path / "neither",
                                                                          "neither"))
    seen.clear()
    image_tokens = generator.model.image_tokens
    generator.model.image_tokens = lambda r, p, **k: seen.append(p) or image_tokens(r, p, **k)
    record = generator.generate(tiny_checkpoint["refs"], tiny_checkpoint["prompt"], branches=2, seed=3).plan()
    assert [p.token_ids for p in seen[0]] == [(), ()]  # the image queries follow the eos right after the prompt
    assert (record["ablation"], record["cot"], record["layout"]) == ("neither", "", None)
    assert [b["text"] for b in record["branches"]] == ["", ""]
