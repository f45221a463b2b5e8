"""Accuracy of the predict command on digits as users upload them, not as MNIST stores them.

    python -m bench.predict_real_world [--n 1000] [--model PATH] [--raw DIR] [--out DIR]

Takes the first N test digits from the raw test IDX file (read by the prepare stage's own
code) and turns each into what a user would upload: black ink on white, upscaled 4-10x,
placed off-centre in a larger canvas of another aspect ratio, 30% of them saved as JPEG at
quality 70, the others as PNG. Writes these files under OUT/images, classifies them with
the predict command's own code (tools/predict.py), and reports the accuracy
- on the raw 28x28 images (what the model was trained on),
- on the uploads, with the command's MNIST-style preprocessing,
- on the uploads, naively: whole image resized to 28x28, inverted.
Writes the figures to OUT/predict_real_world.json.
"""

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stages import prepare
from stages.common import run_cli, write_json
from tools import predict
from tools.paths import dvc_var

JPEG_SHARE = 0.3
JPEG_QUALITY = 70


def user_upload(digit, rng):
    """uint8 (28, 28) white-on-black MNIST digit -> PIL image a user might upload, and
    its file format: black on white, upscaled 4-10x (smooth), off-centre in a canvas
    0.6-0.85x or 1.2-1.8x as wide as it is tall."""
    scale = int(rng.integers(4, 11))
    side = 28 * scale
    ink = Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BICUBIC)
    height = int(side * rng.uniform(1.2, 2.0))
    aspect = rng.uniform(0.6, 0.85) if rng.random() < 0.5 else rng.uniform(1.2, 1.8)
    width = max(int(height * aspect), side + 8)
    canvas = Image.new("L", (width, height), 255)
    canvas.paste(ink, (int(rng.integers(0, width - side)), int(rng.integers(0, height - side))))
    if rng.random() < JPEG_SHARE:
        return canvas.convert("RGB"), "JPEG"
    return canvas, "PNG"


def write_uploads(digits, out_dir, seed=0):
    """Writes one upload per digit as out_dir/NNNN.png or .jpg; returns the paths."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, digit in enumerate(digits):
        image, format = user_upload(digit, rng)
        path = out_dir / f"{i:04d}.{'jpg' if format == 'JPEG' else 'png'}"
        image.save(path, format, **({"quality": JPEG_QUALITY} if format == "JPEG" else {}))
        paths.append(path)
    return paths


def naive(image):
    """What a user's code does without MNIST's recipe: grey, resize to 28x28, invert."""
    grey = image.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    return (1.0 - np.asarray(grey, np.float32) / 255.0)[..., np.newaxis]


def accuracy(predictor, x, labels):
    return float(np.mean(predictor.predict(x).argmax(axis=1) == labels))


def measure(predictor, digits, labels, paths):
    """The three accuracies and what they ran on."""
    start = time.perf_counter()
    results = predict.classify(predictor, [str(p) for p in paths])
    seconds = time.perf_counter() - start
    predicted = np.array([r.get("digit", -1) for r in results])
    images = [Image.open(p) for p in paths]
    return {
        "images": len(labels),
        "jpeg": sum(p.suffix == ".jpg" for p in paths),
        "raw_28x28": accuracy(predictor, prepare.scale_images(digits), labels),
        "uploads_mnist_style": float(np.mean(predicted == labels)),
        "uploads_naive": accuracy(predictor, np.stack([naive(i) for i in images]), labels),
        "failed": [r["error"] for r in results if "error" in r],
        "ms_per_upload": 1000 * seconds / len(paths),  # read, preprocess, one batch predict
        "model": predictor.source,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="how many test digits")
    parser.add_argument("--model", help="a .onnx or .keras file (default: as predict)")
    parser.add_argument("--raw", help="directory of the MNIST .gz files (default: dvc.yaml's)")
    parser.add_argument("--out", default="bench/results", help="output directory")
    args = parser.parse_args(argv)
    predictor = predict.load_predictor(args.model)
    raw = Path(args.raw or dvc_var("raw"))
    images_file, labels_file = prepare.SOURCES["test"]
    digits = prepare.read_idx(raw / images_file, 3)[: args.n]
    labels = prepare.read_idx(raw / labels_file, 1)[: args.n]
    out = Path(args.out)
    paths = write_uploads(digits, out / "images")
    figures = measure(predictor, digits, labels, paths)
    write_json(out / "predict_real_world.json", figures)
    print(
        f"{figures['images']} MNIST test digits as uploads (black on white, upscaled 4-10x, "
        f"off-centre, {figures['jpeg']} as JPEG q{JPEG_QUALITY}); model: {figures['model']}\n"
        f"  raw 28x28 test images                     {figures['raw_28x28']:.1%}\n"
        f"  uploads, MNIST-style preprocessing        {figures['uploads_mnist_style']:.1%}\n"
        f"  uploads, naive (resize to 28x28, invert)  {figures['uploads_naive']:.1%}\n"
        f"  {len(figures['failed'])} uploads failed; {figures['ms_per_upload']:.2f} ms per "
        f"upload (read, preprocess, predict); images in {out / 'images'}"
    )


if __name__ == "__main__":
    run_cli(main)
