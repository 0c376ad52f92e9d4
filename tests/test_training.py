"""The training loops: resuming gives the same losses as not stopping, MSIC is never trained on, the saved folders,
the de-tokenizer's targets (each image once, held only for its step); the hooks the GPU check trains with (the loop
without checkpoints, a given VAE)."""
import gc
import json
import signal
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from music_dagster.config import load_config
from music_dagster.model.detokenizer import Detokenizer
from music_dagster.model.music import MusicModel
from music_dagster.model.procedural import procedural_samples, write_procedural_shard
from music_dagster.model.runtime import flush_denormals, load_model
from music_dagster.synthesis.decimation import decimate
from music_dagster.training.train import (CHECKPOINTS, GROUPED_BATCHES, MODEL_DIR, TrainingError, collect_samples,
                                          collect_targets, epoch_order, train_detokenizer, train_music)
from signals import Interrupted, handlers_restored, signal_inside_a_weakref_callback


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def config(tiny_zoo):
    torch.set_num_threads(1)
    cfg = load_config(profile="tiny")
    cfg = cfg.with_values("train", input_queries=4, image_queries=4, lora_rank=4, lora_alpha=8, batch_size=2,
                epochs=3, max_steps=6, checkpoint_every=2, checkpoints_kept=2, warmup_steps=2, max_plan_tokens=8)
    return cfg.with_values("detokenizer", resampler_queries=4, batch_size=2, epochs=3, max_steps=6, checkpoint_every=2,
                 warmup_steps=2)


@pytest.fixture(scope="module")
def samples():
    return procedural_samples(5, seed=0)  # 2 steps per epoch at batch 2 (the odd one is dropped per epoch)


def _stop_after(step):
    def on_step(s, metrics):
        if s == step:
            raise Stop
    return on_step


@pytest.mark.parametrize("grouped,schedule,ema", [(False, "constant", 0.0), (True, "constant", 0.0),
                                                  (False, "linear", 0.0), (False, "constant", 0.5)],
                         ids=["random-batches", "grouped-by-length", "lr-falling-linearly", "moving-average"])
def test_music_resumes_with_the_losses_of_an_uninterrupted_run(config, samples, tmp_path, grouped, schedule, ema):
    config = config.with_values("train", group_by_length=grouped, lr_schedule=schedule, ema_decay=ema)
    seen = []
    whole = train_music(config, [samples], tmp_path / "whole", on_step=lambda s, m: seen.append((s, m)))
    assert whole.steps == 6 and whole.resumed_from == 0 and whole.epochs == 3
    assert [s for s, _ in seen] == list(range(1, 7))
    assert set(seen[0][1]) == {"L1", "L2", "loss", "lr"}
    assert [e["step"] for e in whole.history] == list(range(1, 7))
    # the rate each step used: 2 warmup steps rising to lr, then lr (constant) or falling to 0 after the 6th step
    lr, ramp = config.profile.train.lr, [1 / 3, 2 / 3, 1, 1, 1, 1]
    falling = [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6] if schedule == "linear" else [1] * 6
    assert [e["lr"] for e in whole.history] == pytest.approx([lr * r * f for r, f in zip(ramp, falling)])

    with pytest.raises(Stop):  # killed during step 5: the last checkpoint is step 4
        train_music(config, [samples], tmp_path / "cut", on_step=_stop_after(5))
    assert sorted(p.name for p in (tmp_path / "cut" / CHECKPOINTS).iterdir()) == ["checkpoint-2", "checkpoint-4"]
    resumed = train_music(config, [samples], tmp_path / "cut")
    assert resumed.resumed_from == 4 and resumed.steps == 6
    assert resumed.history == whole.history
    # same config and seed, same bytes
    for name in ("adapter_model.safetensors", "adapter_config.json", "music_modules.safetensors",
                 "music_config.json"):
        assert (whole.model_dir / name).read_bytes() == (resumed.model_dir / name).read_bytes(), name
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [e["step"] for e in history] == list(range(1, 7))
    # the published weights: the last step's (kept by the last checkpoint), or with `ema_decay` their average
    trained = tmp_path / "whole" / CHECKPOINTS / "checkpoint-6" / MODEL_DIR / "music_modules.safetensors"
    assert (trained.read_bytes() == (whole.model_dir / "music_modules.safetensors").read_bytes()) == (not ema)


