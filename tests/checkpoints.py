"""A tiny trained MUSIC checkpoint for the tests that generate with one (generation, evaluation, the web demo)."""
from pathlib import Path

import yaml

from music_dagster.config import PARAMS_FILE

# Two steps of each model on 8 procedural samples, short plans (a random tiny LLM rambles otherwise).
QUICK_TRAINING = {
    "train": {"source": "procedural", "procedural_samples": 8, "max_steps": 2, "batch_size": 4, "max_plan_tokens": 24},
    "detokenizer": {"max_steps": 2, "batch_size": 4, "decode_steps": 2},
    "generate": {"max_plan_tokens": 24},
}


def write_params(path: Path, models: Path, **sections) -> Path:
    """The project's params.yaml with `paths.models` elsewhere and tiny-profile sections updated."""
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["profile"] = "tiny"
    raw["paths"]["models"] = str(models)
    for name, values in sections.items():
        raw["profiles"]["tiny"][name] = {**(raw["profiles"]["tiny"].get(name) or {}), **values}
    path.write_text(yaml.safe_dump(raw))
    return path


def train_checkpoint(config, work: Path, detokenizer: Path | None = None) -> list:
    """Train the de-tokenizer and MUSIC on `config`'s procedural source (work folders under `work`) and publish
    them where `config` reads them (`runtime.detokenizer_dir`, `runtime.lora_dir`); the samples trained on.
    `detokenizer`: a trained de-tokenizer folder to copy instead of training one (MUSIC alone is trained, e.g. with
    another `train.ablation`)."""
    import shutil

    import torch

    from music_dagster.model import runtime
    from music_dagster.training.train import procedural_source, train_detokenizer, train_music

    torch.set_num_threads(1)
    samples = procedural_source(config)
    runtime.lora_dir(config).parent.mkdir(parents=True)
    if detokenizer is None:
        detok = train_detokenizer(config, [samples], work / "work_detok", resume=False)
        detok.model_dir.rename(runtime.detokenizer_dir(config))
    else:
        shutil.copytree(detokenizer, runtime.detokenizer_dir(config))
    lora = train_music(config, [samples], work / "work_lora", resume=False)
    lora.model_dir.rename(runtime.lora_dir(config))
    return samples
