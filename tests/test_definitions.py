"""The code location: loads fast (no heavy imports), validates, and holds the whole asset graph."""
import subprocess
import sys

import dagster as dg

from music_dagster.config import PROJECT_ROOT
from music_dagster.synthesis.stages import STAGE_NAMES as DATA_ASSETS


def test_loading_definitions_leaves_heavy_libraries_unimported():
    code = (
        "import sys, music_dagster.definitions as d; d.defs.resolve_asset_graph();"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'open_clip', 'mlflow', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    assert out.stdout.strip() == "[]"


def test_dagster_definitions_validate():
    dagster = PROJECT_ROOT / ".venv" / "bin" / "dagster"
    out = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        capture_output=True, text=True, cwd=PROJECT_ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_asset_and_job_is_defined():
    from music_dagster.definitions import defs

    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    expected = {"tiny_model_zoo", *DATA_ASSETS, "detokenizer", "lora_checkpoint", "dreambench_scores", "msic_scores"}
    assert expected <= keys
    for job in ("zoo_job", "data_job", "training_job", "evaluation_job"):
        assert defs.resolve_job_def(job).name == job


def test_evaluation_lineage_reaches_both_checkpoints():
    """What evaluation generates with: the LoRA checkpoint and the de-tokenizer (as `dvc.yaml`'s evaluate stage)."""
    from music_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    for asset in ("dreambench_scores", "msic_scores"):
        parents = {k.to_user_string() for k in graph.get(dg.AssetKey(asset)).parent_keys}
        assert {"lora_checkpoint", "detokenizer"} <= parents, asset
    assert "training_samples" in {k.to_user_string() for k in graph.get(dg.AssetKey("msic_scores")).parent_keys}
