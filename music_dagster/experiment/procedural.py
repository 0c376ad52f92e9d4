"""The procedural experiment: MUSIC, its ablations and its test-time variants, scored in pixels against ground truth.

Every row trains on the same procedural world (seed `config.seed`, `train.procedural_samples` world samples), with
the same step budgets (`train` and `detokenizer` sections), and generates for the same held-out prompts (world
samples from `HELD_OUT_START` on, never trained on) end to end: plan, visual tokens, de-tokenizer. The pictures and
plans are scored by `experiment.metrics`. Rows (`ROWS`):

| row | MUSIC model | at test time |
| --- | --- | --- |
| untrained | initial weights (feature statistics of the training targets set) | greedy plan |
| full | `train.ablation: none` | greedy plan |
| no_cot, no_layout, neither, no_decimation | trained with that `train.ablation` | greedy plan |
| shuffled_references | full | each subject gets another prompt's reference image |
| gt_tokens | none | the de-tokenizer decodes the target's own visual tokens (the ceiling MUSIC can reach) |
| music_star_clip | full | `BRANCHES` sampled plans, the highest score of MUSIC*'s CLIP kept (`train_select_clip_once`) |
| music_star_oracle | full | the same branches, the one with the best placement + identity kept (what selection could gain) |

One de-tokenizer (and one selection CLIP) serves every row. Trained models are kept under `root/<name>-<hash>/` (the
hash covers what decides them), so rows that share a model train it once and a re-run resumes. torch is imported
inside functions.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from music_dagster.errors import UserError
from music_dagster.experiment.metrics import METRICS, across_runs, paired_gap, score_image, score_plan, summarise
from music_dagster.interrupts import raise_kept_interrupt

HELD_OUT_START = 10 ** 6  # held-out prompts are world samples from here on (training uses 0..procedural_samples-1)
WORK_FOLDER = "experiment"  # the trained models, under `paths.work`
PROGRESS_EVERY_S = 60.0  # a training logs its step, loss and pace at most this often
BRANCHES = 4  # MUSIC*: sampled plans per prompt
RESULTS_FILE = "procedural.json"
PLOT_FILE = "procedural.png"
FIGURE_FILE = "procedural_examples.png"
DECODE_CHUNK = 32  # prompts per batched plan / decode


class ExperimentError(UserError):
    """An experiment request that cannot run: an unknown row, no held-out prompts."""


@dataclass(frozen=True)
class Row:
    """How one row of the table is made: which trained MUSIC model (its `train.ablation`, None: no MUSIC model),
    and what changes at test time."""

    ablation: str | None = "none"
    trained: bool = True
    shuffled: bool = False
    select: str | None = None  # MUSIC*: "clip" or "oracle" over BRANCHES sampled plans


ROWS = {
    "untrained": Row(trained=False),
    "full": Row(),
    "no_cot": Row("no_cot"),
    "no_layout": Row("no_layout"),
    "neither": Row("neither"),
    "no_decimation": Row("no_decimation"),
    "shuffled_references": Row(shuffled=True),
    "gt_tokens": Row(None),
    "music_star_clip": Row(select="clip"),
    "music_star_oracle": Row(select="oracle"),
}
# The rows that need no model beyond the full method's (what `music demo procedural` runs by default).
DEMO_ROWS = tuple(name for name, row in ROWS.items() if row.ablation in ("none", None))
ALL_ROWS = "all"  # `music demo procedural --row all`: every row, one MUSIC training per ablation
# The comparisons the issue asks for: (row a, row b, metric) -> mean paired gap a - b with its interval.
GAPS = (("full", "untrained", "placement"), ("full", "shuffled_references", "identity"),
        ("full", "no_layout", "placement"), ("full", "no_cot", "identity"), ("full", "neither", "placement"),
        ("full", "no_decimation", "placement"), ("gt_tokens", "full", "placement"),
        ("music_star_oracle", "full", "placement"), ("music_star_clip", "full", "placement"))


def check_rows(names: Sequence[str]) -> list[str]:
    """The rows asked for, in table order; an unknown name is one line listing the known ones."""
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ExperimentError(f"unknown experiment row {unknown[0]!r} (rows: {', '.join(ROWS)})")
    return [n for n in ROWS if n in names]


@dataclass
class RowResult:
    """One row: per-subject score rows, their summary, a few examples for the figure, and its wall time."""

    name: str
    rows: list[dict]
    summary: dict
    examples: list[dict] = field(repr=False, default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------------------
# Training (shared by the rows)
def _key(config, roles: Sequence[str], *parts) -> str:
    """A short hash of what decides a trained model: the sections it reads, its backbones (`roles`), the seed, the
    world."""
    profile = config.profile
    decided = {"seed": config.seed, "models": {r: profile.models[r].model_dump(mode="json") for r in roles},
               "grid": profile.data.grid, "parts": [p.model_dump(mode="json") if hasattr(p, "model_dump") else p
                                                    for p in parts]}
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _claimed(work: Path, what: str, log: Callable[[str], None]) -> Iterator[Path | None]:
    """Holds the model folder `work` for this process while the caller trains into it; yields its final weights if
    its training finished already (None: train it). The trainer writes `history.json` beside them last, and the
    folder's name covers everything that decides them, so a finished folder is loaded, not rebuilt. Another process
    asking for the same model (two rows' runs at once, a re-run beside a run) waits here, then finds it trained.
    The claim is an flock, which ends with its holder, by kill -9 too: a killed run never blocks the next."""
    import fcntl

    from music_dagster.training.train import HISTORY, MODEL_DIR

    work.parent.mkdir(parents=True, exist_ok=True)
    with open(work.parent / f".{work.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{what}: waiting for another process training into {work}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (work / HISTORY).is_file() and (work / MODEL_DIR).is_dir():
            log(f"{what}: trained already in {work}")
            yield work / MODEL_DIR
        else:
            yield None


def _progress(what: str, log: Callable[[str], None], max_steps: int | None) -> Callable[[int, dict], None]:
    """A training loop's `on_step` that logs the step, the loss and the pace at most every `PROGRESS_EVERY_S`
    seconds: the demo's MUSIC trains for half an hour. `max_steps`: the section's bound on the run's steps (its
    epochs may end it sooner), for the time left."""
    first_step, first_time = None, 0.0  # the first step this process trained (a run may resume) and its time
    last_line = time.perf_counter()

    def on_step(step: int, metrics: dict) -> None:
        nonlocal first_step, first_time, last_line
        now = time.perf_counter()
        if first_step is None:  # the pace is timed from here
            first_step, first_time = step, now
            return
        if now - last_line < PROGRESS_EVERY_S:
            return
        last_line = now
        pace = (now - first_time) / (step - first_step)
        bound, left = ("", "") if max_steps is None else (
            f" of at most {max_steps}", f", at most about {(max_steps - step) * pace / 60:.0f} min to go")
        log(f"{what}: step {step}{bound}, loss {metrics['loss']:.4f}, {pace:.2f} s a step{left}")
    return on_step


def _trained_once(work: Path, what: str, log: Callable[[str], None], max_steps: int | None,
                  train: Callable[[Callable[[int, dict], None]], tuple[Path, str]]) -> Path:
    """The final weights of the model folder `work`: those found if its training finished already, else trained
    by `train(on_step)` (-> the weights, a line of final figures) while this process holds the folder
    (`_claimed`), logged with a line before, progress lines (`_progress`, up to `max_steps`) and one after."""
    with _claimed(work, what, log) as done:
        if done is not None:
            return done
        log(f"{what}: training into {work}")
        t0 = time.perf_counter()
        weights, figures = train(_progress(what, log, max_steps))
        log(f"{what}: {figures} ({time.perf_counter() - t0:.0f} s)")
        return weights


def train_detokenizer_once(config, root: Path, log: Callable[[str], None] = print, resources=None) -> Path:
    """The experiment's de-tokenizer (reconstruction on the world's targets), trained once under `root`.
    `resources`: the backbones' resources (role -> `ModelResource`; default: the config's)."""
    from music_dagster.model.procedural import WorldSettings, procedural_samples
    from music_dagster.training.train import train_detokenizer

    train = config.profile.train
    world = WorldSettings.from_config(config)
    decided = (config.profile.detokenizer, train.image_queries, train.procedural_samples, repr(world))
    work = root / f"detokenizer-{_key(config, ('music_vision', 'music_unet'), *decided)}"

    def train_it(on_step):
        result = train_detokenizer(config, [procedural_samples(train.procedural_samples, config.seed, world)], work,
                                   on_step=on_step, models=resources)
        return result.model_dir, f"{result.steps} steps, final loss {result.history[-1]['loss']:.4f}"

    return _trained_once(work, "de-tokenizer", log, config.profile.detokenizer.max_steps, train_it)


def train_music_once(config, ablation: str, root: Path, log: Callable[[str], None] = print,
                     resources=None) -> Path:
    """MUSIC trained on the world with `train.ablation = ablation`, once under `root` (`resources`: as
    `train_detokenizer_once`'s)."""
    from music_dagster.training.train import procedural_source, train_music

    cfg = config.with_values("train", ablation=ablation)
    work = root / f"music-{ablation}-{_key(cfg, ('music_llm', 'music_vision'), cfg.profile.train)}"

    def train_it(on_step):
        result = train_music(cfg, [procedural_source(cfg)], work, on_step=on_step, models=resources)
        final = result.history[-1]
        return result.model_dir, (f"{result.steps} steps on {result.samples} samples, final L1 {final['L1']:.4f} "
                                  f"L2 {final['L2']:.4f}")

    return _trained_once(work, f"MUSIC ({ablation})", log, cfg.profile.train.max_steps, train_it)


def train_select_clip_once(config, root: Path, log: Callable[[str], None] = print, resources=None) -> Path | None:
    """MUSIC*'s selection encoder for the world (the `selection` section): the `select_clip` role's CLIP trained
    contrastively (open_clip's `ClipLoss`, the other pairs of a batch as negatives) on the world's training pairs of
    target image and instruction, through the training loop, once under `root`. Its folder (open_clip's layout, as
    the role's own), or None when `selection.max_steps` is 0 (the role's CLIP as it is). The instructions name
    places and sizes, never colours, so it learns to judge where things are, as a CLIP judges an image against its
    prompt. `resources`: as `train_detokenizer_once`'s."""
    import torch
    from open_clip.loss import ClipLoss

    from music_dagster.model.procedural import WorldSettings, procedural_samples
    from music_dagster.model.runtime import load_model, with_models
    from music_dagster.storage import atomic_write_text
    from music_dagster.training.train import HISTORY, MODEL_DIR, make_accelerator, run_loop
    from music_dagster.zoo.loaders import save_open_clip

    section, train = config.profile.selection, config.profile.train
    if section.max_steps == 0:
        return None
    world = WorldSettings.from_config(config)
    work = root / f"select_clip-{_key(config, ('select_clip',), section, train.procedural_samples, repr(world))}"

    def train_it(on_step):
        accelerator = make_accelerator(config, "no")
        clip = load_model(config, "select_clip", resources)
        samples = procedural_samples(train.procedural_samples, config.seed, world)
        images = torch.stack([clip.preprocess(s.target) for s in samples])
        texts = clip.tokenizer([s.instruction for s in samples])
        loss = ClipLoss()

        def step(model, indices: list[int]) -> dict:  # the pairs stay on the host; a batch goes to the device
            batch = images[indices].to(accelerator.device), texts[indices].to(accelerator.device)
            image_features, text_features, scale = model(*batch)[:3]
            return {"loss": loss(image_features, text_features, scale)}

        model, history, *_ = run_loop(accelerator=accelerator, model=clip.model.float(), n_items=len(samples),
                                      cfg=section, seed=config.seed, out_dir=None, step_fn=step,
                                      metric_names=("loss",), on_step=on_step)
        save_open_clip(with_models(config, resources).profile.models["select_clip"], model, work / MODEL_DIR)
        atomic_write_text(work / HISTORY, json.dumps(history, sort_keys=True) + "\n")  # last: the folder is done
        return work / MODEL_DIR, f"{len(history)} steps, final loss {history[-1]['loss']:.4f}"

    return _trained_once(work, "MUSIC*'s CLIP", log, section.max_steps, train_it)


def trained_ablations(names: Sequence[str]) -> list[str]:
    """The `train.ablation`s of the MUSIC models the rows `names` need, each once, in table order."""
    return list(dict.fromkeys(ROWS[n].ablation for n in names if ROWS[n].trained and ROWS[n].ablation))


def _training_jobs(names: Sequence[str], config) -> list[tuple[str, str | None]]:
    """What the rows `names` need trained, as (model, MUSIC's `train.ablation`): the de-tokenizer, one MUSIC model
    per ablation, and MUSIC*'s CLIP when a row selects with it and `selection.max_steps` is above 0."""
    jobs = [("detokenizer", None), *(("music", a) for a in trained_ablations(names))]
    if any(ROWS[n].select == "clip" for n in names) and config.profile.selection.max_steps > 0:
        jobs.append(("select_clip", None))
    return jobs


def _job_name(job: tuple[str, str | None]) -> str:
    return {"detokenizer": "de-tokenizer", "select_clip": "MUSIC*'s CLIP"}.get(job[0], f"MUSIC ({job[1]})")


def _train_one(config, job: tuple[str, str | None], root: Path) -> Path:
    """One model the rows need (a `_training_jobs` entry), trained in this (worker) process."""
    import torch

    torch.set_num_threads(config.profile.torch_threads)
    model, ablation = job
    if model == "detokenizer":
        return train_detokenizer_once(config, root)
    if model == "select_clip":
        return train_select_clip_once(config, root)
    return train_music_once(config, ablation, root)


def _exit_with_parent(parent: int) -> None:
    """A training worker's initializer: the worker ends when the process that started it is gone (killed with
    kill -9, which no handler sees), so an orphan never trains on beside a re-run."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def train_concurrently(config, names: Sequence[str], root: str | os.PathLike, workers: int,
                       log: Callable[[str], None] = print) -> None:
    """Train the models the rows `names` need (`_training_jobs`: the de-tokenizer, one MUSIC model per ablation,
    MUSIC*'s CLIP) at once, one process each, at most `workers` at a time. They are independent, so on two cores
    the de-tokenizer trains beside MUSIC instead of before it; `load_models` then finds them trained. Each process
    trains exactly what it would alone (same seeds, same bytes). A failure, Ctrl-C or SIGTERM stops every worker,
    and a worker whose parent was killed stops within a second; each model resumes from its last checkpoint on the
    next run."""
    import multiprocessing

    jobs = _training_jobs(check_rows(names), config)
    log(f"training {len(jobs)} models, {min(workers, len(jobs))} at a time: " + ", ".join(map(_job_name, jobs)))
    t0 = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_exit_with_parent,
                                                     initargs=(os.getpid(),))
    try:
        pending = [(job, pool.apply_async(_train_one, (config, job, Path(root)))) for job in jobs]
        for job, result in pending:
            folder = result.get()
            log(f"{_job_name(job)}: trained in {folder.parent} "
                f"({time.perf_counter() - t0:.0f} s since the start)")
        pool.close()
    except BaseException:
        pool.terminate()  # the workers' training stops now, not after this process has gone
        raise
    finally:
        pool.join()


# ---------------------------------------------------------------------------------------------------------------
# Generation and scoring
def held_out_prompts(config, n: int) -> list:
    """`n` held-out world samples (never trained on): the prompts and their ground truth."""
    from music_dagster.model.procedural import WorldSettings, procedural_samples

    if n < 1:
        raise ExperimentError(f"the experiment needs at least one held-out prompt, got {n}")
    return procedural_samples(n, config.seed, WorldSettings.from_config(config), start=HELD_OUT_START)


def shuffled_references(prompts: Sequence) -> list:
    """Each subject gets the reference image of a subject of another prompt (the subject counts kept)."""
    from music_dagster.model.music import Sample

    refs = [r for p in prompts for r in p.references]
    longest = max(len(p.references) for p in prompts)
    order = np.roll(np.arange(len(refs)), longest + 1)  # a shift past any prompt's subjects: always another prompt
    out, k = [], 0
    for p in prompts:
        n = len(p.references)
        out.append(Sample(p.instruction, [refs[j] for j in order[k:k + n]], p.cot, p.layout, p.target, p.id, p.meta))
        k += n
    return out


def _score(prompt, image, plan, ablation: str | None) -> list[dict]:
    """Per-subject image and plan scores of one generated image, tagged with the sample and its subject count."""
    subjects = prompt.meta["subjects"]
    rows = score_image(image, prompt.layout, subjects)
    if plan is not None:
        writes_cot = ablation not in ("no_cot", "neither")
        writes_layout = ablation not in ("no_layout", "neither")
        for row, extra in zip(rows, score_plan(plan.cot, plan.layout, prompt.layout, subjects,
                                               writes_cot=writes_cot, writes_layout=writes_layout)):
            row.update({k: v for k, v in extra.items() if k != "subject"})
    for row in rows:
        row.update(sample=prompt.id, count=len(subjects))
    return rows


def _oracle_value(rows: list[dict]) -> float:
    return float(np.mean([r["placement"] + r["identity"] for r in rows]))


@dataclass
class Models:
    """What the rows generate with: the de-tokenizer, MUSIC models by ablation (and the untrained one), CLIP."""

    detokenizer: object
    music: dict
    vision: object  # the `music_vision` handle (the ground-truth visual tokens)
    clip: object | None = None


def generate_branches(model, detok, prompts: Sequence, branches: int, seed: int, gen_cfg) -> list[list[tuple]]:
    """For each prompt, `branches` (plan, image) pairs: plans decoded in batches (greedy for one branch, sampled
    for several), their visual tokens in one forward, one batched DDIM decode per chunk of prompts."""
    out = []
    for start in range(0, len(prompts), DECODE_CHUNK):
        raise_kept_interrupt()  # a stop kept in the step (`interrupts.interrupts_kept`) ends it between chunks
        chunk = prompts[start:start + DECODE_CHUNK]
        encoded = [model.encode(p, with_target=False) for p in chunk]
        plans = model.plan(chunk, branches=branches, sample=branches > 1, temperature=gen_cfg.temperature,
                           top_k=gen_cfg.top_k, max_new_tokens=gen_cfg.max_plan_tokens, seed=seed + start,
                           encoded=encoded)
        flat = [p for row in plans for p in row]
        tokens = model.image_tokens([p for p in chunk for _ in range(branches)], flat,
                                    encoded=[e for e in encoded for _ in range(branches)])
        images = detok.decode(tokens, seed=seed + start, steps=gen_cfg.decode_steps)
        for i in range(len(chunk)):
            out.append([(flat[i * branches + b], images[i * branches + b]) for b in range(branches)])
    return out


def run_rows(config, names: Sequence[str], models: Models, prompts: Sequence, examples: int = 4,
             log: Callable[[str], None] = print) -> dict[str, RowResult]:
    """Generate and score every row in `names` on `prompts` with loaded `models` (see `load_models`)."""
    import torch

    from music_dagster.model.music import target_tokens
    from music_dagster.model.runtime import flush_denormals
    from music_dagster.zoo.clip_similarity import image_text_scores

    gen_cfg = config.profile.generate
    results, star = {}, None
    with flush_denormals():
        for name in check_rows(names):
            row = ROWS[name]
            t0 = time.perf_counter()
            scored, shown = [], []
            if row.ablation is None:  # the de-tokenizer on the targets' own visual tokens
                images = []
                for start in range(0, len(prompts), DECODE_CHUNK):
                    raise_kept_interrupt()
                    chunk = prompts[start:start + DECODE_CHUNK]
                    tokens = target_tokens(models.vision.model, models.vision.processor, [p.target for p in chunk],
                                           config.profile.train.image_queries)
                    images += models.detokenizer.decode(tokens, seed=config.seed + start, steps=gen_cfg.decode_steps)
                picks = [(None, im) for im in images]
            else:
                model = models.music[row.ablation if row.trained else "untrained"]
                asked = shuffled_references(prompts) if row.shuffled else list(prompts)
                if row.select is not None:
                    if star is None:
                        star = generate_branches(model, models.detokenizer, asked, BRANCHES, config.seed, gen_cfg)
                    branches = star
                else:
                    branches = generate_branches(model, models.detokenizer, asked, 1, config.seed, gen_cfg)
                picks = []
                for prompt, options in zip(prompts, branches):
                    if row.select == "clip":
                        scores = image_text_scores(models.clip, [im for _, im in options], prompt.instruction,
                                                   dtype=torch.float32)
                        best = int(np.argmax(scores))
                    elif row.select == "oracle":
                        values = [_oracle_value(_score(prompt, im, plan, row.ablation)) for plan, im in options]
                        best = int(np.argmax(values))
                    else:
                        best = 0
                    picks.append(options[best])
            for i, (prompt, (plan, image)) in enumerate(zip(prompts, picks)):
                scored += _score(prompt, image, plan, row.ablation)
                if i < examples:
                    shown.append({"prompt": prompt, "plan": plan, "image": image})
            results[name] = RowResult(name, scored, summarise(scored), shown, time.perf_counter() - t0)
            overall = results[name].summary
            log(f"{name}: placement {overall['placement']['overall']['mean']:.3f} identity "
                f"{overall['identity']['overall']['mean']:.3f} ({results[name].seconds:.0f} s)")
    return results


def load_models(config, names: Sequence[str], root: Path, log: Callable[[str], None] = print,
                resources=None) -> Models:
    """Train (or find) and load every model the rows `names` need; `resources`: the backbones' and CLIP's
    resources (role -> `ModelResource`, what an asset received; default: the config's, `runtime.load_model`)."""
    import torch

    from music_dagster.config import ModelSpec
    from music_dagster.model.detokenizer import Detokenizer, load_vae
    from music_dagster.model.music import MusicModel, MusicSettings, target_tokens
    from music_dagster.model.runtime import device_of, load_model
    from music_dagster.training.train import procedural_source

    names = check_rows(names)
    torch.set_num_threads(config.profile.torch_threads)
    device = device_of(config)
    detok_cfg = config.profile.detokenizer
    vae = load_vae(detok_cfg.vae, device) if detok_cfg.vae is not None else None
    detok = Detokenizer.from_pretrained(train_detokenizer_once(config, root, log, resources), vae=vae,
                                        device=device)
    music = {}
    for ablation in trained_ablations(names):
        folder = train_music_once(config, ablation, root, log, resources)
        music[ablation] = MusicModel.from_pretrained(folder, load_model(config, "music_llm", resources),
                                                     load_model(config, "music_vision", resources))
    if "untrained" in names:
        torch.manual_seed(config.seed)
        cfg = config.with_values("train", ablation="none")
        untrained = MusicModel(load_model(cfg, "music_llm", resources), load_model(cfg, "music_vision", resources),
                               MusicSettings.from_config(cfg.profile.train, grid=cfg.profile.data.grid))
        targets = [s.target for s in procedural_source(cfg)[:cfg.profile.train.feature_stats_samples]]
        with torch.no_grad():
            untrained.set_feature_stats(target_tokens(untrained.vision, untrained.processor, targets,
                                                      cfg.profile.train.image_queries))
        music["untrained"] = untrained.eval()
    clip = None
    if any(ROWS[n].select == "clip" for n in names):
        trained = train_select_clip_once(config, root, log, resources)
        if trained is None:  # the role's CLIP as it is
            clip = load_model(config, "select_clip", resources)
        else:
            clip = load_model(config.with_models({"select_clip": ModelSpec(id=str(trained))}), "select_clip")
    return Models(detok, music, load_model(config, "music_vision", resources), clip)


# ---------------------------------------------------------------------------------------------------------------
# The table, the figure, the plot
def comparison(results: dict[str, RowResult]) -> dict:
    """The gaps of `GAPS` whose rows both ran: {"a-b/metric": paired gap with interval}."""
    out = {}
    for a, b, metric in GAPS:
        if a in results and b in results:
            out[f"{a}-{b}/{metric}"] = paired_gap(results[a].rows, results[b].rows, metric)
    return out


def results_json(config, results: dict[str, RowResult]) -> dict:
    """What `metrics/procedural.json` holds: every row's summary (each metric's mean, 95% interval and n, overall
    and per subject count), the gaps, and the settings that decide them."""
    train, detok = config.profile.train, config.profile.detokenizer
    held_out = len({r["sample"] for result in results.values() for r in result.rows})
    return {
        "profile": config.profile_name, "seed": config.seed, "held_out_prompts": held_out, "branches": BRANCHES,
        "world": {"samples": train.procedural_samples, "image_size": train.procedural_image_size,
                  "subjects": [train.procedural_min_subjects, train.procedural_max_subjects]},
        "steps": {"music": train.max_steps, "detokenizer": detok.max_steps},
        "rows": {name: {"metrics": r.summary} for name, r in results.items()},  # no wall times: same seed, same bytes
        "gaps": comparison(results),
    }


def table_markdown(results: dict[str, RowResult]) -> str:
    """The comparison table: one row per method, each metric as `mean [lo, hi]` (n in the last column)."""
    head = "| row | " + " | ".join(METRICS) + " | n (subjects) |\n|" + " --- |" * (len(METRICS) + 2) + "\n"
    lines = []
    for name, r in results.items():
        cells = []
        for metric in METRICS:
            s = r.summary.get(metric, {}).get("overall")
            cells.append("-" if s is None else f"{s['mean']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r.summary['placement']['overall']['n']} |")
    return head + "\n".join(lines) + "\n"


COMPARED_METRICS = ("placement", "identity")
SAME_ACROSS_RUNS = ("profile", "steps", "world", "branches")  # runs compared differ only in seed and machine
_MEAN = {"type": "object", "required": ["overall"],
         "properties": {"overall": {"type": "object", "required": ["mean"],
                                    "properties": {"mean": {"type": ["number", "null"]}}}}}
REPORT_SCHEMA = {  # what `compare_runs` reads of a `procedural.json`
    "type": "object", "required": ["seed", "rows", *SAME_ACROSS_RUNS],
    "properties": {"rows": {"type": "object", "required": ["full"], "additionalProperties": {
        "type": "object", "required": ["metrics"],
        "properties": {"metrics": {"type": "object", "additionalProperties": _MEAN}}}}},
}


def compare_runs(reports: Sequence[dict]) -> list[dict]:
    """Several runs of the experiment (their `procedural.json`: one world seed or machine each, every other setting
    the same) side by side: the full method's placement and identity, and each other row's gap to it, full - row
    (the mean of the paired differences, as every row scores the same subjects). Each is every run's value and
    `across_runs` over them; a row is compared where every run has it."""
    for key in SAME_ACROSS_RUNS:
        if any(r[key] != reports[0][key] for r in reports):
            values = " vs ".join(json.dumps(r[key], sort_keys=True) for r in reports)
            raise ExperimentError(f"the runs differ in {key} ({values}): compare runs of one setting")

    def means(row: str, metric: str) -> list[float | None]:
        return [r["rows"][row]["metrics"].get(metric, {}).get("overall", {}).get("mean") for r in reports]

    compared = []
    for row in ["full", *(r for r in ROWS if r != "full")]:
        if not all(row in r["rows"] for r in reports):
            continue
        for metric in COMPARED_METRICS:
            full, other = means("full", metric), means(row, metric)
            if None in full or None in other:
                continue
            values = full if row == "full" else [f - o for f, o in zip(full, other)]
            compared.append({"row": row, "metric": metric, "runs": values, **across_runs(values)})
    return compared


def compare_markdown(reports: Sequence[dict], compared: Sequence[dict]) -> str:
    """`compare_runs` as a table: one column per run (its seed), then the mean and 95% interval over runs."""
    runs = " | ".join(f"run {i}, seed {r['seed']}" for i, r in enumerate(reports, 1))
    head = f"| | {runs} | across runs |\n|" + " --- |" * (len(reports) + 2) + "\n"
    lines = []
    for c in compared:
        name = f"full {c['metric']}" if c["row"] == "full" else f"full - {c['row']} {c['metric']}"
        sign = "" if c["row"] == "full" else "+"  # a score, or a gap
        spread = f" [{c['lo']:{sign}.2f}, {c['hi']:{sign}.2f}]" if c["lo"] is not None else ""
        cells = [f"{v:{sign}.2f}" for v in c["runs"]] + [f"{c['mean']:{sign}.2f}{spread}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def figure(result: RowResult, size: int = 128) -> "Image.Image":
    """For each example prompt: the references, the generated image with the predicted layout over it, the
    generated image, the ground truth, and under them the instruction and the CoT."""
    from PIL import Image, ImageDraw, ImageFont

    from music_dagster.model.layout import render_overlay

    font = ImageFont.load_default(size=12)
    ref = size // 2
    text_lines = 4
    row_h = size + 16 + 14 * text_lines + 8
    width = 4 * ref + 8 + 3 * (size + 8) + 8
    sheet = Image.new("RGB", (width, 20 + row_h * len(result.examples)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"{result.name}: references | predicted layout | generated | ground truth", fill="black",
              font=font)
    for i, ex in enumerate(result.examples):
        y = 20 + i * row_h
        prompt, plan, image = ex["prompt"], ex["plan"], ex["image"]
        for k, r in enumerate(prompt.references):
            sheet.paste(r.convert("RGB").resize((ref, ref)), (4 + (k % 4) * ref, y + (k // 4) * ref))
            draw.text((6 + (k % 4) * ref, y + 2), f"[{k + 1}]", fill="black", font=font)
        x = 4 * ref + 12
        shown = image.convert("RGB").resize((size, size), Image.NEAREST)
        layout = plan.layout if plan is not None and plan.layout is not None else None
        overlay = render_overlay(shown, layout) if layout is not None else shown
        for k, (title, im) in enumerate((("layout", overlay), ("generated", shown),
                                         ("truth", prompt.target.convert("RGB").resize((size, size))))):
            sheet.paste(im, (x + k * (size + 8), y))
        lines = _wrap("instruction: " + prompt.instruction, 110)
        cot = plan.cot if plan is not None else "(no plan)"
        lines += _wrap("CoT: " + (cot or "(none)"), 110)
        for k, line in enumerate(lines[:text_lines]):
            draw.text((4, y + size + 12 + 14 * k), line, fill="black", font=font)
    return sheet


def plot(results: dict[str, RowResult]) -> "Image.Image":
    """Bar chart of placement and identity per row, with 95% intervals."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    names = list(results)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 3.2), dpi=80)
    for k, metric in enumerate(("placement", "identity")):
        means = [results[n].summary[metric]["overall"]["mean"] for n in names]
        lo = [m - results[n].summary[metric]["overall"]["lo"] for n, m in zip(names, means)]
        hi = [results[n].summary[metric]["overall"]["hi"] - m for n, m in zip(names, means)]
        ax.bar(np.arange(len(names)) + (k - 0.5) * 0.38, means, 0.38, yerr=[lo, hi], label=metric, capsize=2)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("procedural world: held-out prompts, 95% intervals", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


ROW_FILE, ROW_FIGURE, TABLE_FILE = "row.json", "examples.png", "procedural_table.md"


def save_row(result: RowResult, folder: str | os.PathLike) -> Path:
    """A row's per-subject scores, summary and wall time (`row.json`) and its example figure, into a new
    folder (staged, then renamed into place)."""
    from music_dagster.storage import png_bytes, staged_dir

    with staged_dir(folder) as tmp:
        data = {"name": result.name, "rows": result.rows, "summary": result.summary, "seconds": result.seconds}
        (tmp / ROW_FILE).write_text(json.dumps(data, sort_keys=True) + "\n")
        if result.examples:
            (tmp / ROW_FIGURE).write_bytes(png_bytes(figure(result)))
    return Path(folder)


def load_row(folder: str | os.PathLike) -> RowResult:
    """A row saved by `save_row` (without its examples)."""
    from music_dagster.storage import read_json

    data = read_json(Path(folder) / ROW_FILE, error=ExperimentError)
    return RowResult(data["name"], data["rows"], data["summary"], seconds=data["seconds"])


def write_outputs(config, results: dict[str, RowResult], folder: str | os.PathLike,
                  example_figure: "Image.Image | None" = None) -> dict[str, Path]:
    """`procedural.json`, the comparison table (markdown), the plot and the example figure (the full row's, or
    `example_figure`) into `folder`, each written atomically."""
    from music_dagster.storage import atomic_write_bytes, atomic_write_text, png_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"results": folder / RESULTS_FILE, "table": folder / TABLE_FILE, "plot": folder / PLOT_FILE,
             "figure": folder / FIGURE_FILE}
    atomic_write_text(paths["results"], json.dumps(results_json(config, results), indent=1,
                                                   sort_keys=True) + "\n")
    atomic_write_text(paths["table"], table_markdown(results))
    atomic_write_bytes(paths["plot"], png_bytes(plot(results)))
    if example_figure is None:
        shown = results.get("full") or next(iter(results.values()))
        example_figure = figure(shown) if shown.examples else None
    if example_figure is not None:
        atomic_write_bytes(paths["figure"], png_bytes(example_figure))
    else:
        del paths["figure"]
    return paths


# ---------------------------------------------------------------------------------------------------------------
# MLflow: one run per row, nested under one parent with the comparison
TAG_EXPERIMENT = "music.experiment"


def _summary_metrics(summary: dict) -> dict[str, float]:
    out = {}
    for metric, s in summary.items():
        o = s["overall"]
        out.update({metric: o["mean"], f"{metric}_lo": o["lo"], f"{metric}_hi": o["hi"], f"{metric}_n": o["n"]})
    return out


def log_row_run(store, config, result: RowResult, folder: Path, tags: dict | None = None) -> dict:
    """One MLflow run for a row: the config as params, overall scores as metrics (per subject count as steps),
    the row folder as artifacts. Returns the run reference."""
    from music_dagster.tracking import runs as tracking
    base = {tracking.TAG_KIND: "experiment", TAG_EXPERIMENT: "procedural", "row": result.name,
            "profile": config.profile_name, tracking.TAG_GIT_COMMIT: tracking.git_commit()}
    with tracking.start_run(store, f"procedural/{result.name}", {**base, **(tags or {})}) as run:
        run.log_params(tracking.config_params(config))
        run.log_metrics(_summary_metrics(result.summary))
        for metric, s in result.summary.items():
            for count, v in s["by_count"].items():
                run.log_step(int(count), {f"{metric}/by_subject_count": v["mean"]})
        run.log_artifacts(folder, "row")
        return run.reference()


def log_parent_run(store, config, results: dict[str, RowResult], files: dict[str, Path], children: Sequence[str],
                   tags: dict | None = None) -> dict:
    """The parent run: every row's overall scores (`<row>/<metric>`), the gaps, the table, plot, figure and
    results JSON; each row run in `children` is nested under it."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from music_dagster.tracking import runs as tracking
    base = {tracking.TAG_KIND: "experiment", TAG_EXPERIMENT: "procedural", "profile": config.profile_name,
            tracking.TAG_GIT_COMMIT: tracking.git_commit()}
    with tracking.start_run(store, "procedural experiment", {**base, **(tags or {})}) as run:
        metrics = {f"{name}/{k}": v for name, r in results.items() for k, v in _summary_metrics(r.summary).items()}
        for gap, value in comparison(results).items():
            metrics[f"gap/{gap}"] = value["mean"]
        run.log_metrics({k: v for k, v in metrics.items() if v is not None})
        for path in files.values():
            run.log_artifact(path)
        for child in children:
            run.client.set_tag(child, MLFLOW_PARENT_RUN_ID, run.run_id)
        return run.reference()


def run_experiment(config, names: Sequence[str], root: str | os.PathLike, held_out: int,
                   log: Callable[[str], None] = print, resources=None) -> dict[str, RowResult]:
    """Train what the rows need (once, under `root`), then generate and score each row on `held_out` prompts
    (`resources`: see `load_models`)."""
    names = check_rows(names)
    prompts = held_out_prompts(config, held_out)
    models = load_models(config, names, Path(root), log, resources)
    return run_rows(config, names, models, prompts, log=log)


# ---------------------------------------------------------------------------------------------------------------
# `music demo procedural`
DEMO_PROFILE = "procedural"
DEMO_ROLES = ("music_llm", "music_vision", "music_unet", "select_clip")


def run_demo(profile: str = DEMO_PROFILE, rows: Sequence[str] = DEMO_ROWS, held_out: int = 48,
             log: Callable[[str], None] = print) -> dict[str, Path]:
    """The experiment's rows on a profile (default: `procedural`, sized for a CPU), from a fresh clone: builds the
    tiny zoo roles it needs, trains (the models kept under `<paths.work>/experiment`, as the assets keep them),
    generates, scores, writes `metrics/procedural.json`, the table, the plot and the example figure, and logs the
    row runs nested under a parent run. Returns the written files."""
    import tempfile

    from music_dagster.config import load_config
    from music_dagster.model.runtime import work_dir
    from music_dagster.tracking.runs import store_from_config
    from music_dagster.zoo.tiny import default_root, ensure_zoo

    config = load_config(profile=profile)
    rows = check_rows(rows)
    if held_out < 1:
        raise ExperimentError(f"--held-out must be at least 1 (got {held_out})")
    zoo = default_root().resolve()
    local = [r for r in DEMO_ROLES if (p := config.models[r].local_path) is not None and p.resolve().parent == zoo]
    if local:
        ensure_zoo(seed=config.seed, roles=local)
    config.check_models(DEMO_ROLES)
    t0 = time.perf_counter()
    root = work_dir(config, WORK_FOLDER)
    # the cores this process may use (a container's limit on Linux); macOS has no affinity call
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    train_concurrently(config, rows, root, cores, log)
    results = run_experiment(config, rows, root, held_out, log)
    files = write_outputs(config, results, config.paths.resolve("metrics"))
    store = store_from_config(config)
    with tempfile.TemporaryDirectory() as tmp:  # each row's scores and examples, logged with its run
        children = [log_row_run(store, config, r, save_row(r, Path(tmp) / name))["run_id"]
                    for name, r in results.items()]
    parent = log_parent_run(store, config, results, files, children)
    log(table_markdown(results))
    log(f"wrote {', '.join(str(p) for p in files.values())} in {time.perf_counter() - t0:.0f} s; "
        f"MLflow parent run {parent['url']}")
    return files


def cli_compare(args) -> None:
    """`music demo compare FILE...`: several runs' `procedural.json` side by side, pooled over runs."""
    from music_dagster.storage import read_json

    if len(args.files) < 2:
        raise ExperimentError("compare needs at least two runs' procedural.json")
    reports = [read_json(path, REPORT_SCHEMA, ExperimentError) for path in args.files]
    print(compare_markdown(reports, compare_runs(reports)), end="")


def cli_demo(args) -> None:
    """`music demo procedural` (`--row all`: every row of the table)."""
    rows = args.rows or DEMO_ROWS
    run_demo(args.profile, list(ROWS) if ALL_ROWS in rows else rows, args.held_out)
