"""Predict: which class each image is, from anyone's PNG, JPEG, BMP, GIF or WebP files.

    python -m tools.predict IMAGE... [--number] [--json] [--model PATH]   (`-`: stdin)
    python -m tools.predict IMAGE... --label CLASS --collect DIR   (file a correction)

Each image is prepared as the model's training images were, as the model records it: for
a digit dataset (MNIST) a scan, a drawing or a photo of paper is prepared as MNIST's
digits were (stages/preprocess.py); for any other, it is resized and scaled exactly as
fetch and prepare did to every training image (stages/images.py). It is then classified by
the exported ONNX model through onnxruntime when the export stage has written it (no
TensorFlow import: fast start), else by the trained .keras model. Prints per file the
class name, its probability and the runner-up; with --number (digit datasets), the digits
of a row read left to right as one number, with each digit's probability. A bad file gets
one `Error: FILE: reason` line on stderr and the others are still predicted; the exit
code is 1 if any file failed. With --label, each image that was read is also filed in the
feedback folder DIR as a correction of class CLASS, as the page's buttons file it
(tools/collect.py).
"""

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

from stages import images, preprocess
from stages.common import PipelineError, run_cli
from stages.inference import ONNX_FILE, REBUILD, onnx_dataset, onnx_runner, onnx_session
from tools import collect
from tools.paths import dvc_var


class OnnxPredictor:
    """The exported float32 graph, run by onnxruntime (stages/inference.py)."""

    def __init__(self, path):
        session = onnx_session(path)
        self.predict = onnx_runner(session)  # (N, height, width, channels) -> (N, classes)
        self.dataset = onnx_dataset(session, path)  # {"name", "classes", "preparation"}
        self.input_shape = tuple(session.get_inputs()[0].shape[1:])
        self.source = f"onnx {path}"


class KerasPredictor:
    """The trained model, in the precision it was trained in."""

    def __init__(self, path):
        from stages import models  # imports Keras and its backend: only when needed

        self.model = models.load_model(path)
        self.dataset = models.recorded(path, "dataset")
        if not self.dataset:
            raise PipelineError(f"{path} records no dataset (class names); {REBUILD}")
        self.input_shape = tuple(self.model.input_shape[1:])
        self.source = f"keras {path}"

    def predict(self, x):
        """float32 (N, height, width, channels) -> float32 probabilities (N, classes)."""
        return np.asarray(self.model.predict_on_batch(np.asarray(x, np.float32)), np.float32)


def default_model():
    """The export stage's ONNX file when present, else the train stage's .keras file."""
    onnx = Path(dvc_var("exported")) / ONNX_FILE
    return onnx if onnx.exists() else Path(dvc_var("model"))


def load_predictor(path=None):
    """A predictor for the model at `path` (.onnx or .keras; default: default_model())."""
    path = Path(path) if path is not None else default_model()
    if not path.is_file():
        raise PipelineError(f"{path} not found; {REBUILD}")
    if path.suffix == ".onnx":
        return OnnxPredictor(path)
    if path.suffix == ".keras":
        return KerasPredictor(path)
    raise PipelineError(f"{path}: the model must be a .onnx or .keras file")


def read_input(name, stdin=None):
    """The bytes of file `name`, or of standard input for `-`."""
    if name == "-":
        return (stdin or sys.stdin.buffer).read()
    try:
        return Path(name).read_bytes()
    except FileNotFoundError:
        raise preprocess.BadImage(f"{name}: no such file") from None
    except IsADirectoryError:
        raise preprocess.BadImage(f"{name}: is a directory") from None
    except OSError as e:
        raise preprocess.BadImage(f"{name}: cannot read ({e.strerror})") from None


def label(name):
    """How a file is named in the output."""
    return "<stdin>" if name == "-" else name


def is_digits(predictor):
    """True when the model was trained on digits prepared as MNIST's (stages/preprocess.py)."""
    return predictor.dataset["preparation"] == "digits"


def model_input(predictor, data, name, number=False):
    """Image bytes -> float32 (k, height, width, channels), prepared as the model's training
    images were. Raises BadImage or NoDigit naming `name`."""
    if not is_digits(predictor):
        if number:
            raise PipelineError(
                f"--number reads rows of digits; this model was trained on "
                f"{predictor.dataset['name']}, not digits"
            )
        try:
            image = images.open_image(data, images.UPLOADS)
        except images.NotAnImage as e:
            raise preprocess.BadImage(f"{name}: {e}") from None
        height, width, channels = predictor.input_shape
        return images.to_array(image, (height, width), channels)[np.newaxis] / np.float32(255)
    image = preprocess.read_image(data, name)
    try:
        return preprocess.row_to_mnist(image) if number else preprocess.to_mnist(image)[np.newaxis]
    except preprocess.NoDigit as e:
        raise preprocess.NoDigit(f"{name}: {e}") from None


