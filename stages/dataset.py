"""The prepared-data format that prepare writes and train and evaluate read.

One plain .npy file per array (no pickle; memory-mappable): x_{split}.npy holds images,
float32 (N, 28, 28, 1) in [0, 1]; y_{split}.npy holds labels, uint8 (N,), for the splits
train, val and test.
"""

from pathlib import Path

import numpy as np

from stages.common import PipelineError, atomic_dir

NUM_CLASSES = 10  # the digits 0-9
SPLITS = ("train", "val", "test")


def save_prepared(arrays, out_dir):
    """Writes {"x_train": ..., "y_train": ..., ...} to out_dir, all files or none."""
    with atomic_dir(out_dir) as tmp:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)


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