def test_an_epoch_without_lengths_is_the_seeded_permutation_it_always_was():
    assert epoch_order(3, 2, 50, 4).tolist() == np.random.default_rng([3, 2]).permutation(50).tolist()


def test_an_epoch_grouped_by_length_batches_items_of_about_one_length():
    lengths = np.random.default_rng(0).integers(180, 290, size=2 * GROUPED_BATCHES * 8 + 5).tolist()
    n, batch = len(lengths), 8
    order = epoch_order(0, 0, n, batch, lengths)
    assert sorted(order.tolist()) == list(range(n))  # every item once
    assert order.tolist() == epoch_order(0, 0, n, batch, lengths).tolist() != epoch_order(0, 1, n, batch, lengths).tolist()

    def padding(order):  # padded tokens over real tokens of the epoch's full batches
        batches = np.asarray(lengths)[order[:n // batch * batch]].reshape(-1, batch)
        return (batches.max(1) * batch).sum() / batches.sum()
    assert padding(order) < 1.01 < 1.1 < padding(epoch_order(0, 0, n, batch))
    # the batches' order is shuffled (not longest first), and the short remainder stays last, where it is dropped
    firsts = [lengths[i] for i in order[:GROUPED_BATCHES * batch:batch]]
    assert firsts != sorted(firsts, reverse=True)
    assert set(order[-5:].tolist()) == set(epoch_order(0, 0, n, batch)[-5:].tolist())


def test_grouped_training_collates_samples_of_neighbouring_lengths(config, tmp_path, monkeypatch):
    samples = procedural_samples(4, seed=1, decimated=True)  # 2-4 subjects each, decimated: many lengths
    batches, ranked = [], []
    collate = MusicModel.collate

    def spy(self, encoded, *args, **kwargs):
        if not ranked:  # every sample's length, from the model's own tokens
            ranked.extend(sorted((len(self.tokens(s)["ids"]) for s in samples), reverse=True))
        batches.append(sorted((len(e["ids"]) for e in encoded), reverse=True))
        return collate(self, encoded, *args, **kwargs)
    monkeypatch.setattr(MusicModel, "collate", spy)
    train_music(config.with_values("train", group_by_length=True), [samples], tmp_path)
    assert len(batches) == 6 and len(set(ranked)) > 3
    # an epoch is shorter than GROUPED_BATCHES batches: it is sorted whole, longest first, and cut in twos
    pairs = [ranked[k:k + 2] for k in range(0, len(ranked) - 1, 2)]
    assert all(b in pairs for b in batches)


def denormals_flushed() -> bool:
    return torch.tensor([1e-40]).mul(1.0).item() == 0.0


def test_denormals_are_flushed_only_while_training(config, samples, tmp_path):
    # The flag is process-wide processor state: left on, it changes float semantics for the rest of the process.
    flushed = []

    def on_step(step, metrics):
        flushed.append(denormals_flushed())
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        train_music(config, [samples], tmp_path / "run", on_step=on_step)
    assert flushed == [True, True]
    assert not denormals_flushed()
    with flush_denormals():
        assert denormals_flushed()
    assert not denormals_flushed()


def test_checkpoints_hold_only_trainable_weights_and_the_result_loads(config, samples, tmp_path):
    result = train_music(config, [samples], tmp_path / "run")
    folders = sorted((tmp_path / "run" / CHECKPOINTS).iterdir())
    assert [p.name for p in folders] == ["checkpoint-4", "checkpoint-6"]  # every 2 steps and the last; kept: 2
    for folder in folders:
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert "model/adapter_model.safetensors" in files and "model/music_modules.safetensors" in files
        assert not any(f.startswith("model.") or f.startswith("pytorch_model") for f in files)
        llm_bytes = sum(p.stat().st_size for p in (config.models["music_llm"].local_path).glob("*.safetensors"))
        assert (folder / "model" / "adapter_model.safetensors").stat().st_size < llm_bytes
    again = train_music(config, [samples], tmp_path / "run")  # a finished run resumes at its end: no steps
    assert (again.resumed_from, again.steps, again.history) == (6, 6, result.history)
    model = MusicModel.from_pretrained(result.model_dir, load_model(config, "music_llm"),
                                       load_model(config, "music_vision"))
    assert model.settings.image_queries == 4
    assert len(model.plan(samples[:1])[0][0].token_ids) <= 8


def test_one_process_trains_each_run_at_its_own_mixed_precision(config, samples, tmp_path):
    """accelerate keeps one mixed precision per process; a run at another (the experiment's selection CLIP at "no"
    after MUSIC at the full profile's bf16) still trains at its own. Here bf16 is CPU autocast."""
    bf16 = train_music(config.with_values("train", mixed_precision="bf16", max_steps=2), [samples], tmp_path / "bf16")
    plain = train_music(config.with_values("train", max_steps=2), [samples], tmp_path / "plain")
    assert bf16.steps == plain.steps == 2 and all(np.isfinite(e["loss"]) for e in bf16.history)
    assert [e["loss"] for e in bf16.history] != [e["loss"] for e in plain.history]  # autocast was on, then off


@pytest.mark.parametrize("mixed_precision,modules_to_save", [("bf16", ()), ("no", ("embed_tokens", "lm_head"))],
                         ids=["full-profile", "trained-embeddings-without-autocast"])
def test_bf16_backbones_train_in_float32_and_generate(config, samples, tmp_path, monkeypatch, mixed_precision,
                                                      modules_to_save):
    """Backbones loaded in bf16 (the loader keeps them float32 on a CPU; made bf16 here), as the full profile loads
    them on a GPU: its own settings (no full trainable copies, `modules_to_save: []`, bf16 autocast), and the tiny
    LLM's trained embeddings without autocast. Every trained weight is float32; then a plan, its visual tokens and
    an image decoded from them."""
    from music_dagster.zoo import loaders

    full = load_config(profile="full").profile
    assert (full.dtype, tuple(full.train.modules_to_save), full.train.mixed_precision) == ("bfloat16", (), "bf16")
    monkeypatch.setattr(loaders, "resolve_dtype", lambda dtype, device: getattr(torch, dtype))
    bf16 = config.model_copy(update={"profile": config.profile.model_copy(update={"dtype": "bfloat16"})})
    bf16 = bf16.with_values("train", mixed_precision=mixed_precision, max_steps=2, modules_to_save=modules_to_save)
    bf16 = bf16.with_values("detokenizer", mixed_precision=mixed_precision, max_steps=2)
    music = train_music(bf16, [samples], tmp_path / "music")
    detokenizer = train_detokenizer(bf16, [samples], tmp_path / "detokenizer")
    for result in (music, detokenizer):
        assert result.steps == 2 and all(np.isfinite(e["loss"]) for e in result.history)
    llm = load_model(bf16, "music_llm")
    assert llm.model.dtype == torch.bfloat16
    model = MusicModel.from_pretrained(music.model_dir, llm, load_model(bf16, "music_vision"))
    saved = load_file(music.model_dir / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert any("lm_head" in name for name in saved) == bool(modules_to_save)
    assert model.llm_dtype == torch.bfloat16
    plans = model.plan(samples[:2])
    tokens = model.image_tokens(samples[:2], [row[0] for row in plans])
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    images = Detokenizer.from_pretrained(detokenizer.model_dir).decode(tokens, seed=0, steps=2)
    assert all(np.asarray(image).std() > 0 for image in images)  # NaN pixels would come out as one flat value


def test_msic_samples_are_never_trained_on(config, tmp_path):
    root = tmp_path / "datasets" / "training_samples"
    train = write_procedural_shard(root / "shard-0", 4, seed=0)
    held = write_procedural_shard(root / "shard-1", 3, seed=0, start=4, split="msic")
    seen = []
    cfg = config.with_values("train", max_steps=1)
    orig = MusicModel.encode

    def spy(self, sample, with_target=True, **kwargs):
        seen.append(sample.id)
        return orig(self, sample, with_target, **kwargs)

    MusicModel.encode = spy
    try:
        result = train_music(cfg, [train, held], tmp_path / "run")
    finally:
        MusicModel.encode = orig
    assert (result.samples, result.skipped_msic) == (4, 3)
    assert seen and all(int(s.rsplit("-", 1)[1]) < 4 for s in seen)
    with pytest.raises(TrainingError, match="no training samples .skipped 3 MSIC"):
        train_music(cfg, [held], tmp_path / "none")
    assert not (tmp_path / "none" / "model").exists()


def test_detokenizer_resumes_and_loads(config, samples, tmp_path):
    whole = train_detokenizer(config, [samples], tmp_path / "whole")
    with pytest.raises(Stop):
        train_detokenizer(config, [samples], tmp_path / "cut", on_step=_stop_after(3))
    resumed = train_detokenizer(config, [samples], tmp_path / "cut")
    assert resumed.resumed_from == 2
    assert resumed.history == whole.history
    for name in ("detokenizer_modules.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        assert (whole.model_dir / name).read_bytes() == (resumed.model_dir / name).read_bytes(), name
    detok = Detokenizer.from_pretrained(whole.model_dir)
    images = detok.decode(torch.zeros(2, 4, 64), seed=0, steps=2)
    assert [im.size for im in images] == [(32, 32)] * 2


def _decimated_shard(path, n):
    """A procedural shard of `n` world images whose records are decimated down to 1 subject, as the data assets'
    `training_samples` write them: several records per target image file."""
    write_procedural_shard(path, n, seed=0)
    manifest = path / "manifest.jsonl"
    records = []
    for record in map(json.loads, manifest.read_text().splitlines()):
        for item in decimate(record, min_subjects=1):
            k = len(item["subjects"])
            records.append({**item, "sample_id": f"{record['sample_id']}-n{k:02d}", "num_subjects": k})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_detokenizer_trains_on_each_target_image_once_per_epoch(config, tmp_path, monkeypatch):
    import music_dagster.images as images

    shard = _decimated_shard(tmp_path / "datasets" / "training_samples" / "shard-0", 4)
    assert len(collect_samples([shard])[0]) > 4 and len(collect_targets([shard])[0]) == 4
    in_memory = procedural_samples(4, seed=0, decimated=True)
    targets = collect_targets([in_memory])[0]
    assert len(in_memory) > 4 and len(targets) == 4
    assert [t().tobytes() for t in targets] == [s.target.tobytes() for s in procedural_samples(4, seed=0)]

    reads = []
    read = images.read_image
    monkeypatch.setattr(images, "read_image", lambda p: reads.append(p.parent.name) or read(p))
    result = train_detokenizer(config, [shard], tmp_path / "run")  # batch 2: 2 steps per epoch, 3 epochs
    assert result.samples == 4 and result.steps == 6
    # only the target is read (no reference), at each use: each of the 4 images twice per 2 steps, once per epoch
    for epoch in range(3):
        assert sorted(reads[4 * epoch:4 * epoch + 4]) == [f"procedural-0-{i:06d}" for i in range(4)], reads


def test_detokenizer_training_holds_no_more_targets_with_more_samples(config, tmp_path, monkeypatch):
    """Host memory does not grow with the data set: at most one batch of target images is alive at once, and no
    target's pixels outlive its step (before: every sample's pixels stayed for the whole run)."""
    import music_dagster.images as images

    side = json.loads((config.models["music_unet"].local_path / "config.json").read_text())["sample_size"]
    read = images.read_image
    for n in (4, 12):
        alive, most_alive, pixels_after_step = [0], [], []

        def counted(path):
            image = read(path)
            alive[0] += 1
            weakref.finalize(image, lambda: alive.__setitem__(0, alive[0] - 1))
            most_alive.append(alive[0])
            return image

        def on_step(step, metrics):
            gc.collect()
            pixels_after_step.append(sum(torch.is_tensor(o) and tuple(o.shape) == (3, side, side)
                                         for o in gc.get_objects()))

        monkeypatch.setattr(images, "read_image", counted)
        shard = _decimated_shard(tmp_path / f"datasets-{n}" / "training_samples" / "shard-0", n)
        cfg = config.with_values("detokenizer", max_steps=None, epochs=1)
        result = train_detokenizer(cfg, [shard], tmp_path / f"run-{n}", on_step=on_step)
        assert result.steps == n // 2 and len(most_alive) == n
        assert max(most_alive) <= 2 and pixels_after_step == [0] * (n // 2), (most_alive, pixels_after_step)


def test_the_loop_without_an_out_dir_trains_as_the_trainer_and_writes_nothing(config, samples, tmp_path,
                                                                                monkeypatch):
    """`scripts/gpu_full_size_check.py`'s way to train: the trainer's own accelerator, step and loop with
    `out_dir=None` give `train_detokenizer`'s losses, and no checkpoint is written anywhere."""
    from music_dagster.training.train import (DETOKENIZER_METRICS, build_detokenizer, detokenizer_step,
                                              make_accelerator, run_loop)

    trained = train_detokenizer(config, [samples], tmp_path / "run")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    section = config.profile.detokenizer
    targets, _ = collect_targets([samples])
    accelerator = make_accelerator(config, section.mixed_precision)  # seeded before the models, as the trainer
    vision = load_model(config, "music_vision")
    detok = build_detokenizer(config, vision=vision)
    step = detokenizer_step(detok, vision, lambda i: targets[i](), config.profile.train.image_queries)
    with flush_denormals():
        _, history, steps, *_ = run_loop(accelerator=accelerator, model=detok, n_items=len(targets), cfg=section,
                                         seed=config.seed, out_dir=None, step_fn=step,
                                         metric_names=DETOKENIZER_METRICS)
    assert steps == 6 and history == trained.history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "run"] and not any((tmp_path / "cwd").iterdir())


def test_build_detokenizer_uses_a_given_vae_instead_of_loading_one(config, monkeypatch):
    from diffusers import AutoencoderKL

    import music_dagster.model.detokenizer as detokenizer
    from music_dagster.config import ModelSpec
    from music_dagster.training.train import build_detokenizer

    def no_download(spec, device="cpu", dtype=None):
        raise AssertionError(f"load_vae({spec.id})")

    monkeypatch.setattr(detokenizer, "load_vae", no_download)
    cfg = config.with_values("detokenizer", vae=ModelSpec(id="nowhere/vae"))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8)
    assert build_detokenizer(cfg, vae=vae).vae is vae
    with pytest.raises(AssertionError, match="load_vae.nowhere/vae"):  # without one: the configured VAE
        build_detokenizer(cfg)


def test_an_interrupt_dropped_inside_a_callback_stops_the_training_at_its_next_step(config, samples, tmp_path,
                                                                                     raising_handlers):
    """A SIGTERM whose exception is raised inside a weakref callback (SQLAlchemy's, while models load) is lost to
    Python; kept by `interrupts_kept`, it stops the training before its next step, and nothing is kept after."""
    from music_dagster.interrupts import interrupts_kept, raise_kept_interrupt

    signal_inside_a_weakref_callback(signal.SIGTERM)  # alone: dropped, and this test goes on
    steps = []

    def on_step(step: int, metrics: dict) -> None:
        steps.append(step)
        if step == 2:
            signal_inside_a_weakref_callback(signal.SIGTERM)

    with interrupts_kept(), pytest.raises(Interrupted, match="SIGTERM"):
        train_detokenizer(config, [samples], tmp_path / "run", on_step=on_step)
    assert steps == [1, 2]
    assert handlers_restored()
    raise_kept_interrupt()  # nothing left to raise once the context has ended