def image_probabilities(predictor, data, name, number=False, run=None):
    """Image bytes -> float32 probabilities (k, classes) through the predictor (or `run`, a
    function of its input batch): the one path from an upload to an answer, shared by this
    command and the server. One image (k = 1), or with `number` each digit of a row, left
    to right. Raises BadImage or NoDigit naming `name`."""
    x = model_input(predictor, data, name, number)
    return np.asarray((run or predictor.predict)(x), dtype=np.float32)


def prediction(p, classes):
    """Probabilities (classes,) -> {"class", "probability", "runner_up": {"class",
    "probability"}, "probabilities"}: the one answer for an image, from this command and
    from the server's /predict alike (docs/predict.md). Rounded to 6 decimals, about
    float32's precision."""
    first, second = np.argsort(-p, kind="stable")[:2]
    return {
        "class": classes[first],
        "probability": round(float(p[first]), 6),
        "runner_up": {"class": classes[second], "probability": round(float(p[second]), 6)},
        "probabilities": [round(float(v), 6) for v in p],
    }


def number_prediction(probs, classes):
    """Probabilities (k, 10), left to right -> {"number", "digits": [prediction(p), ...]}."""
    digits = [prediction(p, classes) for p in probs]
    return {"number": "".join(d["class"] for d in digits), "digits": digits}


def answer(probs, classes, number=False):
    """image_probabilities' (k, classes) -> the answer: number_prediction with `number`,
    else prediction of the one image."""
    return number_prediction(probs, classes) if number else prediction(probs[0], classes)


def classify(predictor, names, stdin=None, number=False):
    """One result per name, in order: {"file", "class", "probability", "runner_up",
    "probabilities"}, with `number` {"file", "number", "digits": [...]}, or {"file",
    "error"}."""
    classes = predictor.dataset["classes"]
    results = []
    for name in names:
        try:
            data = read_input(name, stdin)
            probs = image_probabilities(predictor, data, label(name), number)
            results.append({"file": label(name), **answer(probs, classes, number)})
        except (preprocess.BadImage, preprocess.NoDigit) as e:
            results.append({"file": label(name), "error": str(e)})
    return results


def file_corrections(collector, names, results, class_name, stdin=None):
    """Files every image that was read (a result without "error") as `class_name`; adds its
    path to the result as "filed", or an "error" when it cannot be filed."""
    for name, result in zip(names, results, strict=True):
        if "error" in result:
            continue
        if stdin is not None:
            stdin.seek(0)
        try:
            path, _ = collector.file(read_input(name, stdin), class_name)
            result["filed"] = str(collector.folder / path)
        except PipelineError as e:  # filed as another class, the folder full
            result["error"] = f"{result['file']}: not filed: {e}"


def format_line(result):
    if "number" in result:
        each = ", ".join(f"{d['class']} p={d['probability']:.3f}" for d in result["digits"])
        return f"{result['file']}: {result['number']} ({each})"
    return (
        f"{result['file']}: {result['class']} (p={result['probability']:.3f}), "
        f"runner-up {result['runner_up']['class']} (p={result['runner_up']['probability']:.3f})"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files; - for stdin")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--model", help="a .onnx or .keras file (default: the exported ONNX)")
    parser.add_argument(
        "--number",
        action="store_true",
        help="read a row of separate digits, left to right (digit datasets)",
    )
    parser.add_argument("--label", metavar="CLASS", help="file each image as this class")
    parser.add_argument("--collect", metavar="DIR", help="the feedback folder --label files in")
    args = parser.parse_args(argv)
    if args.label is not None and args.collect is None:
        raise PipelineError("--label files the images in a feedback folder: give --collect DIR")
    if args.label is not None and args.number:
        raise PipelineError("--label files each image as one class; it cannot go with --number")
    predictor = load_predictor(args.model)
    stdin = None
    if args.label is not None:
        collector = collect.Collector(args.collect, predictor.dataset["classes"])
        collector.check_label(args.label)
        if "-" in args.images:  # read twice: to predict and to file
            stdin = io.BytesIO(sys.stdin.buffer.read())
    results = classify(predictor, args.images, stdin, number=args.number)
    if args.label is not None:
        file_corrections(collector, args.images, results, args.label, stdin)
    if args.json:
        document = {"model": predictor.source, "classes": predictor.dataset["classes"]}
        print(json.dumps({**document, "results": results}, indent=2))
    for result in results:
        if not args.json and ("class" in result or "number" in result):
            print(format_line(result))
        if not args.json and "filed" in result:
            print(f"{result['file']}: filed as {args.label}: {result['filed']}")
        if "error" in result:
            print(f"Error: {result['error']}", file=sys.stderr)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
