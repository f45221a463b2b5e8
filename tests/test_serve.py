"""The draw-a-digit server: routes, errors, model info, refusal to start, and the real
server over HTTP, with a tiny model trained here on synthetic data."""

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from stages import models, params, preprocess, train
from stages.common import PipelineError
from stages.dataset import load_prepared
from stages.export import float32_copy
from stages.models import save_model
from stages.train import train_model
from tests.conftest import (
    MNIST_INFO,
    ROOT,
    export_onnx,
    free_port,
    make_prepared,
    served,
    write_params,
)
from tools import collect, predict, serve
from tools.predict import load_predictor

with warnings.catch_warnings():
    # Starlette 1.10 suggests httpx2 for its TestClient; httpx is what the lock file has.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

# Keras' ONNX export probes np.object; NumPy's warning about it is Keras' to fix.
pytestmark = pytest.mark.filterwarnings("ignore:In the future `np.object`:FutureWarning")


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def drawn_one():
    """A 1 as the page draws it: a white vertical stroke on a black 280x280 canvas."""
    canvas = np.zeros((280, 280), np.uint8)
    canvas[50:230, 130:150] = 255
    return png(canvas)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A compact model trained for one epoch on make_prepared's patches."""
    root = tmp_path_factory.mktemp("model")
    write_params(
        root / "params.yaml",
        train__model="compact",
        train__epochs=1,
        train__batch_size=32,
        train__learning_rate=0.005,
    )
    data = load_prepared(make_prepared(root / "prepared"), splits=("train", "val"))
    model = train_model(data, params.load(train.Params, root / "params.yaml"), verbose=0)
    save_model(model, root / "model.keras", {"dataset": MNIST_INFO})
    return root / "model.keras"


@pytest.fixture(scope="module")
def onnx_path(model_path):
    """The same model exported as the export stage does: float32 ONNX (a server on it
    starts in about 2 s, without TensorFlow)."""
    path = model_path.with_suffix(".onnx")
    export_onnx(float32_copy(models.load_model(model_path)), path)
    return path


@pytest.fixture(scope="module")
def predictor(model_path):
    return load_predictor(model_path)


@pytest.fixture
def client(predictor):
    return TestClient(serve.create_app(predictor, revision="abc1234", accuracy=0.98765))


def test_predict_returns_what_the_model_says_about_the_preprocessed_image(client, predictor):
    start = time.perf_counter()
    response = client.post("/predict", content=drawn_one(), headers={"Content-Type": "image/png"})
    elapsed_ms = 1000 * (time.perf_counter() - start)
    assert response.status_code == 200
    answer = response.json()
    assert sorted(answer) == ["class", "ms", "probabilities", "probability", "runner_up"]
    x = preprocess.to_mnist(preprocess.read_image(drawn_one(), "upload"))
    expected = np.asarray(predictor.predict(x[np.newaxis]))[0]
    assert answer["probabilities"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert answer["class"] == str(int(expected.argmax()))
    assert answer["probability"] == pytest.approx(float(expected.max()), abs=1e-6)
    # The server's own time (decode, preprocess, predict) is part of the client's round trip.
    assert 0 < answer["ms"] <= elapsed_ms


def test_the_api_answers_what_predict_prints_for_the_same_image(client, predictor, tmp_path):
    (tmp_path / "one.png").write_bytes(drawn_one())
    [printed] = predict.classify(predictor, [str(tmp_path / "one.png")])
    served = client.post("/predict", content=drawn_one()).json()
    del printed["file"], served["ms"]
    assert served == printed
    assert sorted(served) == ["class", "probabilities", "probability", "runner_up"]


def test_not_an_image_is_400_with_the_reason(client):
    response = client.post("/predict", content=b"hello, not a PNG")
    assert response.status_code == 400
    with pytest.raises(preprocess.BadImage) as reason:
        preprocess.read_image(b"hello, not a PNG", "upload")
    assert response.json() == {"error": str(reason.value)}


def test_a_blank_canvas_is_422_no_digit_found(client):
    response = client.post("/predict", content=png(np.zeros((280, 280))))
    assert response.status_code == 422
    assert response.json() == {"error": "no digit found"}


def test_a_body_over_1_mib_is_413_whether_its_length_is_declared_or_streamed(client):
    over = b"\0" * (serve.MAX_BODY + 1)
    declared = client.post("/predict", content=over)
    assert declared.status_code == 413
    assert declared.json() == {"error": "image over the 1 MiB limit"}
    # A generator body goes out chunked, with no Content-Length: caught while streaming.
    streamed = client.post(
        "/predict", content=(over[i : i + 65536] for i in range(0, len(over), 65536))
    )
    assert streamed.status_code == 413
    # Exactly 1 MiB is allowed through to the image check.
    assert client.post("/predict", content=over[:-1]).status_code == 400


def test_health_names_the_model(client, predictor):
    response = client.get("/health")
    assert response.json() == {
        "status": "ok",
        "model": predictor.source,
        "revision": "abc1234",
        "test_accuracy": 0.98765,
        "dataset": "mnist",
        "classes": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
        "preparation": "digits",
    }


def test_page_names_the_model_and_loads_nothing_from_outside(client, predictor):
    page = client.get("/")
    assert page.status_code == 200
    assert '<code id="revision">abc1234</code>' in page.text
    assert '<span id="accuracy">98.77%</span>' in page.text
    assert f'<code id="model">{predictor.source}</code>' in page.text
    for name in ("app.js", "style.css"):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200
        assert "://" not in response.text  # no CDN: works offline
    assert "://" not in page.text


def test_page_without_metrics_says_unknown(predictor):
    page = TestClient(serve.create_app(predictor)).get("/").text
    assert '<code id="revision">unknown</code>' in page
    assert '<span id="accuracy">unknown</span>' in page


def test_test_accuracy_is_read_from_the_evaluate_dir_named_in_dvc_yaml(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(f"vars:\n  - model: m.keras\n    evaluation: {tmp_path}/eval\n")
    assert serve.read_test_accuracy(dvc_yaml) is None  # no metrics yet
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"accuracy": 0.9912}))
    assert serve.read_test_accuracy(dvc_yaml) == 0.9912
    assert serve.read_test_accuracy(tmp_path / "missing.yaml") is None


