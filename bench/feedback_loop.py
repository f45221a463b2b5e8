"""The feedback loop, driven as a person drives it: headless Chromium draws digits with mouse
strokes on a served page, in styles MNIST lacks (very thick, tiny, off-centre, slanted,
double-lined, with a crossbar) and a few plain ones, reads each answer, and files it with the
page's buttons: "right", or "wrong, it is: <digit>". The server must run with --collect
(docs/feedback.md).

    python -m bench.feedback_loop --url http://127.0.0.1:8000 [--variants 2] [--seed 0]
                                  [--screenshot docs/feedback.png]

Prints one line per style (drawn, read right) and writes bench/results/feedback_loop.json
(every drawing: digit, style, answer). Each drawing is jittered by the seeded RNG, so a
rerun draws the same strokes; the canvas bytes then depend on the browser's PNG encoder.
"""

import argparse
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import ROOT
from stages.common import run_cli, write_json

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# Each digit as polylines on the page's 280x280 canvas, drawn about 190 px tall.
DIGITS = {
    "0": [[(140, 45), (95, 70), (80, 140), (95, 210), (140, 235), (185, 210), (200, 140),
           (185, 70), (140, 45)]],
    "1": [[(150, 45), (138, 235)]],
    "2": [[(80, 90), (110, 55), (170, 55), (195, 95), (180, 140), (80, 230), (205, 230)]],
    "3": [[(80, 70), (140, 45), (195, 80), (150, 135), (200, 180), (150, 235), (80, 215)]],
    "4": [[(165, 235), (165, 45), (70, 170), (210, 170)]],
    "5": [[(195, 50), (95, 50), (88, 130), (150, 118), (195, 160), (180, 215), (120, 238),
           (75, 215)]],
    "6": [[(180, 50), (120, 80), (85, 160), (100, 220), (150, 235), (190, 195), (175, 150),
           (120, 145), (88, 180)]],
    "7": [[(75, 62), (205, 58), (125, 238)]],
    "8": [[(140, 140), (90, 100), (110, 50), (170, 50), (190, 100), (140, 140), (85, 185),
           (110, 235), (170, 235), (195, 185), (140, 140)]],
    "9": [[(190, 110), (150, 140), (95, 120), (95, 70), (140, 45), (190, 70), (190, 110),
           (180, 235)]],
}  # fmt: skip
# The crossbar style's extra strokes: a barred 7, a 1 with a flag and a base, a slashed 0.
CROSSBARS = {
    "7": [[(100, 150), (185, 150)]],
    "1": [[(150, 45), (105, 85)], [(105, 235), (180, 235)]],
    "0": [[(195, 40), (85, 240)]],
}
STYLES = ("plain", "thick", "tiny", "off-centre", "slanted", "double", "crossbar")


def scaled(strokes, factor, centre):
    """Strokes shrunk by `factor` about the canvas centre, then moved to `centre`."""
    return [[(centre[0] + factor * (x - 140), centre[1] + factor * (y - 140)) for x, y in s]
            for s in strokes]  # fmt: skip


def styled(digit, style, rng):
    """The polylines for `digit` drawn in `style`, every point jittered by a few pixels."""
    strokes = DIGITS[digit] + (CROSSBARS[digit] if style == "crossbar" else [])
    strokes = [[(x + rng.normal(0, 4), y + rng.normal(0, 4)) for x, y in s] for s in strokes]
    if style == "thick":  # the same strokes side by side: about 60 px wide
        offsets = [(dx, dy) for dx in (-20, -10, 0, 10, 20) for dy in (-20, 0, 20)]
        strokes = [[(x + dx, y + dy) for x, y in s] for dx, dy in offsets for s in strokes]
    elif style == "double":  # each stroke twice, 24 px apart: an outlined digit
        strokes = [[(x + dx, y + dx) for x, y in s] for dx in (-12, 12) for s in strokes]
    elif style == "tiny":  # 40 px tall in the page's 20 px pen
        strokes = scaled(strokes, 0.21, (140 + rng.uniform(-40, 40), 140 + rng.uniform(-40, 40)))
    elif style == "off-centre":  # half size, in a corner
        corner = [(75, 75), (205, 75), (75, 205), (205, 205)][rng.integers(4)]
        strokes = scaled(strokes, 0.45, corner)
    elif style == "slanted":  # leaning right by about 40 degrees
        strokes = scaled(strokes, 0.75, (140, 140))
        strokes = [[(x + 0.85 * (140 - y), y) for x, y in s] for s in strokes]
    return [[(min(max(x, 4), 276), min(max(y, 4), 276)) for x, y in s] for s in strokes]


def draw(page, strokes):
    box = page.locator("#canvas").bounding_box()
    for stroke in strokes:
        (x, y), rest = stroke[0], stroke[1:]
        page.mouse.move(box["x"] + x, box["y"] + y)
        page.mouse.down()
        for x, y in rest:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
        page.mouse.up()


def settled_answer(page):
    """The class the page shows once every request it sent has come back."""
    page.wait_for_function("!inFlight && !pending && !timer && shown !== null", timeout=30_000)
    return page.locator("#digit").inner_text()


def plan(variants, rng):
    """[(digit, style)]: each digit plain once, in every other style `variants` times (the
    crossbar only where one is written), in a seeded random order."""
    drawings = [(d, "plain") for d in DIGITS]
    drawings += [(d, s) for s in STYLES[1:-1] for d in DIGITS for _ in range(variants)]
    drawings += [(d, "crossbar") for d in CROSSBARS for _ in range(variants + 1)]
    return [drawings[i] for i in rng.permutation(len(drawings))]


def session(page, url, variants, seed, screenshot=None):
    """Draws and files every planned digit; returns one record per drawing."""
    rng = np.random.default_rng(seed)
    page.goto(url)
    records = []
    for digit, style in plan(variants, rng):
        page.click("#clear")
        draw(page, styled(digit, style, rng))
        answer = settled_answer(page)
        if screenshot and answer != digit:
            page.screenshot(path=screenshot)  # the page with its buttons, before the correction
            screenshot = None
        if answer == digit:
            page.click("#right")
        else:
            page.locator("#labels button", has_text=digit).click()
        page.wait_for_function("document.getElementById('filed').textContent !== ''")
        filed = page.locator("#filed").inner_text()
        if not filed.startswith(f"filed as {digit}"):
            raise RuntimeError(f"a {style} {digit}: the page says {filed!r}")
        records.append({"digit": digit, "style": style, "answer": answer})
    return records


def summary(records):
    drawn = Counter(r["style"] for r in records)
    right = Counter(r["style"] for r in records if r["answer"] == r["digit"])
    lines = [f"{s:10s} {drawn[s]:3d} drawn, {right[s]:3d} read right" for s in STYLES]
    lines.append(f"{'all':10s} {len(records):3d} drawn, {sum(right.values()):3d} read right")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the page, served with --collect"
    )
    parser.add_argument("--variants", type=int, default=2, help="drawings per digit and style")
    parser.add_argument("--seed", type=int, default=0, help="of the jitter and the order")
    parser.add_argument("--screenshot", help="PNG of the page offering its buttons")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "feedback_loop.json"))
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 820, "height": 560})
        records = session(page, args.url, args.variants, args.seed, args.screenshot)
        browser.close()
    print("\n".join(summary(records)))
    print(f"{time.perf_counter() - start:.0f} s")
    write_json(Path(args.out), {"url": args.url, "seed": args.seed, "drawings": records})


if __name__ == "__main__":
    run_cli(main)
