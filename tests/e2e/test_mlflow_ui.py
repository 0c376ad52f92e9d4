"""The MLflow UI in a real browser: a training run made by materializing `lora_checkpoint` (tiny budget, procedural
data) shows in the experiment's runs table with its params, losses and checkpoint hash."""
import re

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture
def training_run(tmp_path, mlflow_server, tiny_zoo, make_project):
    """Materialize `lora_checkpoint` for 3 steps on the procedural world, tracked in the server's store; returns
    (experiment id, MLflow run)."""
    import dagster as dg
    import torch

    from music_dagster.assets import training
    from music_dagster.resources import build_resources
    from music_dagster.tracking import runs as tracking

    torch.set_num_threads(1)
    project = make_project(
        tmp_path, paths={"models": tmp_path / "models", "datasets": tmp_path / "datasets", "work": tmp_path / "work",
                         "mlflow_tracking_uri": f"sqlite:///{mlflow_server.store / 'mlruns.db'}",
                         "mlflow_artifacts": mlflow_server.store / "artifacts"},
        train=dict(source="procedural", procedural_samples=4, max_steps=3, batch_size=2, max_plan_tokens=16),
        generate=dict(logged_samples=0))
    config = project.get()
    result = dg.materialize([training.detokenizer, training.lora_checkpoint], selection=[training.lora_checkpoint],
                            resources=build_resources(project))
    assert result.success
    run_id = result.asset_materializations_for_node("lora_checkpoint")[0].metadata["mlflow_run_id"].value
    store = tracking.store_from_config(config)
    return tracking.client(store).get_experiment_by_name(store.experiment).experiment_id, \
        tracking.client(store).get_run(run_id)


def test_mlflow_ui_shows_the_training_run(page, mlflow_server, training_run, output_dir):
    from playwright.sync_api import expect

    experiment_id, run = training_run
    assert run.data.tags["dvc.md5"]  # the checkpoint's DVC hash is on the run
    # MLflow 3 shows an onboarding popover ("Got it") whenever it likes: dismiss it before each action.
    page.add_locator_handler(page.get_by_role("button", name="Got it"), lambda loc: loc.click())
    # networkidle never comes (the UI polls): wait for "load", then for the content.
    page.goto(f"{mlflow_server.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning",
              wait_until="load")
    link = page.get_by_role("link", name=run.info.run_name, exact=True)
    expect(link).to_be_visible()
    assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if assistant.count():  # the assistant side panel covers the table in screenshots
        assistant.click()
    page.screenshot(path=output_dir / "mlflow_runs.png")

    link.click()
    expect(page).to_have_url(re.compile(f"/runs/{run.info.run_id}"))
    expect(page.get_by_role("cell", name="profile.train.lr", exact=True)).to_be_visible()
    expect(page.get_by_role("cell", name=run.data.params["profile.train.lr"], exact=True).first).to_be_visible()
    for metric in ("L1", "L2", "loss"):
        expect(page.get_by_role("cell", name=metric, exact=True).first).to_be_visible()
    expect(page.get_by_text(run.data.tags["dvc.md5"]).first).to_be_visible()
    page.screenshot(path=output_dir / "mlflow_run.png", full_page=True)

    page.get_by_role("tab", name=re.compile("Model metrics")).click()
    expect(page.get_by_text("L1", exact=True).first).to_be_visible()
    page.screenshot(path=output_dir / "mlflow_metrics.png")
