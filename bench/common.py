"""What the benchmarks share: data and params exactly as the pipeline makes them, and the
plain Keras tutorial they are compared against."""

import os
import platform
from pathlib import Path

import keras
import yaml

from stages import models, params, prepare
from stages.dataset import NUM_CLASSES

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = "plain Keras tutorial (R-interface example CNN)"


def mnist_dir():
    """The MNIST .gz files: $MNIST_MIRROR, else what the fetch stage wrote."""
    return os.environ.get("MNIST_MIRROR") or str(ROOT / "data" / "raw")


def section_params(section, **overrides):
    """params.yaml's `section` with overrides, validated as the stage validates it."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())[section]
    return params.validate(section, {**raw, **overrides})


def load_data(**overrides):
    """The arrays the prepare stage writes, made by its own function from the raw files,
    with params.yaml's prepare section (overrides: train_size, validation_split)."""
    p = section_params("prepare", **overrides)
    return prepare.prepare(*prepare.load_raw(mnist_dir()), p.train_size, p.validation_split)


def plain_tutorial(x, y, epochs, seed, callbacks=(), verbose=0):
    """The tutorial as written: the reference CNN in float32, fit on numpy arrays with
    validation_split=0.2, Adadelta at learning rate 1.0 (Keras 2's default), batch 128."""
    keras.mixed_precision.set_dtype_policy("float32")
    keras.utils.set_random_seed(seed)
    model = models.reference()
    model.compile(
        loss="categorical_crossentropy",
        optimizer=keras.optimizers.Adadelta(learning_rate=1.0),
        metrics=["accuracy"],
    )
    model.fit(
        x,
        keras.utils.to_categorical(y, NUM_CLASSES),
        batch_size=128,
        epochs=epochs,
        validation_split=0.2,
        callbacks=list(callbacks),
        verbose=verbose,
    )
    return model


def machine():
    """CPU model and core count, e.g. 'Intel(R) Xeon(R) Processor, 2 cores'."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"
