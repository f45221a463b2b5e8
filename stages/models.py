"""The model presets that `train.model` selects (an architecture and its optimizer), and
the .keras file they are saved in.

- reference: the CNN of the R interface to Keras' MNIST example, unchanged (Conv 64 ->
             Conv 128 -> Dense 128, 2,435,210 parameters, Adadelta).
- compact:   two batch-normalised conv blocks (32, 64 filters) and Dense 128, Adam on a
             cosine schedule; built for >= 99.4% test accuracy in a few minutes of CPU.
- best:      compact plus a third conv block, dropout and light data augmentation (shifts,
             rotations, zooms); Adam on a cosine schedule; built for >= 99.6%.
- fast:      Conv 24 5x5 -> Conv 32 3x3 -> one BatchNorm -> Dense 256 (215,322 parameters),
             Adam (betas 0.7, 0.9) on a one-cycle schedule, label smoothing 0.1; built
             for >= 99.0% after one epoch on all 60,000 images, whatever the seed, in
             seconds on a 2-core CPU.

Every model ends in a float32 softmax, so mixed precision never computes the output
probabilities in 16 bits. `build(..., recolour=True)` puts RandomRecolour first
(train.recolour: for compact and best on a few hundred colour images whose colours vary).
"""

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from stages.common import PipelineError, atomic_file

MNIST_INPUT = (28, 28, 1)  # the default dataset's images: height, width, channels
MNIST_TRAIN = 48_000  # its training images less the validation split: what recipes are for


def reference(input_shape, num_classes):
    # The CNN of the R interface to Keras' MNIST example (Conv 64 -> Conv 128 -> Dense 128);
    # not keras-io's current mnist_convnet.py (Conv 32 -> Conv 64).
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            layers.Conv2D(128, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.25),
            layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ],
        name="reference",
    )


@keras.saving.register_keras_serializable(package="stages")
class RandomRecolour(layers.Layer):
    """Active only in training: each colour image gets its three channels in a random
    order, each inverted (1 - x) with probability 1/2: 48 colourings of the same shapes.

    On a few hundred colour images a network otherwise tells its training images apart by
    their colours, which fit them all and say nothing of new ones, and it never learns the
    shapes. The price: colour cannot tell classes apart (train.recolour decides;
    docs/datasets.md)."""

    ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        if not training:
            return images
        n = keras.ops.shape(images)[0]
        pick = keras.random.randint((n,), 0, len(self.ORDERS), seed=self.generator)
        order = keras.ops.take(keras.ops.array(self.ORDERS, "int32"), pick, axis=0)
        mixing = keras.ops.one_hot(order, 3, dtype=images.dtype)  # (n, out, in)
        mixed = keras.ops.einsum("nhwi,noi->nhwo", images, mixing)
        invert = keras.random.uniform((n, 1, 1, 3), seed=self.generator) < 0.5
        return keras.ops.where(invert, 1 - mixed, mixed)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def conv_bn(filters):
    """Conv -> BatchNorm -> ReLU; the conv has no bias because BatchNorm adds one."""
    return [
        layers.Conv2D(filters, 3, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
    ]


def compact(input_shape, num_classes):
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            *conv_bn(32),
            *conv_bn(32),
            layers.MaxPooling2D(),  # (14, 14, 32)
            *conv_bn(64),
            *conv_bn(64),
            layers.MaxPooling2D(),  # (7, 7, 64)
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ],
        name="compact",
    )


def best(input_shape, num_classes):
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
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
            layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ],
        name="best",
    )


def fast(input_shape, num_classes):
    # After tuomaso/train_mnist_fast (99% in one epoch on a GPU): few channels, no padding.
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(24, 5, activation="relu"),  # (24, 24, 24)
            layers.MaxPooling2D(),  # (12, 12, 24)
            layers.Conv2D(32, 3, activation="relu"),  # (10, 10, 32)
            layers.MaxPooling2D(),  # (5, 5, 32)
            # One BatchNorm, not one per block: in bfloat16 on a CPU a BatchNorm after the
            # first block cost ~40% of the step for ~0.1 pp. Momentum 0.9, because the
            # default 0.99 has not settled after one epoch's ~120 steps.
            layers.BatchNormalization(momentum=0.9),
            layers.Flatten(),
            layers.Dense(256, activation="relu"),
            layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ],
        name="fast",
    )


BUILDERS = {"reference": reference, "compact": compact, "best": best, "fast": fast}


@dataclass(frozen=True)
class Recipe:
    """A preset's own training settings: what train.epochs, train.batch_size and
    train.learning_rate mean when params.yaml says `preset`."""

    epochs: int
    batch_size: int
    learning_rate: float  # the optimizer's rate; the peak of its schedule where it has one
    # Of the training loss: the target is 1 - s on the class and s / classes spread over
    # all of them, which keeps one epoch's weights from overconfident steps.
    label_smoothing: float = 0.0

    @property
    def steps_per_epoch(self):
        """On MNIST's 48,000 training images. An epoch of `preset` epochs on fewer images
        passes over them as often as it takes to make about as many steps."""
        return math.ceil(MNIST_TRAIN / self.batch_size)


