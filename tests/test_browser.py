"""The draw-a-digit page in a real browser: Debian's headless Chromium, driven by
Playwright, draws a 1 and a 7 with mouse strokes on the served page and reads the answer.

A model trained on synthetic patches cannot read drawn digits, so this trains a small
real one first: the fast preset, 2 epochs on 5,400 MNIST training images (97.8% test
accuracy, about 10 s of training on 2 cores).
DRAW_A_DIGIT_SCREENSHOT=docs/draw-a-digit.png keeps the last screenshot (the README's).
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import params, prepare, train
from stages.common import write_json
from stages.export import float32_copy
from stages.models import save_model
from stages.train import train_model
from tests.conftest import (
    HAVE_MNIST,
    MNIST_INFO,
    ROOT,
    export_onnx,
    mnist_arrays,
    served,
    write_params,
)
from tools.paths import dvc_var

# Debian's package (Playwright's own browser download needs the internet); CI may name
# another Chromium-based browser in $CHROMIUM.
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
IN_CI = bool(os.environ.get("REQUIRE_MNIST_MIRROR"))
pytestmark = [
    pytest.mark.slow,
    # Keras' ONNX export probes np.object; NumPy's warning about it is Keras' to fix.
    pytest.mark.filterwarnings("ignore:In the future `np.object`:FutureWarning"),
    pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present"),
    pytest.mark.skipif(
        not CHROMIUM.exists() and not IN_CI,
        reason=f"no {CHROMIUM}: `apt-get install chromium` (.ci/run does), or set $CHROMIUM",
    ),
]
TRAIN_IMAGES = 6000
# Strokes in canvas pixels (the canvas is 280x280), each a polyline drawn with the button down.
STROKES = {
    "1": [[(150, 45), (138, 235)]],
    "7": [[(75, 62), (205, 58), (125, 238)]],
}


def git(cwd, *args):
    command = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project directory as `dvc repro` leaves it: dvc.yaml, the model and its ONNX
    export at their default paths, and the evaluate stage's metrics.json, committed to git."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "dvc.yaml", root)
    # The fast preset: 97.8% after 2 epochs on these images, in 10 s here.
    write_params(
        root / "params.yaml",
        train__model="fast",
        train__epochs=2,
        train__batch_size=128,
        train__learning_rate=0.015,
    )
    data = prepare.prepare(*mnist_arrays(), TRAIN_IMAGES, 0.1)
    model = train_model(data, params.load(train.Params, root / "params.yaml"), verbose=0)
    save_model(model, root / dvc_var("model", root / "dvc.yaml"), {"dataset": MNIST_INFO})
    # The export stage's ONNX file, which the server prefers (as after `dvc repro`).
    onnx = root / dvc_var("exported", root / "dvc.yaml") / "model.onnx"
    onnx.parent.mkdir(parents=True)
    export_onnx(float32_copy(model), onnx)
    probs = model.predict(data["x_test"], batch_size=1000, verbose=0)
    accuracy = float(np.mean(probs.argmax(axis=1) == data["y_test"]))
    write_json(
        root / dvc_var("evaluation", root / "dvc.yaml") / "metrics.json", {"accuracy": accuracy}
    )
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    return root, git(root, "rev-parse", "--short", "HEAD").strip(), accuracy


@pytest.fixture(scope="module")
def server(project):
    with served(cwd=project[0]) as (_, url):  # the default model
        yield url


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 820, "height": 500})
        browser.close()


def draw(page, strokes):
    box = page.locator("#canvas").bounding_box()
    for stroke in strokes:
        (x, y), rest = stroke[0], stroke[1:]
        page.mouse.move(box["x"] + x, box["y"] + y)
        page.mouse.down()
        for x, y in rest:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=20)
        page.mouse.up()


def shows(page, digit):
    """Waits for the page to show `digit`, big and as the highest bar."""
    from playwright.sync_api import expect

    expect(page.locator("#digit")).to_have_text(digit, timeout=20_000)
    page.wait_for_timeout(500)  # let the last throttled request come back
    expect(page.locator("#digit")).to_have_text(digit)
    expect(page.locator(".col.top .label")).to_have_text(digit)


def test_the_page_reads_a_drawn_1_and_7(server, project, page, tmp_path):
    _, revision, accuracy = project
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server)
    assert page.locator("#revision").inner_text() == revision
    assert page.locator("#accuracy").inner_text() == f"{100 * accuracy:.2f}%"
    assert page.locator("#model").inner_text() == "onnx data/export/model.onnx"

    draw(page, STROKES["1"])
    shows(page, "1")
    page.screenshot(path=tmp_path / "one.png")

    page.click("#clear")
    page.wait_for_timeout(300)
    assert page.locator("#digit").inner_text() == "–"
    assert page.locator(".col.top").count() == 0

    draw(page, STROKES["7"])
    shows(page, "7")
    page.screenshot(path=tmp_path / "seven.png")
    assert (tmp_path / "seven.png").stat().st_size > 10_000

    # An upload: MNIST's third test image (a 1), scanned black on white, in place of the canvas.
    _, _, images, labels = mnist_arrays()
    assert labels[2] == 1
    Image.fromarray(255 - images[2]).resize((112, 112)).save(tmp_path / "scan.png")
    page.set_input_files("#upload", tmp_path / "scan.png")
    shows(page, "1")
    assert page.locator("#preview").is_visible() and not page.locator("#canvas").is_visible()
    page.click("#clear")
    assert page.locator("#canvas").is_visible() and not page.locator("#preview").is_visible()

    # Works offline: everything the page loaded came from the server itself.
    # (The upload's preview is a blob: URL of the page's own origin.)
    assert requested and all(url.removeprefix("blob:").startswith(server) for url in requested)
    keep = os.environ.get("DRAW_A_DIGIT_SCREENSHOT")
    if keep:
        shutil.copy(tmp_path / "seven.png", ROOT / keep)


def test_a_blank_canvas_shows_the_servers_message(server, page):
    from playwright.sync_api import expect

    page.goto(server)
    page.evaluate("send()")  # what a stroke triggers, here on the untouched black canvas
    expect(page.locator("#status")).to_have_text("no digit found")
    assert page.locator("#digit").inner_text() == "–"


def canvas_png(page):
    """The canvas as the page sends it to /predict: its PNG bytes."""
    script = """new Promise((done) => canvas.toBlob(async (blob) =>
        done(Array.from(new Uint8Array(await blob.arrayBuffer()))), "image/png"))"""
    return bytes(page.evaluate(script))


@pytest.fixture(scope="module")
def collecting_server(project, tmp_path_factory):
    """The same project's server, filing corrections in a folder of its own: (URL, folder)."""
    folder = tmp_path_factory.mktemp("collected") / "feedback"
    with served(cwd=project[0], args=("--collect", folder)) as (_, url):
        yield url, folder


