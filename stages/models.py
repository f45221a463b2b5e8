"""The model presets that `train.model` selects (an architecture and its optimizer), and
the .keras file they are saved in.

- reference: the Keras MNIST tutorial CNN, unchanged (2,435,210 parameters, Adadelta).
- compact:   two batch-normalised conv blocks (32, 64 filters) and Dense 128, Adam on a
             cosine schedule; built for >= 99.4% test accuracy in a few minutes of CPU.
- best:      compact plus a third conv block, dropout and light data augmentation (shifts,
             rotations, zooms); Adam on a cosine schedule; built for >= 99.6%.

Every model ends in a float32 softmax, so mixed precision never computes the output
probabilities in 16 bits.
"""

import json
import zipfile
from pathlib import Path

import keras
from keras import layers

from stages.common import PipelineError, atomic_file
from stages.dataset import NUM_CLASSES

INPUT_SHAPE = (28, 28, 1)


def reference():
    # keras-io examples/vision/mnist_convnet.py as of the Keras 2 tutorial (Conv 64 -> Conv 128).
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            layers.Conv2D(128, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.25),
            layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
        ],
        name="reference",
    )


def conv_bn(filters):
    """Conv -> BatchNorm -> ReLU; the conv has no bias because BatchNorm adds one."""
    return [
        layers.Conv2D(filters, 3, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
    ]


def compact():
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            *conv_bn(32),
            *conv_bn(32),
            layers.MaxPooling2D(),  # (14, 14, 32)
            *conv_bn(64),
            *conv_bn(64),
            layers.MaxPooling2D(),  # (7, 7, 64)
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
        ],
        name="compact",
    )


def best():
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),
            # Active only in training: small shifts, rotations and zooms, as handwriting varies.
            layers.RandomTranslation(0.1, 0.1, fill_mode="constant"),
            layers.RandomRotation(0.03, fill_mode="constant"),
            layers.RandomZoom(0.1, fill_mode="constant"),
            *conv_bn(32),
            *conv_bn(32),
            layers.MaxPooling2D(),  # (14, 14, 32)
            layers.Dropout(0.1),
            *conv_bn(64),
            *conv_bn(64),
            layers.MaxPooling2D(),  # (7, 7, 64)
            layers.Dropout(0.2),
            *conv_bn(128),
            layers.GlobalAveragePooling2D(),
            layers.Dropout(0.3),
            layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
        ],
        name="best",
    )


BUILDERS = {"reference": reference, "compact": compact, "best": best}


def build(name):
    """Returns the uncompiled model of preset `name`."""
    return BUILDERS[name]()


def optimizer(name, learning_rate, total_steps):
    """The preset's optimizer; learning_rate is its peak rate (params.yaml train.learning_rate)."""
    if name == "reference":
        # The tutorial's Keras 2 Adadelta default was lr=1.0; Keras 3's 0.001 barely learns.
        return keras.optimizers.Adadelta(learning_rate=learning_rate)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps)
    return keras.optimizers.Adam(learning_rate=schedule)


# Keras stamps the save time into metadata.json and into the zip entry of the weights;
# both are fixed here so that the same weights always give the same file (and DVC hash).
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_model(model, path):
    """Writes `model` to the .keras file `path` atomically, byte-for-byte reproducibly."""
    with atomic_file(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp) as archive:
            entries = [(info, archive.read(info)) for info in archive.infolist()]
        with zipfile.ZipFile(tmp, "w") as archive:
            for info, data in entries:
                if info.filename == "metadata.json":
                    metadata = json.loads(data)
                    metadata.pop("date_saved", None)
                    data = json.dumps(metadata).encode()  # noqa: PLW2901
                fixed = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
                fixed.compress_type = info.compress_type
                archive.writestr(fixed, data)


def load_model(path):
    """Reads a .keras file; a missing, truncated or corrupt one is a one-line PipelineError."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} not found; run `dvc repro train` first")
    try:
        return keras.saving.load_model(path)
    # A damaged archive surfaces as any of these, depending on where the damage is.
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PipelineError(
            f"{path} is not a readable Keras model ({reason[:120]}); "
            "restore it with `dvc checkout` or rebuild it with `dvc repro train`"
        ) from None
