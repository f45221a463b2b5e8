"""The draw-a-digit server: routes, errors, model info, refusal to start, and the load
benchmark's smoke mode, with a tiny model trained here on synthetic data."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import httpx
import numpy as np
import pytest
from PIL import Image

from bench import serve_load
from stages import models, params, train
from stages.dataset import load_prepared
from stages.export import float32_copy
from stages.models import save_model
from stages.train import train_model
from tests.conftest import (
    HAVE_MNIST,
    MNIST_INFO,
    MNIST_MIRROR,
    ROOT,
    export_onnx,
    make_prepared,
    write_params,
)
from tools import predict, preprocess, serve
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
    result = run_serve("--model", missing, "--port", serve_load.free_port(), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"Error: {missing} not found; run `dvc repro` to train and export it\n"
    assert result.stdout == ""
    # The default model, in a project that has not been reproduced yet.
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    result = run_serve("--port", serve_load.free_port(), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: data/model/model.keras not found; run `dvc repro` to train and export it\n"
    )


@pytest.mark.slow
def test_real_server_answers_over_http_and_never_buffers_a_huge_upload(onnx_path):
    process, url = serve_load.start_server(onnx_path)
    try:
        answer = httpx.post(f"{url}/predict", content=drawn_one()).json()
        assert answer["class"] in MNIST_INFO["classes"] and len(answer["probabilities"]) == 10
        peak = serve_load.rss_mib(process.pid, "VmHWM")
        huge = 64 * 1024 * 1024
        declared = httpx.post(f"{url}/predict", content=bytes(huge))
        chunked = httpx.post(f"{url}/predict", content=(bytes(65536) for _ in range(huge // 65536)))
        for response in (declared, chunked):
            assert response.status_code == 413
            assert response.json() == {"error": "image over the 1 MiB limit"}
        # Refused after at most 1 MiB read: the server never held the 64 MiB.
        assert serve_load.rss_mib(process.pid, "VmHWM") - peak < 16
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    finally:
        serve_load.stop_server(process)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")
def test_load_benchmark_smoke_mode_has_no_errors(onnx_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", str(MNIST_MIRROR))
    out = tmp_path / "load.json"
    serve_load.main(
        ["--model", str(onnx_path), "--requests", "40", "--clients", "4", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["requests"] == 40 and result["clients"] == 4
    assert result["errors"] == 0
    assert result["throughput_rps"] == pytest.approx(40 / result["wall_s"], rel=0.01)
    # Each client-side latency holds the server's own time for that request.
    assert result["latency_ms"]["p50"] >= result["server_ms"]["p50"]
    assert result["server_rss_mib"]["start"] > 50  # the server's, not a parse of something else


def test_load_summary_counts_errors_and_takes_percentiles_of_what_came_back():
    # (seconds, status, digit, server ms) per request; labels 0..5.
    results = [(0.010, 200, 0, 2.0), (0.020, 200, 1, 4.0), (0.030, 200, 9, 6.0)]
    results += [(0.040, 200, 3, 8.0), (0.050, 200, 4, 10.0), (0.060, 500, None, None)]
    summary = serve_load.summarise(results, np.arange(6), wall_s=0.5)
    assert summary == {
        "requests": 6,
        "errors": 1,
        "wall_s": 0.5,
        "throughput_rps": 12.0,
        # numpy's linear interpolation over 10..60 ms: p95 at 57.5, p99 at 59.5
        "latency_ms": {"p50": 35.0, "p95": 57.5, "p99": 59.5},
        # over the five answers' 2..10 ms: p95 at index 3.8 -> 9.6, p99 at 3.96 -> 9.92
        "server_ms": {"p50": 6.0, "p95": 9.6, "p99": 9.9},
        "accuracy": 4 / 6,  # 9 for a 2, and no answer for the 5
    }


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
