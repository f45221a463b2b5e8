"""The predict command: output per file, bad inputs, standard input, --json, and which
model it picks. The model is a hand-set template matcher whose answers can be worked out
by hand: a vertical bar is a 1, a horizontal bar a 7."""

import io
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from stages import models
from stages.common import PipelineError
from tests.conftest import MNIST_INFO, ROOT, export_onnx, png_bytes, png_header_only
from tools import predict

WEIGHT = 0.1  # logit per lit pixel that matches a template


def bar_mask(rows, cols):
    mask = np.zeros((28, 28), np.float32)
    mask[rows, cols] = 1.0
    return mask


# What preprocessing makes of a 40 x 8 bar (see test_preprocess): 20 x 4 of ones, centred.
VERTICAL = bar_mask(slice(5, 25), slice(13, 17))
HORIZONTAL = bar_mask(slice(13, 17), slice(5, 25))


def template_model():
    """Flatten -> Dense(10) -> softmax with logit_1 = 0.1 * overlap with VERTICAL and
    logit_7 = 0.1 * overlap with HORIZONTAL; the other logits are 0.

    A vertical bar: logits 8 (class 1, 80 pixels) and 1.6 (class 7, the 16 pixels the
    bars share), so p(1) = e^8 / (e^8 + e^1.6 + 8) = 0.9957 and p(7) = 0.0017."""
    model = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10, "softmax")]
    )
    kernel = np.zeros((784, 10), np.float32)
    kernel[:, 1] = WEIGHT * VERTICAL.ravel()
    kernel[:, 7] = WEIGHT * HORIZONTAL.ravel()
    model.set_weights([kernel, np.zeros(10, np.float32)])
    model(np.zeros((1, 28, 28, 1), np.float32))  # export needs a model that has been called
    return model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """The template model as data/model/model.keras and data/export/model.onnx."""
    root = tmp_path_factory.mktemp("models")
    model = template_model()
    models.save_model(model, root / "data/model/model.keras", {"dataset": MNIST_INFO})
    (root / "data/export").mkdir(parents=True)
    export_onnx(model, root / "data/export/model.onnx")
    return root


def bar_png(path, vertical=True, format="PNG"):
    pixels = np.full((60, 60), 255, np.uint8)
    if vertical:
        pixels[10:50, 26:34] = 0
    else:
        pixels[26:34, 10:50] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format)
    path.write_bytes(buffer.getvalue())
    return path


ONE = "p=0.996), runner-up 7 (p=0.002)"
SEVEN = "p=0.996), runner-up 1 (p=0.002)"


def cli(*args, cwd, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "tools.predict", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        input=stdin,
        capture_output=True,
        check=False,
    )


def test_prints_digit_probability_and_runner_up_per_file(model_files, tmp_path):
    one, seven = bar_png(tmp_path / "one.png"), bar_png(tmp_path / "seven.bmp", False, "BMP")
    onnx = model_files / "data/export/model.onnx"
    result = cli(one, seven, "--model", onnx, cwd=tmp_path)
    assert (result.returncode, result.stderr.decode()) == (0, "")
    assert result.stdout.decode() == f"{one}: 1 ({ONE}\n{seven}: 7 ({SEVEN}\n"


def test_keras_model_gives_the_same_answers(model_files, tmp_path, capsys):
    one = bar_png(tmp_path / "one.gif", format="GIF")
    predict.main([str(one), "--model", str(model_files / "data/model/model.keras")])
    assert capsys.readouterr().out == f"{one}: 1 ({ONE}\n"


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_a_photo_stored_sideways_is_read_upright_from_its_exif(model_files, tmp_path, format):
    """The pixels of a horizontal bar (a 7), tagged by the camera as turned: upright, a 1."""
    pixels = np.full((60, 60), 255, np.uint8)
    pixels[26:34, 10:50] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
    stored = Image.fromarray(pixels)
    (tmp_path / "tagged").write_bytes(png_bytes(stored, format, exif=exif.tobytes()))
    (tmp_path / "untagged").write_bytes(png_bytes(stored, format))
    onnx = model_files / "data/export/model.onnx"
    result = cli("tagged", "untagged", "--model", onnx, cwd=tmp_path)
    assert (result.returncode, result.stderr.decode()) == (0, "")
    answers = [line.split(" (")[0] for line in result.stdout.decode().splitlines()]
    assert answers == ["tagged: 1", "untagged: 7"]  # JPEG's artefacts move the probabilities


