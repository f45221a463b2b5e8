"""The export stage on a tiny model trained in bfloat16: ONNX and SavedModel in float32,
the parity check and its failure, and `dvc repro` running export only when it should."""

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
import yaml

from stages import export, models, train
from stages.common import run_cli
from tests.conftest import (
    HAVE_MNIST,
    ROOT,
    copy_reproduced,
    edit_params,
    make_prepared,
    ran_stages,
    run_stage,
    sh,
    write_params,
)
from tools import predict

TINY_TRAIN = {
    "train__model": "compact",  # BatchNorm: folded or not, the exports must match
    "train__epochs": 1,
    "train__batch_size": 32,
    "train__mixed_precision": "mixed_bfloat16",  # as trained on a CPU with bf16
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project directory with tiny prepared data (64 test images) and a compact model
    trained for one epoch in mixed_bfloat16."""
    root = tmp_path_factory.mktemp("export")
    make_prepared(root / "prepared")
    write_params(root / "params.yaml", **TINY_TRAIN)
    with contextlib.chdir(root):
        train.main(
            [
                *("--data", "prepared", "--model", "model/model.keras"),
                *("--live", "live", "--checkpoint", "checkpoint"),
            ]
        )
    keras.mixed_precision.set_dtype_policy("float32")  # train sets it globally
    return root


def export_args(root, out):
    return [
        "--model",
        str(root / "model/model.keras"),
        "--data",
        str(root / "prepared"),
        "--out",
        str(out),
    ]


def float32_probs(root):
    model = export.float32_copy(models.load_model(root / "model/model.keras"))
    return model.predict(np.load(root / "prepared/x_test.npy"), verbose=0)


def test_export_writes_float32_onnx_and_saved_model_with_parity_figures(trained, tmp_path, capsys):
    out = tmp_path / "export"
    with contextlib.chdir(trained):
        export.main(export_args(trained, out))
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "model.onnx",
        "parity.json",
        "saved_model",
    ]
    metrics = json.loads((out / "parity.json").read_text())
    assert metrics["precision"] == "mixed_bfloat16"
    for name in ("onnx", "saved_model"):
        parity = metrics["parity"][name]
        assert (parity["images"], parity["agreement"], parity["differing_classes"]) == (64, 1.0, 0)
        assert parity["max_abs_diff"] <= 1e-4
    # The model as trained ran in bfloat16 and the export in float32: close, not equal.
    as_trained = metrics["parity"]["onnx_vs_trained"]
    assert 0 < as_trained["max_abs_diff"] <= 0.05
    accuracy = metrics["accuracy"]
    assert accuracy["onnx"] == accuracy["saved_model"] == accuracy["keras_float32"]
    assert accuracy["onnx"] * 64 == round(accuracy["onnx"] * 64)  # a count of 64 images
    assert metrics["size_bytes"]["onnx"] == (out / "model.onnx").stat().st_size
    assert metrics["size_bytes"]["keras"] == (trained / "model/model.keras").stat().st_size
    # The headline, for `dvc metrics diff` and `dvc exp show`: three numbers.
    assert json.loads((out / "metrics.json").read_text()) == {
        "differing_classes": 0,
        "max_abs_diff": max(metrics["parity"][f]["max_abs_diff"] for f in ("onnx", "saved_model")),
        "max_abs_diff_vs_trained": as_trained["max_abs_diff"],
    }
    assert capsys.readouterr().out.startswith(
        f"export: {out / 'model.onnx'} and {out / 'saved_model'}: 100.00% of 64 test classes agree"
    )

    # The files compute in float32 and give the float32 Keras model's probabilities.
    graph = onnx.load(out / "model.onnx").graph
    types = {t.data_type for t in graph.initializer} - {
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
    }
    assert types == {onnx.TensorProto.FLOAT}  # weights; the integers are shapes
    for value in (*graph.input, *graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    casts = [a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert onnx.TensorProto.BFLOAT16 not in casts and onnx.TensorProto.FLOAT16 not in casts
    x = np.load(trained / "prepared/x_test.npy")
    onnx_probs = predict.load_predictor(out / "model.onnx").predict(x)
    np.testing.assert_allclose(onnx_probs, float32_probs(trained), atol=1e-5)
    import tensorflow as tf

    loaded = tf.saved_model.load(str(out / "saved_model"))  # keeps its variables alive
    assert sorted(loaded.signatures) == ["serve", "serving_default"]  # TF Serving's default
    assert len(loaded.weights) == len(models.load_model(trained / "model/model.keras").weights)
    served = loaded.serve(x).numpy()
    np.testing.assert_allclose(served, onnx_probs, atol=1e-5)


def zero_last_layer(path):
    """Tampers with an ONNX file: the last Dense layer's weights and bias (the tensors
    ending in 10 values) become 0, so every image gets p = 0.1 for every class."""
    model = onnx.load(path)
    for tensor in model.graph.initializer:
        if tensor.dims and tensor.dims[-1] == 10:
            zeros = np.zeros(tuple(tensor.dims), np.float32)
            tensor.CopyFrom(onnx.numpy_helper.from_array(zeros, tensor.name))
    onnx.save(model, path)


def digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_the_same_model_exports_to_the_same_bytes(trained, tmp_path):
    """dvc.lock records each output's hash: a rerun of export must not change one, whatever
    the process's hash seed."""
    for run, seed in (("first", "0"), ("second", "1")):
        out = tmp_path / run
        run_stage("export", *export_args(trained, out), cwd=trained, env={"PYTHONHASHSEED": seed})
    first = digests(tmp_path / "first")
    assert {"model.onnx", "metrics.json", "parity.json", "saved_model/saved_model.pb"} <= set(first)
    assert first == digests(tmp_path / "second")