def test_the_page_files_right_answers_and_corrections_in_their_class_folders(
    collecting_server, server, page
):
    from playwright.sync_api import expect

    url, folder = collecting_server
    page.goto(url)
    expect(page.locator("#feedback")).to_be_hidden()  # no answer yet
    draw(page, STROKES["7"])
    shows(page, "7")
    expect(page.locator("#labels button")).to_have_count(10)
    page.click("#right")
    expect(page.locator("#filed")).to_have_text("filed as 7, thank you")
    expect(page.locator("#right")).to_be_disabled()
    [seven] = (folder / "7").iterdir()
    # The file is the image whose answer the page showed: the canvas, as /predict got it.
    assert seven.read_bytes() == canvas_png(page)
    assert seven.name == f"{hashlib.sha256(seven.read_bytes()).hexdigest()}.png"

    # A 4 drawn open at the top, corrected through "wrong, it is: 4" whatever it was read as.
    page.click("#clear")
    expect(page.locator("#feedback")).to_be_hidden()
    draw(page, [[(95, 40), (75, 170), (215, 170)], [(175, 60), (170, 240)]])
    expect(page.locator("#feedback")).to_be_visible(timeout=20_000)
    page.wait_for_timeout(500)  # the last throttled answer
    page.locator("#labels button", has_text="4").click()
    expect(page.locator("#filed")).to_have_text("filed as 4, thank you")
    [four] = (folder / "4").iterdir()
    assert four.read_bytes() == canvas_png(page)
    assert sorted(p.name for p in folder.iterdir()) == ["4", "7"]

    # A server started without --collect: no buttons, whatever the answer.
    page.goto(server)
    draw(page, STROKES["7"])
    shows(page, "7")
    expect(page.locator("#feedback")).to_be_hidden()
