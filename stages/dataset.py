"""The prepared-data format that prepare writes and train, evaluate and export read.

One plain .npy file per array (no pickle; memory-mappable): x_{split}.npy holds images,
float32 (N, height, width, channels) in [0, 1]; y_{split}.npy holds labels, uint8 (N,),
indices into the class names, for the splits train, val and test, and, when fetch.feedback
names a folder with images, feedback_train and feedback_test (stages/feedback.py).
dataset.json names the dataset, its classes (label i is classes[i]) and how an upload is
prepared for a model trained on it: "digits" as MNIST's digits were (stages/preprocess.py),
"resize" as every training image was (stages/images.py).
"""

import json
from pathlib import Path

import numpy as np

from stages.common import PipelineError, atomic_dir, write_json

SPLITS = ("train", "val", "test")
FEEDBACK_SPLITS = ("feedback_train", "feedback_test")  # present only with feedback
INFO_FILE = "dataset.json"


def save_prepared(arrays, info, out_dir):
    """Writes {"x_train": ..., "y_train": ..., ...} and the dataset's `info` (name,
    classes, preparation) to out_dir, all files or none."""
    with atomic_dir(out_dir) as tmp:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        write_json(tmp / INFO_FILE, info)


def load_info(prepared_dir):
    """{"name", "classes", "preparation"} of the prepared dataset."""
    path = Path(prepared_dir) / INFO_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run `dvc repro prepare` first") from None
    except json.JSONDecodeError:
        raise PipelineError(f"{path} is not JSON; rebuild it with `dvc repro prepare`") from None


def has_split(prepared_dir, split):
    """Whether prepare wrote `split` (the feedback splits are there only with feedback)."""
    return (Path(prepared_dir) / f"y_{split}.npy").exists()


def load_prepared(prepared_dir, splits=SPLITS):
    """Reads the arrays of `splits`; returns {"x_train": ..., "y_train": ..., ...}."""
    prepared_dir = Path(prepared_dir)
    arrays = {}
    for split in splits:
        for kind in ("x", "y"):
            path = prepared_dir / f"{kind}_{split}.npy"
            if not path.exists():
                raise PipelineError(f"{path} not found; run `dvc repro prepare` first")
            try:
                arrays[f"{kind}_{split}"] = np.load(path, allow_pickle=False)
            # A truncated file fails the size check (ValueError) or ends early (EOFError).
            except (ValueError, EOFError) as e:
                raise PipelineError(
                    f"{path} is not a readable .npy array ({str(e).splitlines()[0][:120]}); "
                    "restore it with `dvc checkout` or rebuild it with `dvc repro prepare`"
                ) from None
    return arrays
