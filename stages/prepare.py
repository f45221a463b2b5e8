"""Prepare stage: parses the IDX files into model-ready arrays.

Reads   params.yaml `prepare` (train_size, validation_split, test_size) and IN/*.gz from
        fetch.
Writes  OUT/{x,y}_{train,val,test}.npy in the format of stages/dataset.py.
"""

import argparse
import gzip
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from stages import params
from stages.common import PipelineError, run_cli
from stages.dataset import NUM_CLASSES, save_prepared


class Params(params.Section):
    section = "prepare"

    # A word, not null, for "all": DVC's `-S` rewrites every `null` as an empty value.
    train_size: Annotated[int, Field(ge=1, le=60_000)] | Literal["all"]  # the first N
    validation_split: float = Field(ge=0, lt=1)  # last fraction held out, as Keras does
    test_size: Annotated[int, Field(ge=1, le=10_000)] | Literal["all"]  # the first N


IMAGE_SHAPE = (28, 28)
IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one MNIST uses
SOURCES = {  # split -> (images file, labels file)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def parse_idx(data, ndim, name="data"):
    """Parses IDX bytes (magic 0x0000 08 <ndim>, big-endian uint32 dims, uint8 body)."""
    expected_magic = (IDX_UBYTE << 8) | ndim  # 0x801 for labels, 0x803 for images
    if len(data) < 4 + 4 * ndim:
        raise PipelineError(f"{name}: only {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise PipelineError(
            f"{name}: wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}; "
            "delete data/raw and rerun fetch"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise PipelineError(
            f"{name}: header says {'x'.join(map(str, dims))} = {int(np.prod(dims))} values "
            f"but the file holds {body.size}"
        )
    return body.reshape(dims)


def read_idx(path, ndim):
    """Reads a gzipped IDX file."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            return parse_idx(f.read(), ndim, name=path.name)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run `dvc repro fetch` first") from None


def scale_images(images):
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]."""
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise PipelineError(f"images must have shape (N, 28, 28), got {images.shape}")
    # Conv2D wants a channel axis; MNIST is greyscale, so one channel.
    return (images.astype(np.float32) / 255.0)[..., np.newaxis]


def check_labels(labels, images, name):
    if labels.shape != (len(images),):
        raise PipelineError(f"{name}: {len(labels)} labels for {len(images)} images")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise PipelineError(f"{name}: label {labels.max()} out of range 0-9")


def split_validation(x, y, validation_split):
    """Holds out the last `validation_split` of (x, y), unshuffled, exactly as
    keras Model.fit(validation_split=...) does: split_at = floor(N * (1 - split))."""
    split_at = int(np.floor(len(x) * (1.0 - validation_split)))
    if split_at == 0:
        raise PipelineError(
            f"validation_split {validation_split} leaves no training images out of {len(x)}; "
            "lower prepare.validation_split or raise prepare.train_size"
        )
    return (x[:split_at], y[:split_at]), (x[split_at:], y[split_at:])


def prepare(
    train_images,
    train_labels,
    test_images,
    test_labels,
    train_size,
    validation_split,
    test_size="all",
):
    """Raw uint8 arrays -> dict of the six model-ready arrays. train_size and test_size
    keep the first N images of each set ("all" or None: all)."""
    check_labels(train_labels, train_images, "train")
    check_labels(test_labels, test_images, "test")
    train_size, test_size = (None if n == "all" else n for n in (train_size, test_size))
    train_images, train_labels = train_images[:train_size], train_labels[:train_size]
    test_images, test_labels = test_images[:test_size], test_labels[:test_size]
    (x_train, y_train), (x_val, y_val) = split_validation(
        scale_images(train_images), train_labels, validation_split
    )
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "x_test": scale_images(test_images),
        "y_test": test_labels,
    }


def load_raw(raw_dir):
    """Reads the four IDX files from raw_dir."""
    raw_dir = Path(raw_dir)
    arrays = []
    for images_file, labels_file in SOURCES.values():
        arrays += [read_idx(raw_dir / images_file, 3), read_idx(raw_dir / labels_file, 1)]
    return arrays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="directory with the four .gz files")
    parser.add_argument("--out", required=True, help="directory for the .npy arrays")
    args = parser.parse_args(argv)
    p = params.load(Params)
    arrays = prepare(*load_raw(args.raw), p.train_size, p.validation_split, p.test_size)
    save_prepared(arrays, args.out)
    sizes = ", ".join(f"{s} {len(arrays['y_' + s])}" for s in ("train", "val", "test"))
    print(f"prepare: wrote {args.out} ({sizes})")


if __name__ == "__main__":
    run_cli(main)
