"""Writes a folder of labelled colour images of shapes to try the pipeline on your own kind
of data: <class>/<n>.png, one sub-folder per shape, each shape in a random colour, size,
place and slant, on a random background (a plain colour, a gradient or clutter).

    python -m tools.shapes data/shapes [--shapes circle square triangle] [--per-class 100]
                                       [--size 64] [--grey] [--colours N] [--turn 15]
                                       [--by-colour red green blue] [--seed 0]

With --by-colour the classes are colours instead: <colour>/<n>.png, each image one of
--shapes in its class's colour. The folder must not exist yet (nothing is overwritten).
Then (docs/datasets.md, "Small datasets"):
    dvc add data/shapes
    dvc exp run -S fetch.source=data/shapes -S "fetch.image_size=[32, 32]" \\
                -S fetch.channels=3 -S train.model=compact
"""

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stages.common import PipelineError, atomic_dir, run_cli

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS = {  # for classes that are colours (--by-colour)
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = ("plain", "gradient", "clutter")


def colour(rng, palette, unlike=None):
    """A random RGB colour (one of `palette`'s, if any); with `unlike`, one at least 120
    apart from it (sum of |Δ|), so the shape stands out from what it is drawn on."""
    while True:
        if palette:
            c = palette[rng.integers(len(palette))]
        else:
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
        if unlike is None or sum(abs(a - b) for a, b in zip(c, unlike, strict=True)) >= 120:
            return c


def background(rng, size, palette):
    """A size x size RGB image and its mean colour: a plain colour, a two-colour gradient,
    or a plain colour under faint lines and dots (clutter thinner than any shape)."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    a = colour(rng, palette)
    if kind == "gradient":  # from a to b along a random direction
        b = colour(rng, palette)
        angle = float(rng.uniform(0, 2 * math.pi))
        y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        t = (x * math.cos(angle) + y * math.sin(angle))[..., None] / math.sqrt(0.5) + 0.5
        pixels = (1 - t) * np.array(a) + t * np.array(b)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        return image, tuple(int(v) for v in (np.array(a) + np.array(b)) / 2)
    image = Image.new("RGB", (size, size), a)
    if kind == "clutter":
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 8))):
            points = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
            draw.line(points, fill=colour(rng, palette), width=max(1, size // 64))
        for _ in range(int(rng.integers(5, 15))):
            x, y = (int(v) for v in rng.integers(0, size, 2))
            r = max(1, size // 40)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour(rng, palette))
    return image, a


def outline(shape, cx, cy, r, turn):
    """The polygon (or circle box) of `shape` of radius r centred on (cx, cy), turned by
    `turn` radians."""

    def polygon(radii, count):
        return [
            (
                cx + radii[i % len(radii)] * math.cos(turn + 2 * math.pi * i / count),
                cy + radii[i % len(radii)] * math.sin(turn + 2 * math.pi * i / count),
            )
            for i in range(count)
        ]

    if shape == "square":
        return polygon([r], 4)
    if shape == "triangle":
        return polygon([r], 3)
    if shape == "star":
        return polygon([r, r * 0.45], 10)
    if shape == "cross":  # a plus sign: 12 corners, arms a third of the width
        w = r / 3
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
        corners += [(-x, -y) for x, y in corners]
        c, s = math.cos(turn), math.sin(turn)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]
    raise ValueError(shape)


def draw_shape(rng, shape, size, turn, palette=(), fill=None):
    """One image of `shape` (in colour `fill`, else a random one): radius 18-40% of the
    side, anywhere it fits, turned by up to `turn` degrees either way from upright."""
    while True:
        image, behind = background(rng, size, palette)
        if fill is None or sum(abs(a - b) for a, b in zip(fill, behind, strict=True)) >= 120:
            break
    fill = fill or colour(rng, palette, unlike=behind)
    r = float(rng.uniform(0.18, 0.40)) * size
    cx, cy = (float(rng.uniform(r, size - r)) for _ in range(2))
    draw = ImageDraw.Draw(image)
    if shape in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(
            box,
            fill=None if shape == "ring" else fill,
            outline=fill,
            width=max(2, int(r / 3)) if shape == "ring" else 0,
        )
    else:
        upright = {"triangle": -math.pi / 2, "star": -math.pi / 2, "square": math.pi / 4}
        angle = upright.get(shape, 0.0) + math.radians(float(rng.uniform(-turn, turn)))
        draw.polygon(outline(shape, cx, cy, r, angle), fill=fill)
    return image.filter(ImageFilter.GaussianBlur(size / 128))  # soft edges, as a photo's


def write_shapes(
    out,
    shapes=SHAPES[:3],
    per_class=100,
    size=64,
    grey=False,
    seed=0,
    turn=15,
    colours=0,
    by_colour=(),
):
    """Writes per_class images of each shape to out/<shape>/<n>.png; out must not exist.
    colours: how many colours shapes and backgrounds are drawn from (0: any). by_colour:
    names of COLOURS that are the classes instead, out/<colour>/<n>.png, each image one
    of `shapes` in its class's colour on any background."""
    out = Path(out)
    if out.exists():
        raise PipelineError(f"{out} exists; name a new folder (nothing is overwritten)")
    unknown = sorted(set(shapes) - set(SHAPES))
    need = 1 if by_colour else 2  # classes that are colours may all be one shape
    if unknown or len(set(shapes)) < need:
        raise PipelineError(
            f"--shapes {' '.join(shapes)}: give {need} or more of {', '.join(SHAPES)}"
        )
    if sorted(set(by_colour) - set(COLOURS)) or len(set(by_colour)) == 1:
        raise PipelineError(
            f"--by-colour {' '.join(by_colour)}: give 2 or more of {', '.join(COLOURS)}"
        )
    rng = np.random.default_rng(seed)
    palette = []
    while len(palette) < colours:  # each far enough from the others to draw on any of them
        palette.append(colour(rng, (), unlike=palette[-1] if palette else None))
    with atomic_dir(out) as tmp:
        for name in by_colour or shapes:
            (tmp / name).mkdir()
            for i in range(per_class):
                if by_colour:
                    shape = shapes[rng.integers(len(shapes))]
                    image = draw_shape(rng, shape, size, turn, palette, COLOURS[name])
                else:
                    image = draw_shape(rng, name, size, turn, palette)
                (image.convert("L") if grey else image).save(tmp / name / f"{i:04d}.png")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the folder to write (must not exist)")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=list(SHAPES[:3]),
        metavar="SHAPE",
        help=f"classes, 2 or more of: {', '.join(SHAPES)}",
    )
    parser.add_argument("--per-class", type=int, default=100, help="images per shape")
    parser.add_argument("--size", type=int, default=64, help="side of each image, in pixels")
    parser.add_argument("--grey", action="store_true", help="grey images instead of colour")
    parser.add_argument(
        "--turn",
        type=float,
        default=15,
        help="the most a shape is turned from upright, in degrees (180: any)",
    )
    parser.add_argument(
        "--colours",
        type=int,
        default=0,
        help="draw shapes and backgrounds from this many colours (0: any)",
    )
    parser.add_argument(
        "--by-colour",
        nargs="+",
        default=[],
        metavar="COLOUR",
        help=f"classes that are colours instead, 2 or more of: {', '.join(COLOURS)}; "
        "each image one of --shapes in its class's colour",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.size < 16:
        parser.error("--per-class must be 1 or more and --size 16 or more")
    out = write_shapes(
        args.out,
        args.shapes,
        args.per_class,
        args.size,
        args.grey,
        args.seed,
        args.turn,
        args.colours,
        args.by_colour,
    )
    classes = args.by_colour or args.shapes
    kind = "colour" if args.by_colour else "shape"
    print(f"shapes: wrote {len(classes) * args.per_class} images in {out}/<{kind}>/")


if __name__ == "__main__":
    run_cli(main)
