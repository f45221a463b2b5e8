"""Accuracy of `predict` on photos of digits on paper, per condition, next to the model's
accuracy on the raw test images.

    python -m bench.predict_real_world [--n 1000] [--model PATH] [--raw DIR] [--out DIR]
                                       [--seed 0] [--samples 4]

Renders the first N MNIST test digits (never training digits) as a phone would photograph
them written on paper, one condition at a time, seeded: dark ink on paper, upscaled 3-6x,
off-centre in a larger frame, saved as PNG unless the condition says JPEG; then as crops
(cropped to the ink, enlarged 4x, with or without a margin), and as MNIST's own 28x28
images saved as PNG. Each image goes through `predict`'s own path
(tools/predict.image_probabilities); a 3-digit row through `predict --number`'s and counts
only when all three digits are right. Prints the table,
writes it to OUT/predict_real_world.json and the first SAMPLES images of each condition
to OUT/samples/.
"""

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from bench.common import print_machine, test_digits
from stages import prepare, preprocess
from stages.common import PipelineError, run_cli, write_json
from tools import predict

PAPER = {  # condition -> what the photo has
    "clean scan": {},
    "uneven light": {"light"},
    "shadow": {"shadow"},
    "paper texture": {"texture"},
    "sensor noise": {"noise"},
    "JPEG q30-60": {"jpeg"},
    "rotation up to 8 deg": {"rotate"},
    "ruled paper": {"ruled"},
    "squared paper": {"squared"},
    "clutter at the border": {"clutter"},
    "phone photo (all but lines, clutter)": {"light", "shadow", "texture", "noise", "blur"}
    | {"rotate", "jpeg"},
}
ROW = "3-digit rows, phone photo"
ROW_EFFECTS = {"light", "texture", "noise", "blur", "jpeg"}
ROW_DIGITS = 3
CROPS = {  # condition -> (margin per side, top, bottom, left, right, as a share of the
    # enlarged ink's longer side; dark ink on white). One edge: the side turns digit by digit.
    "crop with a margin": ((0.25,) * 4, True),
    "crop, tight": ((0,) * 4, True),
    "crop, tight, light on dark": ((0,) * 4, False),
    "crop, touching one edge": ((0, 0.25, 0.25, 0.25), True),
    "crop, wide margin": ((1,) * 4, True),
}
SCALE = 4  # crops are enlarged 4x (bicubic), as a zoomed screenshot or a scan
OWN = "MNIST's own 28x28 images, PNG"


def digits_alpha(digits, rng):
    """uint8 MNIST digits (k, 28, 28), white on black -> float ink coverage of them side
    by side, each frame 0-6 pixels apart and up to 2 up or down, at 28-pixel scale."""
    gaps = rng.integers(0, 7, len(digits) - 1)
    shifts = rng.integers(-2, 3, len(digits)) if len(digits) > 1 else [0]
    alpha = np.zeros((32, 28 * len(digits) + int(gaps.sum())))
    left = 0
    for digit, gap, shift in zip(digits, [*gaps, 0], shifts, strict=True):
        alpha[2 + shift : 30 + shift, left : left + 28] = digit / 255.0
        left += 28 + int(gap)
    return alpha


def resize(array, size, resample=Image.Resampling.BICUBIC):
    """float (h, w) -> float (size[1], size[0]) through PIL."""
    image = Image.fromarray(array.astype(np.float32), mode="F").resize(size, resample)
    return np.asarray(image, dtype=np.float64)


def lines(shape, spacing, angle, thickness, rng, vertical=False):
    """float (h, w) coverage of parallel lines `spacing` px apart, tilted `angle` degrees."""
    rows, cols = np.indices(shape, dtype=np.float64)
    if vertical:
        rows, cols = cols, rows
    t = np.deg2rad(angle)
    distance = rows * np.cos(t) - cols * np.sin(t) + rng.uniform(0, spacing)
    offset = np.abs((distance % spacing) - spacing / 2) - spacing / 2  # <= 0, 0 on a line
    return np.clip(thickness / 2 + 0.5 + offset, 0, 1)


def smooth_noise(shape, sigma, rng):
    """Gaussian noise low-passed at `sigma` px, rescaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / max(noise.std(), 1e-12)


def sheet_edge(shape, rng):
    """float (h, w): 1 on the desk beyond the sheet's edge along one side (8-15% of it,
    tilted), 0 on the sheet."""
    height, width = shape
    rows, cols = np.indices(shape, dtype=np.float64)
    side = rng.integers(4)
    along, across, extent = [(cols, rows, height), (rows, cols, width)][side % 2]
    depth = rng.uniform(0.08, 0.15) * extent + np.tan(np.deg2rad(rng.uniform(-4, 4))) * (
        along - along.mean()
    )
    beyond = across < depth if side < 2 else across > extent - 1 - depth
    return ndimage.gaussian_filter(beyond.astype(np.float64), 1.0)


def pen(shape, box, rng):
    """float (h, w) coverage of a pen lying in from a border, clear of the digit's box."""
    height, width = shape
    top, _, bottom, _ = box
    rows, cols = np.indices(shape, dtype=np.float64)
    thickness = rng.uniform(0.06, 0.1) * (bottom - top)
    # Along the bottom margin, entering from the left or right border at a slight angle.
    y = bottom + (height - bottom) * rng.uniform(0.45, 0.7)
    angle = np.deg2rad(rng.uniform(-6, 6))
    distance = np.abs((rows - y) * np.cos(angle) - (cols - width / 2) * np.sin(angle))
    end = rng.uniform(0.3, 0.7) * width
    inside = cols < end if rng.random() < 0.5 else cols > width - end
    return ndimage.gaussian_filter(((distance < thickness / 2) & inside) * 1.0, 1.0)