def test_git_revision_is_the_short_head_or_unknown(tmp_path):
    assert serve.git_revision(tmp_path) == "unknown"
    git = ["git", "-c", "user.name=T", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    revision = serve.git_revision(tmp_path)
    assert len(revision) >= 7 and head.startswith(revision)


def run_serve(*args, cwd):
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "tools.serve", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_server_refuses_to_start_without_a_model(tmp_path):
    missing = tmp_path / "nowhere" / "model.keras"
    result = run_serve("--model", missing, "--port", free_port(), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"Error: {missing} not found; run `dvc repro` to train and export it\n"
    assert result.stdout == ""
    # The default model, in a project that has not been reproduced yet.
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    result = run_serve("--port", free_port(), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: data/model/model.keras not found; run `dvc repro` to train and export it\n"
    )


def peak_rss_mib(pid):
    """The most memory process `pid` has held, in MiB (Linux: VmHWM in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    (line,) = [line for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(line.split()[1]) / 1024  # "VmHWM:  123456 kB"


@pytest.mark.slow
def test_real_server_answers_over_http_and_never_buffers_a_huge_upload(onnx_path):
    with served(onnx_path) as (process, url):
        answer = httpx.post(f"{url}/predict", content=drawn_one()).json()
        assert answer["class"] in MNIST_INFO["classes"] and len(answer["probabilities"]) == 10
        peak = peak_rss_mib(process.pid)
        huge = 64 * 1024 * 1024
        declared = httpx.post(f"{url}/predict", content=bytes(huge))
        chunked = httpx.post(f"{url}/predict", content=(bytes(65536) for _ in range(huge // 65536)))
        for response in (declared, chunked):
            assert response.status_code == 413
            assert response.json() == {"error": "image over the 1 MiB limit"}
        # Refused after at most 1 MiB read: the server never held the 64 MiB.
        assert peak_rss_mib(process.pid) - peak < 16
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_number_reads_each_digit_of_a_row_left_to_right(client, predictor):
    canvas = np.zeros((280, 560), np.uint8)
    canvas[50:230, 130:150] = 255  # the drawn 1, twice, side by side
    canvas[50:230, 400:420] = 255
    response = client.post("/predict?number=1", content=png(canvas))
    assert response.status_code == 200
    answer = response.json()
    assert sorted(answer) == ["digits", "ms", "number"]
    x = preprocess.to_mnist(preprocess.read_image(drawn_one(), "upload"))
    expected = np.asarray(predictor.predict(x[np.newaxis]))[0]  # each is the 1 alone
    assert answer["number"] == 2 * str(int(expected.argmax()))
    for digit in answer["digits"]:
        assert digit["probabilities"] == pytest.approx(expected.tolist(), abs=1e-6)
        assert digit["probability"] == pytest.approx(float(expected.max()), abs=1e-6)
    blank = client.post("/predict?number=1", content=png(np.zeros((280, 560))))
    assert (blank.status_code, blank.json()) == (422, {"error": "no digit found"})


# --- corrections: POST /feedback on the real server, and predict --label -----------------

CLASSES = "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"


def drawn_at(column):
    """A drawn 1 with its stroke at `column`: each column another image."""
    canvas = np.zeros((280, 280), np.uint8)
    canvas[50:230, column : column + 20] = 255
    return png(canvas)


def files_under(folder):
    """Every file under `folder`, hidden ones too, as relative paths."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def stored_name(label, data, extension="png"):
    return f"{label}/{hashlib.sha256(data).hexdigest()}.{extension}"


@pytest.fixture
def collecting(onnx_path, tmp_path):
    """A real server filing corrections in tmp_path/feedback, at most 5: (URL, folder)."""
    folder = tmp_path / "feedback"
    with served(onnx_path, args=("--collect", folder, "--collect-limit", 5)) as (_, url):
        yield url, folder


@pytest.mark.slow
def test_feedback_files_the_image_as_sent_under_its_class_named_by_its_content(collecting):
    url, folder = collecting
    assert 'data-collect="on"' in httpx.get(url).text  # the page shows its buttons
    image = drawn_one()
    assert httpx.post(f"{url}/predict", content=image).status_code == 200
    name = stored_name("7", image)
    first = httpx.post(f"{url}/feedback?label=7", content=image)
    assert (first.status_code, first.json()) == (201, {"label": "7", "file": name, "new": True})
    again = httpx.post(f"{url}/feedback?label=7", content=image)  # a repeat: stored once
    assert (again.status_code, again.json()) == (200, {"label": "7", "file": name, "new": False})
    photo = io.BytesIO()
    Image.open(io.BytesIO(image)).save(photo, format="JPEG")
    assert httpx.post(f"{url}/feedback?label=1", content=photo.getvalue()).status_code == 201
    assert files_under(folder) == sorted([name, stored_name("1", photo.getvalue(), "jpg")])
    assert (folder / name).read_bytes() == image  # the bytes as sent, not a re-encoding


@pytest.mark.slow
def test_without_collect_feedback_is_404_and_the_page_hides_its_buttons(onnx_path):
    with served(onnx_path) as (_, url):
        response = httpx.post(f"{url}/feedback?label=7", content=drawn_one())
        assert (response.status_code, response.json()) == (
            404,
            {"error": "not collecting; start the server with --collect DIR"},
        )
        assert 'data-collect="off"' in httpx.get(url).text


@pytest.mark.slow
def test_feedback_refuses_what_predict_refuses_and_stores_nothing(collecting):
    url, folder = collecting
    over = bytes(serve.MAX_BODY + 1)
    chunked = (over[i : i + 65536] for i in range(0, len(over), 65536))
    for body in (over, chunked):
        response = httpx.post(f"{url}/feedback?label=1", content=body)
        assert (response.status_code, response.json()) == (
            413,
            {"error": "image over the 1 MiB limit"},
        )
    for body, status in (
        (b"hello", 400),
        (png(np.zeros((4, 4))), 400),
        (png(np.zeros((280, 280))), 422),
    ):
        refused = httpx.post(f"{url}/feedback?label=1", content=body)
        predicted = httpx.post(f"{url}/predict", content=body)
        assert (refused.status_code, refused.json()) == (status, predicted.json())
    assert files_under(folder) == []


@pytest.mark.slow
def test_a_label_that_is_not_a_class_is_422_and_nothing_is_written_anywhere(collecting, tmp_path):
    url, _ = collecting
    for label in ("x", "10", "..", "../1", "1/..", "/tmp/x", "", " 1"):
        response = httpx.post(f"{url}/feedback", params={"label": label}, content=drawn_one())
        assert (response.status_code, response.json()) == (
            422,
            {"error": f"label {label!r} is not one of the model's classes: {CLASSES}"},
        )
    raw = httpx.post(f"{url}/feedback?label=%2e%2e%2f1", content=drawn_one())  # ../1, encoded
    assert raw.status_code == 422
    missing = httpx.post(f"{url}/feedback", content=drawn_one())
    assert (missing.status_code, missing.json()) == (
        422,
        {"error": "no label; POST /feedback?label=CLASS with the image as the body"},
    )
    assert files_under(tmp_path) == []  # nothing in the folder, nothing beside it


@pytest.mark.slow
def test_an_image_filed_as_another_class_is_409(collecting):
    url, folder = collecting
    assert httpx.post(f"{url}/feedback?label=1", content=drawn_one()).status_code == 201
    response = httpx.post(f"{url}/feedback?label=4", content=drawn_one())
    assert (response.status_code, response.json()) == (
        409,
        {"error": "this image is filed as 1 already"},
    )
    assert files_under(folder) == [stored_name("1", drawn_one())]


@pytest.mark.slow
def test_the_limit_holds_under_concurrent_posts_then_every_new_image_is_507(collecting):
    url, folder = collecting
    images = [drawn_at(column) for column in range(20, 240, 20)]  # 11 images, limit 5

    def post(image):
        return httpx.post(f"{url}/feedback?label=1", content=image, timeout=60)

    with ThreadPoolExecutor(len(images)) as pool:
        responses = list(pool.map(post, images))
    assert sorted(r.status_code for r in responses) == [201] * 5 + [507] * 6
    for response in responses:
        if response.status_code == 507:
            assert response.json() == {
                "error": "the feedback folder holds 5 images, its limit; nothing stored"
            }
    stored = [
        stored_name("1", i) for i, r in zip(images, responses, strict=True) if r.status_code == 201
    ]
    assert files_under(folder) == sorted(stored)


@pytest.mark.slow
def test_concurrent_posts_of_one_image_store_it_once(collecting):
    url, folder = collecting
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda _: httpx.post(f"{url}/feedback?label=1", content=drawn_one()), range(8))
        )
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert files_under(folder) == [stored_name("1", drawn_one())]


