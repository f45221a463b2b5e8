"""The exported model's file name, its ONNX session and the dataset it records: the one
inference path that the export stage's parity check, `predict`, `serve` and the benchmarks
share. In stages/, since a stage uses it: stages import nothing from tools/ or bench/.

Imports onnxruntime only (no TensorFlow, no Keras), so a command that serves the exported
model starts in well under a second.
"""

import json

import numpy as np

from stages.common import PipelineError

ONNX_FILE = "model.onnx"  # in the export stage's output directory
DATASET_KEY = "dataset"  # the ONNX metadata entry: JSON {"name", "classes", "preparation"}
REBUILD = "run `dvc repro` to train and export it"


def onnx_session(path):
    """An onnxruntime session on the CPU for the .onnx file at `path`; a missing or
    damaged file is a one-line PipelineError."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except ort_errors.NoSuchFile:
        raise PipelineError(f"{path} not found; {REBUILD}") from None
    except (
        ort_errors.Fail,
        ort_errors.InvalidProtobuf,
        ort_errors.InvalidGraph,
        ort_errors.InvalidArgument,
        ort_errors.RuntimeException,
    ):
        raise PipelineError(f"{path} is not a valid ONNX model; {REBUILD}") from None


def onnx_dataset(session, path):
    """{"name", "classes", "preparation"} that the export stage recorded in the ONNX file."""
    recorded = session.get_modelmeta().custom_metadata_map.get(DATASET_KEY)
    if recorded is None:
        raise PipelineError(f"{path} records no dataset (class names); {REBUILD}")
    return json.loads(recorded)


def onnx_runner(session):
    """float32 (N, height, width, channels) -> float32 probabilities (N, classes), through
    `session`."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.asarray(x, dtype=np.float32)})[0]
