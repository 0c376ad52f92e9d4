"""`music demo web` in a real browser, on a tiny checkpoint trained here: two DreamBench subjects generate a plan
and an image; a layout typed into the page, then one cell of it changed, redraws with that plan; a text file, 13
subjects and an empty prompt each show their one-line error in the page."""
import sys

import pytest

from checkpoints import QUICK_TRAINING, train_checkpoint
from music_dagster.config import PROJECT_ROOT
from projects import project_env
from ui_helpers import Server, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DREAMBENCH = PROJECT_ROOT / "data" / "dreambench"
SUBJECTS = [DREAMBENCH / "dog" / "00.jpg", DREAMBENCH / "cat" / "01.jpg"]
GENERATE_TIMEOUT_MS = 300_000  # a generation on a shared 2-core machine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_zoo, make_project):
    """A de-tokenizer and a LoRA checkpoint trained for two steps on the procedural world (as `music generate`'s
    tests train one), and the project config that points at them."""
    from music_dagster.model.runtime import lora_dir

    root = tmp_path_factory.mktemp("webdemo")
    project = make_project(root, paths={"models": root / "models"}, **QUICK_TRAINING)
    config = project.get()
    train_checkpoint(config, root)
    return {"project": project, "lora": lora_dir(config), "grid": config.profile.data.grid}


@pytest.fixture(scope="module")
def web_demo(checkpoint, gradio_installed, tmp_path_factory, output_dir):
    """`music demo web --checkpoint ...` on 127.0.0.1 and a free port (one server, models loaded once, for the
    module's tests; each opens a fresh page), with gradio's uploads in a temporary folder."""
    tmp_path = tmp_path_factory.mktemp("webdemo_server")
    port = free_port()
    env = project_env(checkpoint["project"], GRADIO_TEMP_DIR=str(tmp_path / "gradio"), GRADIO_ANALYTICS_ENABLED="False")
    cmd = [sys.executable, "-m", "music_dagster.cli", "demo", "web", "--port", str(port),
           "--checkpoint", str(checkpoint["lora"])]
    server = Server("music demo web", cmd, f"http://127.0.0.1:{port}", output_dir / "web_demo.log", env, tmp_path)
    try:
        server.wait_http("/", timeout_s=600)
        yield server
    finally:
        server.stop()


def _upload(page, paths):
    from playwright.sync_api import expect

    page.locator("#subjects input[type=file]").set_input_files([str(p) for p in paths])
    expect(page.locator("#subjects tbody tr")).to_have_count(len(paths))  # one row per uploaded file


def _grid(page) -> list[list[int]]:
    """The coloured grid's subject ids, row by row."""
    cells = page.locator("#grid td")
    ids = [int(v) for v in cells.evaluate_all("cells => cells.map(c => c.dataset.id)")]
    side = int(len(ids) ** 0.5)
    return [ids[r * side:(r + 1) * side] for r in range(side)]


def _redraw(page, layout: list[list[int]], done):
    """Type `layout` into the page, redraw, and wait until the locator `done` is visible (what the redraw shows)."""
    from playwright.sync_api import expect

    page.locator("#layout textarea").fill("\n".join(" ".join(map(str, row)) for row in layout))
    page.locator("#redraw").click()
    expect(done).to_be_visible(timeout=GENERATE_TIMEOUT_MS)


def test_generate_then_edit_one_cell_and_redraw(page, web_demo, checkpoint, output_dir):
    from playwright.sync_api import expect

    page.goto(web_demo.url)
    _upload(page, SUBJECTS)
    page.locator("#prompt textarea").fill("the dog [1] sits next to the cat [2]")
    page.locator("#generate").click()
    expect(page.locator("#status")).to_contain_text("of 2 kept (plan: model)", timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#chosen img")).to_be_visible()
    expect(page.locator("#branches-gallery img")).to_have_count(2)
    assert page.locator("#cot textarea").input_value().strip(), "the model's CoT is shown"

    # A plan of our own (subject 1 on the left half, 2 on the right), then the same plan with one cell changed.
    grid = checkpoint["grid"]
    layout = [[1 if c < grid // 2 else 2 for c in range(grid)] for _ in range(grid)]
    page.locator("#cot textarea").fill("the dog on the left, the cat on the right")
    _redraw(page, layout, page.locator("#status", has_text="(plan: given)"))
    assert _grid(page) == layout
    layout[0][0] = 2
    _redraw(page, layout, page.locator("#grid td[data-row='0'][data-col='0'][data-id='2']"))
    assert _grid(page) == layout, "the redrawn plan is the edited one"
    expect(page.locator("#status")).to_contain_text("(plan: given)")
    assert page.locator("#cot textarea").input_value() == "the dog on the left, the cat on the right"
    expect(page.locator("#chosen img")).to_be_visible()
    layout[0][0] = 3  # no third subject: refused in the page, the drawn plan stays shown
    _redraw(page, layout, page.locator("#status", has_text="Error: layout: cell (row 0, column 0) holds id 3"))
    assert _grid(page)[0][0] == 2
    page.screenshot(path=str(output_dir / "web_demo_redraw.png"), full_page=True)


def test_bad_requests_show_a_message_not_a_traceback(page, web_demo, tmp_path):
    from playwright.sync_api import expect

    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    cases = [([SUBJECTS[0], text], "a dog", "notes.txt: not an image"),
             (SUBJECTS * 6 + [SUBJECTS[0]], "a dog", "13 subjects given; at most 12"),
             (SUBJECTS, "", "the prompt is empty")]
    for paths, prompt, message in cases:
        page.goto(web_demo.url)
        _upload(page, paths)
        page.locator("#prompt textarea").fill(prompt)
        page.locator("#generate").click()
        expect(page.locator("#status")).to_contain_text("Error: ", timeout=GENERATE_TIMEOUT_MS)
        expect(page.locator("#status")).to_contain_text(message)
        assert "Traceback" not in page.content()
        expect(page.locator("#chosen img")).to_have_count(0)
