"""The Dagster UI in a real browser: every asset of the code location is in the asset graph, one asset
materialized from its page succeeds, and the shard regeneration shows as an automation that is off."""
import re

import pytest

from ui_helpers import runs, wait_new_run

pytestmark = pytest.mark.e2e

# Unpartitioned, no upstream assets, and cheap when the zoo is already built (same seed -> same bytes).
UI_ASSET = "tiny_model_zoo"
NODE_NAME = '[class*="AssetNode_assetName"]'


def expected_assets() -> set[str]:
    from music_dagster.definitions import defs

    return {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}


def open_asset_graph(page, url: str):
    """The global asset lineage with every group expanded; returns the locator of the asset nodes' names."""
    from playwright.sync_api import expect

    page.goto(f"{url}/asset-groups")
    expect(page.get_by_text("Global asset lineage", exact=True)).to_be_visible()
    names = page.locator(NODE_NAME)
    # With several groups the graph starts with them collapsed ("10 assets"): its context menu expands them all.
    expect(names.or_(page.get_by_text(re.compile(r"^\d+ assets? "))).first).to_be_visible()
    page.mouse.click(1200, 300, button="right")
    expect(page.get_by_role("menuitem").first).to_be_visible()
    expand = page.get_by_role("menuitem", name=re.compile("Expand all groups"))
    if expand.count():
        expand.click()
    else:
        page.keyboard.press("Escape")
    return names


def test_asset_graph_lists_every_asset_and_materializes_one(page, dagster_server, output_dir):
    from playwright.sync_api import expect

    expected = expected_assets()
    assert UI_ASSET in expected

    names = open_asset_graph(page, dagster_server.url)
    expect(names).to_have_count(len(expected))
    assert {n.strip() for n in names.all_inner_texts()} == expected
    page.screenshot(path=output_dir / "dagster_asset_graph.png")

    known = {r["runId"] for r in runs(dagster_server)}
    page.goto(f"{dagster_server.url}/assets/{UI_ASSET}")
    page.get_by_role("button", name=re.compile(r"Materialize$")).click()  # the name includes its icon's label
    run = wait_new_run(dagster_server, known)
    assert run["status"] == "SUCCESS", f"run {run['runId']} ended {run['status']}:\n{dagster_server.log_tail()}"
    assert run["assetSelection"] == [{"path": [UI_ASSET]}]

    # The UI agrees: the run's page says Success, and the asset's events list that run's materialization.
    page.goto(f"{dagster_server.url}/runs/{run['runId']}")
    expect(page.get_by_text("Success", exact=True).first).to_be_visible()
    page.screenshot(path=output_dir / "dagster_run.png")
    page.goto(f"{dagster_server.url}/assets/{UI_ASSET}?view=events")
    expect(page.get_by_role("link", name=run["runId"][:8]).first).to_be_visible()
    page.screenshot(path=output_dir / "dagster_asset_events.png")


def test_shard_regeneration_is_listed_off_with_a_switch(page, dagster_server, output_dir):
    from playwright.sync_api import expect

    page.goto(f"{dagster_server.url}/automation")
    link = page.locator('a[href$="/sensors/shard_regeneration"]')
    expect(link).to_be_visible()
    page.screenshot(path=output_dir / "dagster_automation.png")
    link.click()
    expect(page.get_by_text("shard_regeneration").first).to_be_visible()
    switch = page.get_by_role("checkbox")
    expect(switch).to_have_count(1)
    expect(switch).not_to_be_checked()  # STOPPED by default; the switch turns it on
    expect(switch).to_be_enabled()
    page.screenshot(path=output_dir / "dagster_sensor.png")
