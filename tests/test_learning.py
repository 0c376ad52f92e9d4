"""MUSIC learns on the procedural world (tiny zoo backbones, CPU, fixed seed, budgeted in steps).

One training run, then held-out checks with the margins of the feasibility experiment
(`shared/notes/feasibility.md`, "Does a tiny SEED-X-style model learn"):
- f1 (CoT + layout): the mean L1 of the last steps is under a tenth of the first step's; predicted layouts parse;
  their subject-cell accuracy clearly beats the untrained model's;
- f2 (visual tokens): held-out L2 is under half the per-position-mean baseline;
- the model reads its references: with every subject given another sample's reference image, L2 is clearly worse
  and the colours named in the CoT (which only the references show) are wrong more often.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from music_dagster.config import load_config
from music_dagster.model.music import MusicModel, MusicSettings, Sample
from music_dagster.model.procedural import procedural_samples, score_plans
from music_dagster.model.runtime import load_model
from music_dagster.training.train import train_music

STEPS = 1000
TRAIN_SAMPLES = 1200
TEST_SAMPLES = 48


def _shuffled_references(samples):
    """Each subject gets a reference image of another sample (same subject count per sample)."""
    refs = [r for s in samples for r in s.references]
    order = np.roll(np.arange(len(refs)), 5)
    out, k = [], 0
    for s in samples:
        n = len(s.references)
        out.append(Sample(s.instruction, [refs[j] for j in order[k:k + n]], s.cot, s.layout, s.target, s.id, s.meta))
        k += n
    return out


def _held_out_l2(model, samples):
    losses = []
    with torch.no_grad():
        for i in range(0, len(samples), 8):
            batch = model.collate([model.encode(s) for s in samples[i:i + 8]])
            losses.append(model(batch)["L2"].item() * len(samples[i:i + 8]))
    return sum(losses) / len(samples)


@pytest.mark.slow
@pytest.mark.long
def test_music_learns_on_the_procedural_world(tiny_zoo, tmp_path):
    torch.set_num_threads(1)
    config = load_config(profile="tiny")
    config = config.with_values("train", max_steps=STEPS, epochs=10 ** 6, checkpoint_every=10 ** 6, max_plan_tokens=160)
    train = procedural_samples(TRAIN_SAMPLES, seed=config.seed)
    test = procedural_samples(TEST_SAMPLES, seed=config.seed, start=10 ** 6)

    torch.manual_seed(config.seed)
    untrained = MusicModel(load_model(config, "music_llm"), load_model(config, "music_vision"),
                           MusicSettings.from_config(config.profile.train))
    before = score_plans(test, [p[0] for p in untrained.plan(test)])
    del untrained

    result = train_music(config, [train], tmp_path / "run")
    l1 = [e["L1"] for e in result.history]
    assert len(l1) == STEPS
    assert np.mean(l1[-10:]) < 0.1 * l1[0], (l1[0], np.mean(l1[-10:]))

    model = MusicModel.from_pretrained(result.model_dir, load_model(config, "music_llm"),
                                       load_model(config, "music_vision"))
    with torch.no_grad():
        seen = torch.stack([model.standardise(model.encode(s)["target"]) for s in train[:256]])
        truth = torch.stack([model.standardise(model.encode(s)["target"]) for s in test])
    baseline = F.mse_loss(seen.mean(0, keepdim=True).expand_as(truth), truth).item()
    l2 = _held_out_l2(model, test)
    shuffled_l2 = _held_out_l2(model, _shuffled_references(test))
    after = score_plans(test, [p[0] for p in model.plan(test)])
    shuffled = score_plans(test, [p[0] for p in model.plan(_shuffled_references(test))])
    report = dict(baseline=baseline, l2=l2, shuffled_l2=shuffled_l2, before=before, after=after, shuffled=shuffled)
    print(report)  # the figures behind the margins (pytest -s)

    assert after["parsed"] >= 0.8, report
    assert after["subject_cell_acc"] > before["subject_cell_acc"] + 0.15, report
    assert l2 < 0.5 * baseline, report
    assert shuffled_l2 > l2 + 0.1, report
    assert shuffled["colour_acc"] < after["colour_acc"] - 0.08, report
