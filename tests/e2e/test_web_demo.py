"""`music demo web` in a real browser, on a tiny checkpoint trained here: two DreamBench subjects generate a plan
and an image; a layout painted cell by cell into the page's grid, then one cell of it changed, redraws with that
plan; a text file, 13 subjects and an empty prompt each show their one-line error in the page."""
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


def _grid(page, which: str = "#grid") -> list[list[int]]:
    """A coloured grid's subject ids, row by row: `#grid` (the plan drawn) or `#layout-preview` (the table's)."""
    cells = page.locator(f"{which} td")
    ids = [int(v) for v in cells.evaluate_all("cells => cells.map(c => c.dataset.id)")]
    side = int(len(ids) ** 0.5)
    return [ids[r * side:(r + 1) * side] for r in range(side)]


def _set_cell(page, row: int, col: int, value):
    """Edit one cell of the layout table as a user does: double-click it, type the id, Enter."""
    from playwright.sync_api import expect

    cell = page.locator(f'#layout [data-testid="cell-{row}-{col}"]')
    cell.dblclick()
    page.locator('#layout textarea[aria-label="Edit cell"]').fill(str(value))
    page.keyboard.press("Enter")
    expect(cell).to_contain_text(str(value))


def _previewed(page, row: int, col: int, value: int):
    """The preview's cell (row, col) once it shows `value` (the preview follows each edit of the table)."""
    return page.locator(f"#layout-preview td[data-row='{row}'][data-col='{col}'][data-id='{value}']")


def _paint(page, layout: list[list[int]]):
    """Edit the table's cells until it holds `layout` (only the cells that differ), and wait for its preview."""
    from playwright.sync_api import expect

    cells = page.locator("#layout [data-testid^='cell-']")
    texts = cells.evaluate_all("cells => cells.map(c => [c.dataset.row, c.dataset.col, c.innerText.trim()])")
    shown = {(int(r), int(c)): text for r, c, text in texts}
    edited = [(r, c) for (r, c), text in sorted(shown.items()) if text != str(layout[r][c])]
    for r, c in edited:
        _set_cell(page, r, c, layout[r][c])
    r, c = edited[-1]
    expect(_previewed(page, r, c, layout[r][c])).to_be_visible()
    assert _grid(page, "#layout-preview") == layout


def _redraw(page, done):
    """Redraw with the page's plan and wait until the locator `done` is visible (what the redraw shows)."""
    from playwright.sync_api import expect

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

    # A plan of our own painted into the grid (the dog on a 2x2 block at the top left, the cat at the bottom
    # right), then the same plan with one cell reassigned.
    grid = checkpoint["grid"]
    layout = [[0] * grid for _ in range(grid)]
    for r, c in ((0, 0), (0, 1), (1, 0), (1, 1)):
        layout[r][c], layout[grid - 1 - r][grid - 1 - c] = 1, 2
    page.locator("#cot textarea").fill("the dog on the left, the cat on the right")
    _paint(page, layout)
    _redraw(page, page.locator("#status", has_text="(plan: given)"))
    assert _grid(page) == layout
    layout[0][0] = 2
    _set_cell(page, 0, 0, 2)
    expect(_previewed(page, 0, 0, 2)).to_be_visible()
    _redraw(page, page.locator("#grid td[data-row='0'][data-col='0'][data-id='2']"))
    assert _grid(page) == layout, "the redrawn plan is the edited one"
    expect(page.locator("#status")).to_contain_text("(plan: given)")
    assert page.locator("#cot textarea").input_value() == "the dog on the left, the cat on the right"
    expect(page.locator("#chosen img")).to_be_visible()
    _set_cell(page, 0, 0, 3)  # no third subject: the preview and the redraw say so, the drawn plan stays shown
    expect(page.locator("#layout-preview")).to_contain_text("Error: layout: cell (row 0, column 0) holds id 3")
    _redraw(page, page.locator("#status", has_text="Error: layout: cell (row 0, column 0) holds id 3"))
    assert _grid(page)[0][0] == 2
    _set_cell(page, 0, 0, "x")  # not an id at all
    expect(page.locator("#layout-preview")).to_contain_text("Error: layout: cell (row 0, column 0) holds 'x', "
                                                            "not a subject id")
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
