"""One process of a multi-process training: `python -m music_dagster.training.entry <lora|detokenizer> <work dir>
[--procedural] [--model ROLE=SPEC ...] [shard folder ...]`, started `train.num_processes` times by
`accelerate launch`. The config is the process's (`MUSIC_PARAMS`, which the asset sets from its `project`
resource); `--model` names the checkpoint of each backbone (a `ModelSpec` as JSON: what the asset's model
resources load), so every rank loads what the asset was given.

The training assets start it through Dagster Pipes (`dg.PipesSubprocessClient`; `dagster_k8s.PipesK8sClient` is
the same on a cluster). Rank 0 opens the Pipes session: its log lines and per-step losses reach the asset's log as
they happen, and the `TrainResult` comes back as the reported materialization's metadata. The other ranks, and the
processes of other machines (which run the same command without Pipes), only train. Publishing, MLflow and DVC stay
in the asset's step after this process ends: nothing here writes outside the work folder.

The sources are named on the command line, not read from Pipes, so every machine can run the same command.
"""
import argparse
import json
import os
import sys
from pathlib import Path

TRAINERS = {"lora": "train_music", "detokenizer": "train_detokenizer"}
BACKBONES = {"lora": ("music_llm", "music_vision"), "detokenizer": ("music_vision", "music_unet")}


def free_port() -> int:
    """A TCP port nobody listens on now (the launch's rendezvous on one machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _section(config, model: str) -> tuple[str, object]:
    name = "train" if model == "lora" else "detokenizer"
    return name, getattr(config.profile, name)


def _accelerate_config(name: str, section) -> Path:
    from music_dagster.config import PROJECT_ROOT
    from music_dagster.training.train import TrainingError

    path = PROJECT_ROOT / section.accelerate_config
    if not path.is_file():
        raise TrainingError(f"{name}.accelerate_config: {path}: no such file")
    return path


def local_processes(config, model: str) -> int:
    """How many processes of `model`'s training run on this machine, one device each: `num_processes`, shared out
    over the `num_machines` of its `accelerate_config`."""
    import yaml

    from music_dagster.training.train import TrainingError

    name, section = _section(config, model)
    if section.accelerate_config is None:
        return section.num_processes
    path = _accelerate_config(name, section)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TrainingError(f"{name}.accelerate_config: {path}: not YAML ({str(error).splitlines()[0]})") from None
    machines = raw.get("num_machines", 1) if isinstance(raw, dict) else None
    if not isinstance(machines, int) or isinstance(machines, bool) or machines < 1:
        raise TrainingError(f"{name}.accelerate_config: {path}: expected an accelerate config with num_machines >= 1")
    return max(1, section.num_processes // machines)


def launch_command(config, model: str, work: Path, shards: list[Path], procedural: bool) -> list[str]:
    """`accelerate launch` of this module over the `num_processes` of `model`'s config section: one machine, or
    the machines, ranks and rendezvous address of `accelerate_config` (relative to the project root)."""
    name, section = _section(config, model)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(section.num_processes),
              "--mixed_precision", section.mixed_precision, "--dynamo_backend", "no"]
    if section.accelerate_config is not None:
        launch += ["--config_file", str(_accelerate_config(name, section))]
    else:
        launch += ["--num_machines", "1"]
        if section.num_processes > 1:  # torchrun on this machine; on CPUs Accelerator(cpu=True) makes gloo ranks
            launch += ["--multi_gpu", "--main_process_port", str(free_port())]
    specs = [f"{role}={json.dumps(config.models[role].model_dump(mode='json'), sort_keys=True)}"
             for role in BACKBONES[model]]
    entry = ["-m", "music_dagster.training.entry", model, str(work), *(["--procedural"] if procedural else []),
             *(arg for spec in specs for arg in ("--model", spec)), *map(str, shards)]
    return launch + entry


def result_metadata(result) -> dict:
    """The `TrainResult` fields the asset rebuilds its result from (the history is read from the work folder)."""
    return {"steps": result.steps, "epochs": float(result.epochs), "samples": result.samples,
            "skipped_msic": result.skipped_msic, "resumed_from": result.resumed_from,
            "seconds": float(result.seconds)}


def config_of(specs: list[str]):
    """The process's config with the `--model ROLE=SPEC` checkpoints."""
    from music_dagster.config import ModelSpec, default_config

    models = {}
    for spec in specs:
        role, _, value = spec.partition("=")
        models[role] = ModelSpec.model_validate(json.loads(value))
    return default_config().with_models(models)


def train(model: str, work: Path, sources: list, pipes=None, config=None):
    """Run the trainer of `model` in this process (one rank of the launch); `pipes`: rank 0's Pipes context."""
    from music_dagster.config import default_config
    from music_dagster.interrupts import interrupts_kept
    from music_dagster.training import train as training

    config = config or default_config()

    def on_step(step: int, metrics: dict) -> None:  # only rank 0 calls it (training._run)
        pipes.log.info(f"{model} step {step}: " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items())))

    fn = getattr(training, TRAINERS[model])
    with interrupts_kept():
        return fn(config, sources, work, resume=True, on_step=on_step if pipes is not None else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m music_dagster.training.entry")
    parser.add_argument("model_name", metavar="model", choices=sorted(TRAINERS))
    parser.add_argument("work", type=Path)
    parser.add_argument("--procedural", action="store_true", help="also train on the config's procedural world")
    parser.add_argument("--model", action="append", default=[], metavar="ROLE=SPEC",
                        help="a backbone's checkpoint, a ModelSpec as JSON (default: the config's)")
    parser.add_argument("shards", nargs="*", help="training_samples shard folders")
    args = parser.parse_intermixed_args(argv)  # shard folders after the options (parse_args would refuse them)

    from music_dagster.errors import UserError

    sources: list = [Path(s) for s in args.shards]
    try:
        config = config_of(args.model)
        if args.procedural:
            from music_dagster.training.train import procedural_source

            sources.append(procedural_source(config))
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun's global rank: only rank 0 talks to Dagster
            train(args.model_name, args.work, sources, config=config)
            return 0
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

        if not PipesEnvVarParamsLoader().is_dagster_pipes_process():  # rank 0 started by hand, not by an asset
            train(args.model_name, args.work, sources, config=config)
            return 0
        with open_dagster_pipes() as pipes:
            result = train(args.model_name, args.work, sources, pipes, config=config)
            pipes.report_asset_materialization(metadata=result_metadata(result))
    except UserError as error:
        print(f"music: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
