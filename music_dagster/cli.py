"""The `music` command. Each subcommand imports its library lazily so `music --help` stays fast.

Bad input exits with code 2 and one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys


def _zoo(args):
    from music_dagster.zoo.tiny import build_zoo

    build_zoo(seed=args.seed, roles=args.role or None,
              progress=lambda r, e: print(f"{r}: {e['class']}, {e['parameters']:,} parameters", flush=True))


def _generate(args):
    from music_dagster.model.generate import cli_generate

    cli_generate(args)


def _pipeline(args):
    from music_dagster.pipeline import run_pipeline

    run_pipeline(num_shards=args.shards, force=args.force)


def _stage(args):
    from music_dagster.pipeline import run_stage

    run_stage(args.name)


def _data_dreambench(args):
    from music_dagster.tracking.dvc import DREAMBENCH_REV, import_dreambench

    print(f"DreamBench imported into {import_dreambench(args.out, args.rev or DREAMBENCH_REV)}")


def _demo(args):
    from music_dagster.experiment.procedural import cli_demo

    cli_demo(args)


def _demo_compare(args):
    from music_dagster.experiment.procedural import cli_compare

    cli_compare(args)


def _demo_web(args):
    from music_dagster.webdemo import cli_demo_web

    cli_demo_web(args)


def _runs(args):
    from music_dagster.tracking.runs import print_runs

    print_runs(limit=args.limit)


def _doctor(args):
    from music_dagster.doctor import run_doctor

    return run_doctor(fix=args.fix)


def _check(args):
    from music_dagster.zoo.dryrun import run_check

    return run_check(args.profile)


def _bench(args):
    import importlib

    importlib.import_module(f"music_dagster.bench.{args.what}").main()


def build_parser() -> argparse.ArgumentParser:
    from music_dagster.config import MAX_SUBJECTS

    parser = argparse.ArgumentParser(prog="music", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="MLflow's INFO lines on the console too")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="the tiny model zoo under models/tiny/")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="build every tiny role (random weights, offline tokenizers)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--role", action="append", help="only this role (repeatable)")
    build.set_defaults(func=_zoo)

    pipeline = sub.add_parser("pipeline", help="the main job: every asset on the configured profile")
    pipeline.add_argument("--shards", type=int, help="data shards to materialize (default: data.num_shards)")
    pipeline.add_argument("--force", action="store_true",
                          help="re-run every data shard, up to date or not (after a code change: a shard is "
                               "skipped when it is published with the current settings)")
    pipeline.set_defaults(func=_pipeline)

    gen = sub.add_parser("generate", help="generate one image from reference subjects and an instruction")
    gen.add_argument("--subject", action="append", default=[], metavar="IMG", help=f"a reference image (repeat, 1..{MAX_SUBJECTS})")
    gen.add_argument("--prompt", required=True, help="the instruction; refer to subjects by id tag, e.g. 'put [1] next to [2]'")
    gen.add_argument("--branches", type=int, default=1, help="test-time scaling: N plans, best CLIP-T kept (MUSIC*)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", help="LoRA checkpoint folder (default: the latest under models/)")
    plan = gen.add_mutually_exclusive_group()
    plan.add_argument("--plan", metavar="JSON", help="draw this plan (a plan.json: its cot and layout) instead of "
                      "the model's; branches then differ only in the image stage's sampling")
    plan.add_argument("--layout", metavar="JSON", help="draw this layout (a JSON 8x8 grid of subject ids, 0 = "
                      "background); the model writes the CoT")
    gen.add_argument("--out", required=True, help="output folder (must not exist)")
    gen.set_defaults(func=_generate)

    stage = sub.add_parser("stage", help="materialize the assets of one dvc.yaml stage (what `dvc repro` runs)")
    stage.add_argument("name", help="a stage of dvc.yaml (an unknown name lists them)")
    stage.set_defaults(func=_stage)

    data = sub.add_parser("data", help="public data sets the full profile reads")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dreambench = data_sub.add_parser("dreambench", help="import the whole DreamBench with DVC (needs network access)")
    dreambench.add_argument("--out", default="datasets/dreambench", help="folder inside the project (eval.dreambench)")
    dreambench.add_argument("--rev", default=None, help="a google/dreambooth commit (default: the pinned one)")
    dreambench.set_defaults(func=_data_dreambench)

    demo = sub.add_parser("demo", help="show the method working: the procedural experiment on a CPU profile")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    procedural = demo_sub.add_parser("procedural", help="train, generate for held-out prompts, score pixels "
                                     "against ground truth; writes metrics/procedural.json and a figure")
    procedural.add_argument("--profile", default="procedural", help="params.yaml profile (default: procedural)")
    procedural.add_argument("--row", dest="rows", action="append", metavar="ROW",
                            help="a row of the table (repeatable; `all`: every row; default: the rows that need "
                            "only the full model)")
    procedural.add_argument("--held-out", type=int, default=48, help="held-out prompts (default 48)")
    procedural.set_defaults(func=_demo)
    compare = demo_sub.add_parser("compare", help="several runs' metrics/procedural.json (world seeds, machines) "
                                  "side by side: the full method and each row's gap to it, with a 95%% interval "
                                  "over runs")
    compare.add_argument("files", nargs="+", metavar="FILE", help="a run's procedural.json")
    compare.set_defaults(func=_demo_compare)
    web = demo_sub.add_parser("web", help="a Gradio page on 127.0.0.1: upload subjects, read, edit and redraw "
                              "the plan (needs the demo extra: make demo-web)")
    web.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default 7860)")
    web.add_argument("--checkpoint", help="LoRA checkpoint folder (default: the latest under models/); the "
                     "de-tokenizer is read from beside it, else the project's")
    web.set_defaults(func=_demo_web)

    runs = sub.add_parser("runs", help="the latest MLflow runs with key params, losses, scores and checkpoint hash")
    runs.add_argument("--limit", type=int, default=10)
    runs.set_defaults(func=_runs)

    doctor = sub.add_parser("doctor", help="one line per problem found (stale runs, held pool slots, the MLflow "
                                           "store, ...); exit 1 when there is any")
    doctor.add_argument("--fix", action="store_true", help="also repair what can be (release stale runs)")
    doctor.set_defaults(func=_doctor)

    check = sub.add_parser("check", help="build every role of a profile without weights (meta device), compare "
                                         "parameter counts with the published sizes, estimate training memory")
    check.add_argument("profile", choices=["full"], help="the profile to check at full size")
    check.set_defaults(func=_check)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench.add_argument("what", choices=["zoo", "location", "data", "train", "generate", "metrics", "parallel",
                                               "orchestration"])
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from music_dagster.console import quiet_third_party
    from music_dagster.errors import UserError
    from music_dagster.interrupts import interrupts_kept

    args = build_parser().parse_args(argv)
    quiet_third_party(verbose=args.verbose)
    # SIGTERM ends a command as Ctrl-C does (a run it executes is marked canceled), not by killing it outright.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with interrupts_kept():
            return args.func(args) or 0  # a subcommand returns an exit code only when it has one of its own
    except UserError as e:
        print(f"music: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"music: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