def test_each_bad_file_gets_one_line_and_the_others_are_still_predicted(model_files, tmp_path):
    noise_png = png_bytes(
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8))
    )
    files = {
        "one.png": bar_png(tmp_path / "one.png").read_bytes(),
        "notes.txt": b"not an image\n",
        "cut.png": noise_png[: len(noise_png) // 2],
        "dot.png": png_bytes(Image.new("L", (1, 1), 255)),
        "bomb.png": png_header_only(10_000, 10_000),  # 100 MP claimed in 150 bytes
        "blank.png": png_bytes(Image.new("L", (50, 50), 255)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    bar_png(tmp_path / "seven.gif", vertical=False, format="GIF")
    names = ["one.png", "notes.txt", "cut.png", "dot.png", "bomb.png", "missing.png"]
    names += ["blank.png", "seven.gif"]
    result = cli(*names, "--model", model_files / "data/export/model.onnx", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.decode() == f"one.png: 1 ({ONE}\nseven.gif: 7 ({SEVEN}\n"
    assert result.stderr.decode().splitlines() == [
        "Error: notes.txt: not a PNG, JPEG, BMP, GIF or WebP image",
        "Error: cut.png: truncated or corrupt image (image file is truncated)",
        "Error: dot.png: too small (1x1 pixels; at least 8x8)",
        "Error: bomb.png: too large (10000x10000 pixels; the limit is 40 megapixels)",
        "Error: missing.png: no such file",
        "Error: blank.png: no digit found",
    ]


def test_a_dash_reads_the_image_from_standard_input(model_files, tmp_path):
    data = bar_png(tmp_path / "one.png").read_bytes()
    onnx = model_files / "data/export/model.onnx"
    result = cli("-", "--model", onnx, cwd=tmp_path, stdin=data)
    assert (result.returncode, result.stdout.decode()) == (0, f"<stdin>: 1 ({ONE}\n")
    bad = cli("-", "--model", onnx, cwd=tmp_path, stdin=b"")
    assert bad.returncode == 1
    assert bad.stderr.decode() == "Error: <stdin>: not a PNG, JPEG, BMP, GIF or WebP image\n"


def test_json_output_has_every_probability_and_every_error(model_files, tmp_path):
    bar_png(tmp_path / "one.png")
    onnx = model_files / "data/export/model.onnx"
    result = cli("one.png", "missing.png", "--json", "--model", onnx, cwd=tmp_path)
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["model"] == f"onnx {onnx}"
    one, missing = document["results"]
    assert missing == {"file": "missing.png", "error": "missing.png: no such file"}
    # Softmax of logits (0, 8, 0, 0, 0, 0, 0, 1.6, 0, 0), worked out by hand.
    total = np.exp(8) + np.exp(1.6) + 8
    assert one["file"] == "one.png" and one["class"] == "1"
    assert one["probability"] == pytest.approx(np.exp(8) / total, abs=1e-6)
    assert one["runner_up"]["class"] == "7"
    assert one["runner_up"]["probability"] == pytest.approx(np.exp(1.6) / total, abs=1e-6)
    assert one["probabilities"] == pytest.approx(
        [1 / total, np.exp(8) / total, *[1 / total] * 5, np.exp(1.6) / total, 1 / total, 1 / total],
        abs=1e-6,
    )
    assert result.stderr.decode() == "Error: missing.png: no such file\n"


def test_onnx_start_up_imports_no_tensorflow(model_files, tmp_path):
    bar_png(tmp_path / "one.png")
    onnx = model_files / "data/export/model.onnx"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tools.predict", "one.png", "--model", onnx],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert "onnxruntime" in imported
    assert not {"tensorflow", "keras", "jax", "torch"} & imported


def project_with(model_files, tmp_path, *files):
    """A project directory: dvc.yaml, and the given model files from model_files."""
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_files / name, tmp_path / name)
    return tmp_path


def test_default_model_is_the_onnx_export_else_the_keras_model(model_files, tmp_path, monkeypatch):
    monkeypatch.chdir(project_with(model_files, tmp_path))
    with pytest.raises(PipelineError) as error:
        predict.load_predictor()
    assert str(error.value) == (
        "data/model/model.keras not found; run `dvc repro` to train and export it"
    )
    project_with(model_files, tmp_path, "data/model/model.keras")
    assert predict.load_predictor().source == "keras data/model/model.keras"
    project_with(model_files, tmp_path, "data/export/model.onnx")
    predictor = predict.load_predictor()
    assert predictor.source == "onnx data/export/model.onnx"
    x = np.stack([VERTICAL, HORIZONTAL])[..., np.newaxis]
    assert predictor.predict(x).argmax(axis=1).tolist() == [1, 7]
    assert predictor.predict(x).dtype == np.float32


def test_a_corrupt_or_unknown_model_file_is_one_line(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    (tmp_path / "bad.keras").write_bytes(b"garbage")
    (tmp_path / "model.h5").write_bytes(b"garbage")
    messages = []
    for name in ("bad.onnx", "bad.keras", "model.h5"):
        with pytest.raises(PipelineError) as error:
            predict.load_predictor(tmp_path / name)
        messages.append(str(error.value).replace(f"{tmp_path}/", ""))
    assert (
        messages[0] == "bad.onnx is not a valid ONNX model; run `dvc repro` to train and export it"
    )
    # stages.models.load_model's message, with Keras' reason in the brackets.
    assert messages[1].startswith("bad.keras is not a readable Keras model (")
    assert messages[1].endswith(
        "); restore it with `dvc checkout` or rebuild it with `dvc repro train`"
    )
    assert messages[2] == "model.h5: the model must be a .onnx or .keras file"


def test_missing_model_on_the_command_line_is_one_error_line(tmp_path):
    bar_png(tmp_path / "one.png")
    result = cli("one.png", "--model", "nowhere.onnx", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "Error: nowhere.onnx not found; run `dvc repro` to train and export it\n"
    )


def test_number_reads_a_row_left_to_right_with_each_digits_probability(model_files, tmp_path):
    pixels = np.full((60, 140), 255, np.uint8)
    pixels[10:50, 20:28] = 0  # a vertical bar: 1
    pixels[26:34, 70:110] = 0  # a horizontal bar: 7
    Image.fromarray(pixels).save(tmp_path / "row.png")
    bar_png(tmp_path / "one.png")
    onnx = model_files / "data/export/model.onnx"
    result = cli("row.png", "one.png", "--number", "--model", onnx, cwd=tmp_path)
    assert (result.returncode, result.stderr.decode()) == (0, "")
    assert result.stdout.decode() == "row.png: 17 (1 p=0.996, 7 p=0.996)\none.png: 1 (1 p=0.996)\n"
    document = json.loads(
        cli("row.png", "--number", "--json", "--model", onnx, cwd=tmp_path).stdout
    )
    (row,) = document["results"]
    assert (row["file"], row["number"]) == ("row.png", "17")
    total = np.exp(8) + np.exp(1.6) + 8  # as for one bar alone
    assert [d["class"] for d in row["digits"]] == ["1", "7"]
    assert [d["runner_up"]["class"] for d in row["digits"]] == ["7", "1"]
    for d in row["digits"]:
        assert d["probability"] == pytest.approx(np.exp(8) / total, abs=1e-6)
