"""Prepare stage: parses fetch's IDX files into model-ready arrays.

Reads   params.yaml `prepare` (train_size, validation_split, test_size) and RAW/ from
        fetch: dataset.json and the IDX files it names.
Writes  OUT/{x,y}_{train,val,test}.npy and OUT/dataset.json in the format of
        stages/dataset.py: images scaled to [0, 1] with a channel axis; when fetch wrote
        feedback, also OUT/{x,y}_feedback_{train,test}.npy, whole (the sizes cut MNIST's).
"""

import argparse
import gzip
import json
import zlib
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from stages import params
from stages.common import PipelineError, run_cli
from stages.dataset import FEEDBACK_SPLITS, save_prepared


class Params(params.Section):
    section = "prepare"

    # A word, not null, for "all": DVC's `-S` rewrites every `null` as an empty value.
    train_size: Annotated[int, Field(ge=1)] | Literal["all"]  # the first N
    validation_split: float = Field(ge=0, lt=1)  # last fraction held out, as Keras does
    test_size: Annotated[int, Field(ge=1)] | Literal["all"]  # the first N


IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one these datasets use


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
    """Reads a gzipped IDX file of `ndim` dimensions (a tuple: any one of them)."""
    ndim = (ndim,) if isinstance(ndim, int) else ndim
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run `dvc repro fetch` first") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise PipelineError(f"{path}: not a complete gzip file ({e}); rerun fetch") from None
    found = data[3] if len(data) > 3 else None
    return parse_idx(data, found if found in ndim else ndim[0], name=path.name)


def scale_images(images):
    """uint8 (N, height, width) or (N, height, width, channels) -> float32
    (N, height, width, channels) in [0, 1]: Conv2D wants a channel axis."""
    if images.ndim == 3:
        images = images[..., np.newaxis]  # grey: one channel
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise PipelineError(
            f"images must have shape (N, height, width) or (N, height, width, 1 or 3), "
            f"got {images.shape}"
        )
    return images.astype(np.float32) / 255.0


def check_labels(labels, images, name, num_classes):
    if labels.shape != (len(images),):
        raise PipelineError(f"{name}: {len(labels)} labels for {len(images)} images")
    if labels.size and labels.max() >= num_classes:
        raise PipelineError(
            f"{name}: label {labels.max()} out of range 0-{num_classes - 1} "
            f"({num_classes} classes in dataset.json)"
        )


def take(images, labels, size, split, key):
    """The first `size` images and labels ("all": every one)."""
    if size == "all":
        return images, labels
    if size > len(images):
        raise PipelineError(
            f"prepare.{key} is {size} but the dataset has {len(images)} {split} images; "
            f"lower it or set it to all"
        )
    return images[:size], labels[:size]


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
    num_classes=10,
):
    """Raw uint8 arrays -> dict of the six model-ready arrays. train_size and test_size
    keep the first N images of each set ("all": all)."""
    check_labels(train_labels, train_images, "train", num_classes)
    check_labels(test_labels, test_images, "test", num_classes)
    train_images, train_labels = take(
        train_images, train_labels, train_size, "training", "train_size"
    )
    test_images, test_labels = take(test_images, test_labels, test_size, "test", "test_size")
    (x_train, y_train), (x_val, y_val) = split_validation(
        scale_images(train_images), train_labels, validation_split
    )
    check_sizes(len(x_train), len(x_val), len(test_images), num_classes)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "x_test": scale_images(test_images),
        "y_test": test_labels,
    }


def check_sizes(n_train, n_val, n_test, num_classes):
    """Stops when a split has fewer images than there are classes (a validation split may
    be empty): too few to learn every class, or to score it."""
    what_to_do = {
        "training": "add images, or raise prepare.train_size",
        "validation": "add images, raise prepare.validation_split, or set it to 0 for none",
        "test": "add images, raise fetch.test_split (a folder) or prepare.test_size",
    }
    for split, n in (("training", n_train), ("validation", n_val), ("test", n_test)):
        if n < num_classes and (n or split != "validation"):
            raise PipelineError(
                f"{n} {split} images for {num_classes} classes: too few for a sound split "
                f"(at least one per class); {what_to_do[split]}"
            )


def prepare_feedback(parts, num_classes):
    """{part: (uint8 images, labels)} of fetch's feedback -> {"x_<part>": float32 images in
    [0, 1], "y_<part>": labels}, scaled as the dataset's own images."""
    arrays = {}
    for part, (images, labels) in parts.items():
        check_labels(labels, images, part, num_classes)
        arrays |= {f"x_{part}": scale_images(images), f"y_{part}": labels}
    return arrays


def load_raw(raw_dir):
    """Reads fetch's output: (info, [train images, train labels, test images, test labels],
    {feedback part: (images, labels)}, empty without feedback)."""
    raw_dir = Path(raw_dir)
    path = raw_dir / "dataset.json"
    try:
        info = json.loads(path.read_text())
        files = info.pop("files")
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run `dvc repro fetch` first") from None
    except (json.JSONDecodeError, KeyError, AttributeError):
        raise PipelineError(f"{path} is not fetch's dataset.json; rerun fetch") from None
    feedback = {part: read_pair(raw_dir, files[part]) for part in FEEDBACK_SPLITS if part in files}
    return info, read_arrays(raw_dir, files), feedback


def read_arrays(raw_dir, files):
    """[train images, train labels, test images, test labels] from the IDX files that
    `files` names ({"train": [images, labels], "test": [...]}) in raw_dir."""
    return [array for split in ("train", "test") for array in read_pair(raw_dir, files[split])]


def read_pair(raw_dir, pair):
    """(images, labels) from the IDX files that `pair` names in raw_dir."""
    images_file, labels_file = (Path(raw_dir) / name for name in pair)
    return read_idx(images_file, (3, 4)), read_idx(labels_file, (1,))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="directory with the four .gz files")
    parser.add_argument("--out", required=True, help="directory for the .npy arrays")
    args = parser.parse_args(argv)
    p = params.load(Params)
    info, raw, feedback = load_raw(args.raw)
    arrays = prepare(*raw, p.train_size, p.validation_split, p.test_size, len(info["classes"]))
    arrays |= prepare_feedback(feedback, len(info["classes"]))
    save_prepared(arrays, info, args.out)
    splits = ("train", "val", "test", *feedback)
    sizes = ", ".join(f"{s.replace('_', ' ')} {len(arrays['y_' + s])}" for s in splits)
    shape = "x".join(map(str, arrays["x_train"].shape[1:]))
    print(f"prepare: wrote {args.out} ({info['name']}, {shape}, {sizes})")


if __name__ == "__main__":
    run_cli(main)