RECIPES = {
    # The R example's recipe; Adadelta at Keras 2's default rate 1.0 (Keras 3's 0.001
    # barely learns).
    "reference": Recipe(epochs=12, batch_size=128, learning_rate=1.0),
    "compact": Recipe(epochs=6, batch_size=128, learning_rate=0.005),  # 99.45%
    "best": Recipe(epochs=20, batch_size=128, learning_rate=0.005),  # 99.63%
    # 99.17-99.25% on 60,000 images over seeds 1-5; without label smoothing 98.98-99.20%
    "fast": Recipe(epochs=1, batch_size=512, learning_rate=0.01, label_smoothing=0.1),
}
FAST_WARMUP = 0.2  # fraction of the steps spent ramping up to the peak rate


def build(name, input_shape=MNIST_INPUT, num_classes=10, recolour=False):
    """Returns the uncompiled model of preset `name` for images of `input_shape` (height,
    width, channels) and `num_classes` classes, with RandomRecolour first if `recolour`;
    one line when the images are too small for the preset's convolutions and poolings."""
    try:
        model = BUILDERS[name](tuple(input_shape), num_classes)
    except ValueError as e:  # Keras: a layer's output would have a size below 1
        height, width, _ = input_shape
        raise PipelineError(
            f"preset {name} cannot take {height}x{width} images "
            f"({str(e).splitlines()[0][:100]}); choose compact or best, or raise "
            "fetch.image_size"
        ) from None
    if not recolour:
        return model
    return keras.Sequential(
        [keras.Input(shape=input_shape), RandomRecolour(), *model.layers], name=model.name
    )


def optimizer(name, learning_rate, total_steps):
    """The preset's optimizer; learning_rate is its peak rate (params.yaml train.learning_rate)."""
    if name == "reference":
        # The reference recipe's Adadelta at Keras 2's default rate 1.0 (Keras 3's 0.001
        # barely learns).
        return keras.optimizers.Adadelta(learning_rate=learning_rate)
    if name == "fast":
        # One cycle: linear warm-up from 0 to the peak, then cosine down to 0. Short
        # moment memories (betas 0.7, 0.9) suit a run of ~120 steps; Adam's defaults
        # (0.9, 0.999) lost 0.2 pp here.
        warmup = int(FAST_WARMUP * total_steps)
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=total_steps - warmup,
            warmup_target=learning_rate,
            warmup_steps=warmup,
        )
        return keras.optimizers.Adam(learning_rate=schedule, beta_1=0.7, beta_2=0.9)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps)
    return keras.optimizers.Adam(learning_rate=schedule)


# What Keras writes that is not the model: the save time (in metadata.json and the zip
# entries' dates) and Python's id() of objects that layers share (config.json's
# shared_object_id). All three are fixed here, so that the same model always gives the
# same file, and DVC the same hash.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def renumber_shared_objects(config, ids=None):
    """Replaces each shared_object_id (a memory address) by 1, 2, ... in order of first
    appearance; the same object keeps one number, so loading shares it as before."""
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        if "shared_object_id" in config:
            config["shared_object_id"] = ids.setdefault(config["shared_object_id"], len(ids) + 1)
        for value in config.values():
            renumber_shared_objects(value, ids)
    elif isinstance(config, list):
        for value in config:
            renumber_shared_objects(value, ids)
    return config


def reproducible(name, data, recorded=None):
    if name == "metadata.json":
        metadata = json.loads(data)
        metadata.pop("date_saved", None)
        metadata.update(recorded or {})
        return json.dumps(metadata).encode()
    if name == "config.json":
        return json.dumps(renumber_shared_objects(json.loads(data))).encode()
    return data


def save_model(model, path, recorded=None):
    """Writes `model` to the .keras file `path` atomically, byte-for-byte reproducibly;
    `recorded` ({"training": what it was trained with, "dataset": its name, classes and
    preparation}) goes into the file's metadata.json."""
    with atomic_file(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp) as archive:
            entries = [(info, archive.read(info)) for info in archive.infolist()]
        with zipfile.ZipFile(tmp, "w") as archive:
            for info, data in entries:
                fixed = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
                fixed.compress_type = info.compress_type
                archive.writestr(fixed, reproducible(info.filename, data, recorded))


def recorded(path, key):
    """What save_model recorded under `key` ("training" or "dataset") in a .keras file
    ({} if nothing)."""
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("metadata.json")).get(key, {})


def load_model(path):
    """Reads a .keras file; a missing, truncated or corrupt one is a one-line PipelineError."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} not found; run `dvc repro train` first")
    try:
        if not zipfile.is_zipfile(path):  # Keras would say "File not found" of it
            raise zipfile.BadZipFile("not a zip archive")
        return keras.saving.load_model(path)
    # A damaged archive surfaces as any of these, depending on where the damage is.
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PipelineError(
            f"{path} is not a readable Keras model ({reason[:120]}); "
            "restore it with `dvc checkout` or rebuild it with `dvc repro train`"
        ) from None
