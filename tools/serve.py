"""Web page and JSON API over the trained model: draw a digit, or upload an image.

    python -m tools.serve [--host 127.0.0.1] [--port 8000] [--model PATH]

GET  /         the page (tools/static/): upload an image, or for a digit dataset draw one
               on a canvas, and see every class's probability live
POST /predict  an image as the raw body (PNG, JPEG, ... as `predict` takes) -> JSON
               {"class": "7", "probability": 0.99, "probabilities": [one per class], "ms": 3.1}
POST /predict?number=1  digit datasets: a row of separate digits, read left to right ->
               {"number": "42", "digits": [{"class": "4", "probability": 0.99,
                "probabilities": [...]}, ...], "ms": 4.0}
GET  /health   {"status": "ok", "model": ..., "revision": ..., "test_accuracy": ...,
                "dataset": ..., "classes": [...], "preparation": "digits" or "resize"}
Errors are JSON {"error": "..."}: 400 not an image (or ?number=1 for a model that is not
of digits), 413 body over 1 MiB, 422 no digit found (a readable image with nothing drawn
on it). The model is loaded before the server
listens (ONNX from data/export when present, else the .keras file); without one the
command stops with `Error: ... run dvc repro` and exit code 1.
"""

import argparse
import html
import json
import subprocess
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from stages.common import PipelineError, run_cli
from tools import preprocess
from tools.paths import dvc_var
from tools.predict import answer, image_probabilities, is_digits, load_predictor

MAX_BODY = 1024 * 1024  # bytes; a digit drawn on the page (280x280 canvas) is a 5-7 KiB PNG
STATIC = Path(__file__).resolve().parent / "static"


class TooLarge(Exception):
    pass


def git_revision(cwd="."):
    """`git rev-parse --short HEAD`, or "unknown" outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # no git installed
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def read_test_accuracy(dvc_yaml="dvc.yaml"):
    """Test accuracy from the evaluate stage's metrics.json (its directory from dvc.yaml's
    vars), or None when there is no dvc.yaml or no metrics yet."""
    try:
        metrics = Path(dvc_var("evaluation", dvc_yaml)) / "metrics.json"
        return float(json.loads(metrics.read_text())["accuracy"])
    except (PipelineError, OSError, KeyError, TypeError, ValueError):
        return None


def render_page(source, revision, accuracy, dataset):
    """index.html with the served model named in its footer, and its dataset."""
    page = (STATIC / "index.html").read_text()
    shown = "unknown" if accuracy is None else f"{100 * accuracy:.2f}%"
    values = {
        "MODEL": source,
        "REVISION": revision,
        "ACCURACY": shown,
        "DATASET": dataset["name"],
        "DATASET_JSON": json.dumps(dataset),  # an attribute app.js reads: classes, drawing
    }
    for key, value in values.items():
        page = page.replace("{{" + key + "}}", html.escape(value))
    return page


async def read_body(request, limit=MAX_BODY):
    """The request body, refused as soon as it is known to exceed `limit` bytes: from
    Content-Length before reading, else while streaming (chunked uploads have none)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def error(status, message):
    return JSONResponse({"error": message}, status_code=status)


def create_app(predictor, revision="unknown", accuracy=None):
    """The FastAPI app serving `predictor` (an object with .predict and .source)."""
    app = FastAPI(title="Classify an image", docs_url=None, redoc_url=None, openapi_url=None)
    page = render_page(predictor.source, revision, accuracy, predictor.dataset)
    classes = predictor.dataset["classes"]
    # One inference at a time: a Keras model is not documented as thread-safe, and on a
    # small CPU parallel runs of a batch of one gain nothing; decoding runs in parallel.
    lock = threading.Lock()

    def run(x):
        with lock:
            return predictor.predict(x)

    def classify(data, number):
        start = time.perf_counter()
        probs = image_probabilities(predictor, data, "upload", number, run=run)
        ms = round(1000 * (time.perf_counter() - start), 2)
        return {**answer(probs, classes, number), "ms": ms}

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/health")
    def health():
        return {
            "status": "ok",
            "model": predictor.source,
            "revision": revision,
            "test_accuracy": accuracy,
            "dataset": predictor.dataset["name"],
            "classes": classes,
            "preparation": predictor.dataset["preparation"],
        }

    @app.post("/predict")
    async def predict(request: Request, number: bool = False):
        try:
            data = await read_body(request)
        except TooLarge:
            return error(413, f"image over the {MAX_BODY // 1024 // 1024} MiB limit")
        if number and not is_digits(predictor):
            return error(
                400,
                f"number=1 reads rows of digits; this model's dataset is "
                f"{predictor.dataset['name']}",
            )
        try:
            return await run_in_threadpool(classify, data, number)
        except preprocess.NoDigit:
            # 422: a valid image whose content cannot be classified (nothing drawn yet).
            return error(422, "no digit found")
        except preprocess.BadImage as e:
            return error(400, str(e))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--model", help="model file (default: data/export's ONNX, else .keras)")
    args = parser.parse_args(argv)
    predictor = load_predictor(args.model)  # before listening: no model, no server
    app = create_app(predictor, git_revision(), read_test_accuracy())
    print(f"serve: {predictor.source} on http://{args.host}:{args.port}", flush=True)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