def test_tampered_onnx_fails_the_parity_check_and_writes_nothing(
    trained, tmp_path, monkeypatch, capsys
):
    original = export.onnx_session

    def tampered_session(path):
        zero_last_layer(path)
        return original(path)

    monkeypatch.setattr(export, "onnx_session", tampered_session)
    out = tmp_path / "export"
    with contextlib.chdir(trained), pytest.raises(SystemExit) as exit_code:
        run_cli(export.main, export_args(trained, out))
    assert exit_code.value.code == 1
    # Uniform probabilities: argmax is class 0 for every image.
    expected = float32_probs(trained)
    differing = int(np.sum(expected.argmax(axis=1) != 0))
    assert differing > 0
    assert capsys.readouterr().err == (
        f"Error: the ONNX export does not match the Keras model: {differing} of 64 test "
        f"images get another class, max |Δp| {np.abs(expected - 0.1).max():.1e} "
        "(export.tolerance: 1e-04)\n"
    )
    assert list(out.iterdir()) == []  # no model.onnx, no saved_model, no temp files


def test_float32_export_further_from_the_bf16_model_than_allowed_fails(trained, tmp_path, capsys):
    # Its own params.yaml, in its own directory: the shared `trained` stays as it is.
    write_params(
        tmp_path / "params.yaml", trained / "params.yaml", export__precision_tolerance=1e-9
    )
    with contextlib.chdir(tmp_path), pytest.raises(SystemExit):
        run_cli(export.main, export_args(trained, tmp_path / "export"))
    error = capsys.readouterr().err
    assert error.startswith(
        "Error: the float32 ONNX export is further from the model as trained than precision "
        "explains: max |Δp| "
    )
    assert error.endswith(" (export.precision_tolerance: 1e-09)\n")


@pytest.mark.parametrize(
    ("preset", "shape", "recolour"),
    [
        ("reference", (28, 28, 1), False),
        ("best", (28, 28, 1), False),
        ("compact", (16, 16, 3), True),
    ],
)
def test_float32_copy_of_each_preset_exports_to_onnx(preset, shape, recolour, tmp_path):
    # best's augmentation layers and RandomRecolour become Identity, or ONNX would get
    # random ops.
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = models.build(preset, shape, 10, recolour)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert isinstance(model.layers[0], models.RandomRecolour) == recolour
    copy = export.float32_copy(model)
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    assert not [layer for layer in copy.layers if type(layer).__name__.startswith("Random")]
    copy.export(str(tmp_path / "m.onnx"), format="onnx", verbose=False)
    x = np.random.default_rng(0).uniform(0, 1, (8, *shape)).astype(np.float32)
    onnx_probs = export.onnx_runner(export.onnx_session(tmp_path / "m.onnx"))(x)
    np.testing.assert_allclose(onnx_probs, copy.predict_on_batch(x), atol=1e-5)