def photograph(digits, effects, rng):
    """uint8 MNIST digits (k, 28, 28) -> (bytes, format) of a photo of them on paper."""
    alpha = digits_alpha(digits, rng)
    scale = rng.uniform(3, 6)
    alpha = np.clip(resize(alpha, (round(alpha.shape[1] * scale), round(32 * scale))), 0, 1)
    if "rotate" in effects:
        alpha = ndimage.rotate(alpha, rng.uniform(-8, 8), order=1, reshape=True)
    h, w = alpha.shape
    height = round(h * rng.uniform(1.4, 2.0))
    width = round(w + h * rng.uniform(0.5, 1.0))
    if "clutter" in effects:  # room for the desk and the pen outside the digit
        height, width = round(height * 1.35), round(width * 1.3)
    top = round(rng.uniform(0.15, 0.45) * (height - h)) if "clutter" in effects else None
    top = top if top is not None else int(rng.integers(0, height - h + 1))
    left = int(rng.integers(round(0.15 * (width - w)), round(0.85 * (width - w)) + 1))
    ink = np.zeros((height, width))
    ink[top : top + h, left : left + w] = alpha
    shape = (height, width)

    paper = np.array([0.93, 0.92, 0.88]) + rng.uniform(-0.04, 0.04, 3)
    image = np.ones((*shape, 3)) * paper
    if "texture" in effects:  # fibres and the sheet's unevenness
        grain = 0.025 * smooth_noise(shape, 0.8, rng) + 0.02 * smooth_noise(shape, 8, rng)
        image *= (1 + grain)[..., np.newaxis]
    digit_h = 28 * scale
    if "ruled" in effects:
        rule = lines(shape, digit_h * rng.uniform(0.4, 0.55), rng.uniform(-2, 2), 2, rng)
        image = image * (1 - rule[..., None]) + rule[..., None] * [0.55, 0.65, 0.85]
    if "squared" in effects:
        angle = rng.uniform(-2, 2)
        spacing = digit_h * rng.uniform(0.25, 0.35)
        grid = np.maximum(
            lines(shape, spacing, angle, 1.5, rng), lines(shape, spacing, -angle, 1.5, rng, True)
        )
        image = image * (1 - grid[..., None]) + grid[..., None] * [0.6, 0.7, 0.85]
    pen_colour = [[0.1, 0.12, 0.35], [0.08, 0.08, 0.1], [0.3, 0.3, 0.33]][rng.integers(3)]
    colour = np.array(pen_colour) + rng.uniform(0, 0.08)
    image = image * (1 - ink[..., None]) + ink[..., None] * colour
    if "clutter" in effects:
        desk = sheet_edge(shape, rng)
        image = image * (1 - desk[..., None]) + desk[..., None] * [0.35, 0.25, 0.18]
        body = pen(shape, (top, left, top + h, left + w), rng)
        image = image * (1 - body[..., None]) + body[..., None] * [0.15, 0.15, 0.6]

    light = np.ones(shape)
    rows, cols = np.indices(shape, dtype=np.float64)
    if "light" in effects:  # light falling off across the sheet, and darker corners
        a = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(a) * cols / width + np.sin(a) * rows / height) + 0.5
        light *= 1 - rng.uniform(0.35, 0.5) * np.clip(ramp, 0, 1)
        r2 = ((rows / height - 0.5) ** 2 + (cols / width - 0.5) ** 2) * 2
        light *= 1 - 0.25 * r2
    if "shadow" in effects:  # a hand or a phone between the lamp and the sheet
        a = rng.uniform(0, 2 * np.pi)
        d = np.cos(a) * (cols - width / 2) + np.sin(a) * (rows - height / 2)
        edge = rng.uniform(-0.25, 0.25) * min(shape)
        soft = rng.uniform(2, 0.05 * min(shape))
        light *= 1 - rng.uniform(0.3, 0.5) / (1 + np.exp(-(d - edge) / soft))
    image *= light[..., None]
    if "blur" in effects:
        image = ndimage.gaussian_filter(image, (rng.uniform(0.4, 1.0),) * 2 + (0,))
    if "noise" in effects:
        image += rng.normal(0, rng.uniform(0.02, 0.04), image.shape)
    photo = Image.fromarray(np.clip(np.round(255 * image), 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    if "jpeg" in effects:
        photo.save(buffer, "JPEG", quality=int(rng.integers(30, 61)))
        return buffer.getvalue(), "JPEG"
    photo.save(buffer, "PNG")
    return buffer.getvalue(), "PNG"


def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue(), "PNG"


def crop(digit, margins, dark, turn):
    """uint8 MNIST digit (28, 28), white on black -> (PNG bytes, "PNG") of it cropped to its
    ink, enlarged SCALE x, dark on white when `dark`, with `margins` turned by `turn` sides."""
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    ink = Image.fromarray(digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    size = (ink.width * SCALE, ink.height * SCALE)
    enlarged = np.asarray(ink.resize(size, Image.Resampling.BICUBIC))
    top, bottom, left, right = (round(m * max(size)) for m in np.roll(margins, turn))
    return png(
        np.pad(
            255 - enlarged if dark else enlarged,
            ((top, bottom), (left, right)),
            constant_values=255 if dark else 0,
        )
    )


def render(name, groups, rng):
    """uint8 digits (n, k, 28, 28) -> [(bytes, format)], one image of each group's digits
    as condition `name` makes it."""
    if name in CROPS:
        return [crop(g[0], *CROPS[name], turn=i) for i, g in enumerate(groups)]
    if name == OWN:
        return [png(g[0]) for g in groups]
    effects = ROW_EFFECTS if name == ROW else PAPER[name]
    return [photograph(g, effects, rng) for g in groups]


def read_all(predictor, photos, number):
    """Digits read from each photo, as strings ("" when none was found)."""
    read = []
    for i, (data, _) in enumerate(photos):
        try:
            probs = predict.image_probabilities(predictor, data, f"photo {i}", number=number)
            read.append("".join(str(d) for d in probs.argmax(axis=1)))
        except preprocess.NoDigit:
            read.append("")
    return read


def save_samples(photos, name, out_dir, count):
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    for i, (data, format) in enumerate(photos[:count]):
        (out_dir / f"{slug}-{i}.{'jpg' if format == 'JPEG' else 'png'}").write_bytes(data)


def measure(predictor, digits, labels, seed, out_dir, samples):
    """Accuracy per condition, the raw test images' first."""
    correct = predictor.predict(prepare.scale_images(digits)).argmax(axis=1) == labels
    n = len(digits) // ROW_DIGITS
    row_raw = correct[: n * ROW_DIGITS].reshape(n, ROW_DIGITS).all(axis=1)
    table = [{"condition": "raw 28x28 test images", "images": len(digits), "raw": None}]
    table[0]["accuracy"] = float(correct.mean())
    start = time.perf_counter()
    for i, name in enumerate([*PAPER, ROW, *CROPS, OWN]):
        rng = np.random.default_rng([seed, i])
        row = name == ROW
        groups = digits[: n * ROW_DIGITS].reshape(n, ROW_DIGITS, 28, 28) if row else digits[:, None]
        photos = render(name, groups, rng)
        save_samples(photos, name, out_dir, samples)
        truths = labels[: n * ROW_DIGITS].reshape(n, -1) if row else labels[:, None]
        truth = ["".join(map(str, t)) for t in truths]
        read = read_all(predictor, photos, number=row)
        right = np.array([a == b for a, b in zip(read, truth, strict=True)])
        raw = float(row_raw.mean() if row else correct.mean())
        not_found = sum(r == "" for r in read)
        table.append(
            {"condition": name, "images": len(photos), "accuracy": float(right.mean()),
             "raw": raw, "not_found": not_found}
        )  # fmt: skip
    return table, time.perf_counter() - start


def format_table(table):
    lines = [f"{'condition':40} {'images':>6} {'accuracy':>8} {'raw':>6} {'points':>6}"]
    for r in table:
        gap = (
            "" if r["raw"] is None else f" {r['raw']:6.2%} {100 * (r['accuracy'] - r['raw']):+6.2f}"
        )
        lines.append(f"{r['condition']:40} {r['images']:6d} {r['accuracy']:8.2%}{gap}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="how many test digits")
    parser.add_argument("--model", help="a .onnx or .keras file (default: as predict)")
    parser.add_argument("--raw", help="the MNIST .gz files (default: $MNIST_MIRROR, else data/raw)")
    parser.add_argument("--out", default="bench/results", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=4, help="images kept per condition")
    args = parser.parse_args(argv)
    if args.n < ROW_DIGITS:
        raise PipelineError(f"--n must be at least {ROW_DIGITS}, got {args.n}")
    predictor = predict.load_predictor(args.model)
    line = print_machine(ceilings=False)  # its figures are accuracies, not speeds
    digits, labels = test_digits(args.n, args.raw)
    out = Path(args.out)
    table, seconds = measure(predictor, digits, labels, args.seed, out / "samples", args.samples)
    write_json(
        out / "predict_real_world.json",
        {"model": predictor.source, "seed": args.seed, "machine": line, "table": table},
    )
    print(
        f"MNIST test digits photographed on paper and cropped (seed {args.seed}), "
        f"model {predictor.source}\n"
        f"{format_table(table)}\n"
        f"raw: the model on the same test digits as 28x28 images (for rows: all three right); "
        f"points: accuracy - raw\n{seconds:.0f} s to render and read; samples in {out / 'samples'}"
    )


if __name__ == "__main__":
    run_cli(main)
