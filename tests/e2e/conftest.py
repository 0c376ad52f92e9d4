"""Browser-test fixtures: headless Debian chromium driven by Playwright for Python (never `playwright install`:
`scripts/install_test_tools.sh` installs chromium), and the live servers of `ui_helpers`. Screenshots and server logs
land in `outputs/e2e/` (gitignored) and are kept."""
import os
from pathlib import Path

import pytest

from music_dagster.config import PROJECT_ROOT
from ui_helpers import start_dagster, start_mlflow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
OUTPUT_DIR = PROJECT_ROOT / "outputs" / "e2e"
UI_TIMEOUT_MS = 60_000  # the machine is shared: the UIs can be slow to answer


def _unavailable(reason: str):
    """Skip locally; in CI (the `CI` variable set) the browser tests must run, so fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser tests: run scripts/install_test_tools.sh)", pytrace=False)
    pytest.skip(f"{reason}: run scripts/install_test_tools.sh to enable the browser tests")


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    if not CHROMIUM.is_file():
        _unavailable(f"{CHROMIUM} not found")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    return CHROMIUM


@pytest.fixture(scope="session")
def gradio_installed() -> None:
    """The web demo's browser test needs the `demo` extra (CI installs it: `make demo-setup`)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        _unavailable("gradio is not installed (make demo-setup)")


@pytest.fixture
def page(chromium_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)  # expect() has its own 5 s default
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR


@pytest.fixture
def dagster_server(tmp_path, output_dir):
    """The project's code location served by `dagster dev` with a fresh instance home."""
    server = start_dagster(tmp_path, output_dir / "dagster_dev.log", PROJECT_ROOT / "workspace.yaml", PROJECT_ROOT)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(tmp_path, output_dir):
    """`mlflow server` on an empty temporary SQLite store (`server.store`)."""
    store = tmp_path / "mlflow"
    store.mkdir()
    server = start_mlflow(store, output_dir / "mlflow_server.log")
    server.store = store
    try:
        yield server
    finally:
        server.stop()