def test_a_bad_export_param_fails_before_tensorflow_loads(tmp_path):
    write_params(tmp_path / "params.yaml", export__tolerance=0)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stages.export", *export_args(tmp_path, "o")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "Error: params.yaml: export.tolerance must be a number > 0, got 0"
    )
    assert "tensorflow" not in result.stderr  # -X importtime lists every imported module


def test_paths_of_the_exports_agree_across_dvc_yaml_and_the_code():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    paths = dvc["vars"][0]
    outs = dvc["stages"]["export"]["outs"]
    assert outs == [
        f"${{exported}}/{export.ONNX_FILE}",
        f"${{exported}}/{export.SAVED_MODEL}",
        {f"${{exported}}/{export.PARITY}": {"cache": False}},
    ]
    assert list(dvc["stages"]["export"]["metrics"][0]) == [f"${{exported}}/{export.METRICS}"]
    # The model registry reads artifacts' paths literally (no ${} there).
    artifacts = dvc["artifacts"]
    assert artifacts["mnist-cnn"]["path"] == paths["model"]
    assert artifacts["mnist-cnn-onnx"]["path"] == f"{paths['exported']}/{export.ONNX_FILE}"
    assert {a["type"] for a in artifacts.values()} == {"model"}


# --- The real pipeline: `dvc repro` in a temporary git repository ------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")
def test_dvc_repro_runs_export_after_train_and_only_when_its_inputs_change(reproduced, tmp_path):
    ran = ran_stages(reproduced[1])
    assert sorted(ran) == ["evaluate", "export", "fetch", "prepare", "train"]
    assert ran.index("export") > ran.index("train")
    repo = copy_reproduced(reproduced, tmp_path / "project")
    metrics = json.loads(sh(repo, "dvc", "metrics", "show", "--json"))
    exported = metrics[""]["data"]["data/export/metrics.json"]["data"]
    assert exported["differing_classes"] == 0
    parity = json.loads((repo / "data/export/parity.json").read_text())["parity"]
    assert parity["onnx"]["images"] == 500  # prepare.test_size
    tracked = sh(repo, "git", "ls-files", "data/export").split()
    assert {"data/export/metrics.json", "data/export/parity.json"} <= set(tracked)
    assert not [f for f in tracked if f.endswith(".onnx") or "saved_model" in f]

    # The model registry without DVC Studio: tag a version with GTO, fetch it by version
    # or by stage with `dvc artifacts get` (from this repository's cache: no remote).
    sh(repo, "gto", "register", "mnist-cnn-onnx", "--version", "v1.0.0")
    sh(repo, "gto", "assign", "mnist-cnn-onnx", "--version", "v1.0.0", "--stage", "prod")
    assert sh(repo, "git", "tag").split() == ["mnist-cnn-onnx#prod#1", "mnist-cnn-onnx@v1.0.0"]
    onnx = (repo / "data/export/model.onnx").read_bytes()
    for how in (["--rev", "v1.0.0"], ["--stage", "prod"]):
        out = tmp_path / f"fetched-{how[1]}.onnx"
        sh(tmp_path, "dvc", "artifacts", "get", str(repo), "mnist-cnn-onnx", *how, "-o", str(out))
        assert out.read_bytes() == onnx

    edit_params(repo / "params.yaml", evaluate__gallery_size=4)
    assert ran_stages(sh(repo, "dvc", "repro")) == ["evaluate"]
    edit_params(repo / "params.yaml", export__batch_size=500)
    assert ran_stages(sh(repo, "dvc", "repro")) == ["export"]
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "repro")
    # A train param reruns export too: test_pipeline's test of train.epochs.
