"""stages/inference.py: the ONNX session and runner, on a graph written here by hand (no
Keras), and the one-line errors for a missing or damaged file."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from stages import inference
from stages.common import PipelineError
from tests.conftest import ROOT


def softmax_graph(path):
    """An ONNX file computing softmax(flatten(x) @ W) for x (N, 28, 28, 1), where W maps the
    sum of row 0 to class 3 and the sum of row 27 to class 5 (every other logit is 0)."""
    weights = np.zeros((784, 10), np.float32)
    weights[0:28, 3] = 1.0  # row 0 of the image
    weights[756:784, 5] = 1.0  # row 27
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["p"], axis=1),
        ],
        "rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 28, 28, 1])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_runner_gives_float32_probabilities_per_image(tmp_path):
    run = inference.onnx_runner(inference.onnx_session(softmax_graph(tmp_path / "m.onnx")))
    x = np.zeros((2, 28, 28, 1))  # float64 on purpose: the runner casts
    x[0, 0, :2] = 1.0  # logit_3 = 2
    x[1, 27, :] = 0.5  # logit_5 = 14
    p = run(x)
    assert p.shape == (2, 10) and p.dtype == np.float32
    first = np.full(10, 1.0) / (9 + np.e**2)
    first[3] = np.e**2 / (9 + np.e**2)  # 0.4508
    second = np.full(10, 1.0) / (9 + np.e**14)
    second[5] = np.e**14 / (9 + np.e**14)
    np.testing.assert_allclose(p, np.stack([first, second]), rtol=1e-5)


def test_missing_and_damaged_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    half = softmax_graph(tmp_path / "whole.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(half[: len(half) // 2])
    messages = []
    for name in ("missing.onnx", "bad.onnx", "cut.onnx"):
        with pytest.raises(PipelineError) as error:
            inference.onnx_session(tmp_path / name)
        messages.append(str(error.value).replace(f"{tmp_path}/", ""))
    assert messages == [
        "missing.onnx not found; run `dvc repro` to train and export it",
        "bad.onnx is not a valid ONNX model; run `dvc repro` to train and export it",
        "cut.onnx is not a valid ONNX model; run `dvc repro` to train and export it",
    ]


def test_importing_it_imports_no_tensorflow():
    code = "import sys, stages.inference; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout == "[]\n"
