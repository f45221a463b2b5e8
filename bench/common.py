"""What the benchmarks share: params and data made by the stages' own code, the plain Keras
tutorial's recipe as train params, and the machine line every figure names."""

import os
from pathlib import Path

import yaml

from stages import fetch, params, prepare
from tools.machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = "plain Keras tutorial (R-interface example CNN)"
# The tutorial's script as train params for train_model: the reference CNN in float32,
# Adadelta 1.0, batch 128, one device, no deterministic ops (TensorFlow keeps them on for
# the rest of a process once a pipeline run turned them on).
TUTORIAL_PARAMS = {
    "model": "reference",
    "mixed_precision": "float32",
    "learning_rate": 1.0,
    "batch_size": 128,
    "deterministic": False,
    "distribute": "none",
}


def mnist_dir():
    """The MNIST .gz files: $MNIST_MIRROR, else what the fetch stage wrote."""
    return os.environ.get("MNIST_MIRROR") or str(ROOT / "data" / "raw")


def mnist_arrays(raw=None):
    """[train images, train labels, test images, test labels] of MNIST, as prepare reads
    them, from `raw` (default mnist_dir())."""
    mnist = fetch.load_description(ROOT / "data" / "mnist.yaml")
    return prepare.read_arrays(raw or mnist_dir(), {"train": mnist.train, "test": mnist.test})


def test_digits(n=None, raw=None):
    """The first n MNIST test images, uint8 (n, 28, 28), and labels, as prepare reads them."""
    _, _, images, labels = mnist_arrays(raw)
    return images[:n], labels[:n]


def load_params(schema, **overrides):
    """params.yaml's section of a stage's `schema`, with overrides, validated as the stage
    validates it."""
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    return params.validate(schema, {**doc[schema.section], **overrides})


def load_data(**overrides):
    """The prepare stage's arrays, made by its own function from the raw files with
    params.yaml's prepare section and overrides (train_size, validation_split, test_size)."""
    p = load_params(prepare.Params, **overrides)
    return prepare.prepare(*mnist_arrays(), p.train_size, p.validation_split, p.test_size)


def print_machine(ceilings=True):
    """Prints the line of `python -m tools.machine` that every benchmark starts with (with
    `ceilings`: measured, a few seconds) and returns it for the results file."""
    line = machine_line(ceilings)
    print(line, flush=True)
    return line