@pytest.mark.slow
def test_a_class_folder_that_links_out_of_the_folder_is_refused(collecting, tmp_path):
    url, folder = collecting
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "1").symlink_to(outside)
    response = httpx.post(f"{url}/feedback?label=1", content=drawn_one())
    assert response.status_code == 500
    assert response.json() == {
        "error": f"not stored: {folder / '1'} leads out of {folder}; nothing stored"
    }
    assert files_under(outside) == []


@pytest.mark.slow
def test_an_upload_cut_off_midway_leaves_no_file(collecting):
    url, folder = collecting
    image = drawn_one()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(
            f"POST /feedback?label=1 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(image)}"
            "\r\n\r\n".encode()
            + image[: len(image) // 2]
        )
    time.sleep(0.5)
    assert files_under(folder) == []
    assert httpx.post(f"{url}/feedback?label=1", content=image).status_code == 201


def test_a_write_that_fails_midway_leaves_no_file(tmp_path, monkeypatch):
    collector = collect.Collector(tmp_path / "feedback", MNIST_INFO["classes"])

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(collect.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        collector.file(drawn_one(), "1")
    assert files_under(tmp_path) == []


def test_a_temporary_file_a_killed_writer_left_counts_for_nothing(tmp_path):
    collector = collect.Collector(tmp_path, MNIST_INFO["classes"], limit=1)
    (tmp_path / ".incoming-abc.tmp").write_bytes(drawn_one()[:100])
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / ".incoming-def.tmp").write_bytes(b"")
    assert collector.count() == 0
    assert collector.file(drawn_one(), "1") == (stored_name("1", drawn_one()), True)


def test_classes_that_cannot_be_folder_names_cannot_be_collected(tmp_path):
    with pytest.raises(PipelineError) as error:
        collect.Collector(tmp_path, ["T-shirt/top", "Trouser"])
    assert str(error.value) == (
        "class 'T-shirt/top' cannot be a folder name, so its corrections cannot be collected "
        "(folder datasets' classes always can)"
    )
    for bad in ("..", ".hidden", ""):
        with pytest.raises(PipelineError):
            collect.Collector(tmp_path, ["a", bad])


def test_predict_files_a_correction_from_the_command_line(model_path, tmp_path, capsys):
    image = tmp_path / "one.png"
    image.write_bytes(drawn_one())
    folder = tmp_path / "feedback"
    command = [str(image), "--model", str(model_path), "--collect", str(folder)]
    predict.main([*command, "--label", "7"])
    printed = capsys.readouterr().out.splitlines()
    name = stored_name("7", drawn_one())
    assert printed[1] == f"{image}: filed as 7: {folder / name}"
    assert files_under(folder) == [name]
    with pytest.raises(PipelineError) as error:
        predict.main([*command, "--label", "x"])
    assert str(error.value) == f"label 'x' is not one of the model's classes: {CLASSES}"
    with pytest.raises(PipelineError) as error:
        predict.main([str(image), "--label", "7"])
    assert str(error.value) == "--label files the images in a feedback folder: give --collect DIR"
