"""tools/shapes.py: the folder of coloured shapes a user can try the pipeline on."""

import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import ROOT
from tools import shapes


def test_it_writes_one_folder_per_shape_of_colour_images_that_differ(tmp_path):
    out = shapes.write_shapes(tmp_path / "shapes", ("circle", "cross"), per_class=5, size=32)
    assert sorted(p.name for p in out.iterdir()) == ["circle", "cross"]
    images = [Image.open(p) for p in sorted(out.rglob("*.png"))]
    assert len(images) == 10
    assert {(im.mode, im.size) for im in images} == {("RGB", (32, 32))}
    pixels = np.stack([np.asarray(im) for im in images])
    assert len({p.tobytes() for p in pixels}) == 10  # no two alike
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # many colours, not a few
    again = shapes.write_shapes(tmp_path / "again", ("circle", "cross"), per_class=5, size=32)
    assert all(  # the seed decides
        (out / p.relative_to(again)).read_bytes() == p.read_bytes() for p in again.rglob("*.png")
    )
    grey = shapes.write_shapes(tmp_path / "grey", ("ring", "star"), 2, 16, grey=True, colours=3)
    assert {Image.open(p).mode for p in grey.rglob("*.png")} == {"L"}


def test_classes_that_are_colours_hold_shapes_in_their_class_s_colour(tmp_path):
    out = shapes.write_shapes(tmp_path / "c", ("square",), 4, 32, by_colour=("red", "blue"))
    assert sorted(p.name for p in out.iterdir()) == ["blue", "red"]
    for name in ("red", "blue"):
        for path in (out / name).glob("*.png"):
            pixels = np.asarray(Image.open(path)).reshape(-1, 3).astype(int)
            # A square of side >= 8 pixels (radius >= 18% of 32) in the class's colour.
            assert (np.abs(pixels - shapes.COLOURS[name]).sum(axis=1) < 30).sum() >= 30, path


def test_it_overwrites_nothing_and_says_what_is_wrong_in_one_line(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    for args, message in (
        ([str(tmp_path / "mine")], f"{tmp_path / 'mine'} exists; name a new folder"),
        (
            [str(tmp_path / "new"), "--shapes", "circle", "blob"],
            "--shapes circle blob: give 2 or more of circle, square, triangle, star, cross, ring",
        ),
        (
            [str(tmp_path / "new"), "--by-colour", "red", "teal"],
            "--by-colour red teal: give 2 or more of red, green, blue, yellow, purple, orange",
        ),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "tools.shapes", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 1
        assert run.stderr.strip().splitlines()[-1].startswith(f"Error: {message}"), run.stderr
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "new").exists()
