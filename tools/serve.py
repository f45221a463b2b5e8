"""Web page and JSON API over the trained model: draw a digit, or upload an image.

    python -m tools.serve [--host 127.0.0.1] [--port 8000] [--model PATH]
                          [--collect DIR [--collect-limit N]]

GET  /         the page (tools/static/): upload an image, or for a digit dataset draw one
               on a canvas, and see every class's probability live
POST /predict  an image as the raw body (PNG, JPEG, ... as `predict` takes) -> JSON
               {"class": "7", "probability": 0.99, "probabilities": [one per class], "ms": 3.1}
POST /predict?number=1  digit datasets: a row of separate digits, read left to right ->
               {"number": "42", "digits": [{"class": "4", "probability": 0.99,
                "probabilities": [...]}, ...], "ms": 4.0}
GET  /health   {"status": "ok", "model": ..., "revision": ..., "test_accuracy": ...,
                "dataset": ..., "classes": [...], "preparation": "digits" or "resize"}
POST /feedback?label=7  with --collect DIR: the image as sent to /predict, filed as a
               correction in DIR/<label>/<sha256>.<format> (tools/collect.py) -> 201
               {"label": "7", "file": "7/<sha256>.png", "new": true}, or 200 with
               "new": false for an image filed already; the page then offers "right" and
               "wrong, it is: ..." buttons after each answer. Without --collect: 404.
Errors are JSON {"error": "..."}: 400 not an image (or ?number=1 for a model that is not
of digits), 413 body over 1 MiB, 422 no digit found (a readable image with nothing drawn
on it). /feedback's own: 404 collecting is off, 422 a label that is not one of the
model's classes, 409 the image is filed under another class, 507 DIR holds
--collect-limit images. The model is loaded before the server listens (ONNX from
data/export when present, else the .keras file); without one the command stops with
`Error: ... run dvc repro` and exit code 1.
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

from stages import preprocess
from stages.common import PipelineError, run_cli
from tools import collect
from tools.paths import dvc_var
from tools.predict import answer, image_probabilities, is_digits, load_predictor, model_input

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


def render_page(source, revision, accuracy, dataset, collecting=False):
    """index.html with the served model named in its footer, its dataset, and whether
    it collects corrections (the page shows its buttons only then)."""
    page = (STATIC / "index.html").read_text()
    shown = "unknown" if accuracy is None else f"{100 * accuracy:.2f}%"
    values = {
        "MODEL": source,
        "REVISION": revision,
        "ACCURACY": shown,
        "DATASET": dataset["name"],
        "DATASET_JSON": json.dumps(dataset),  # an attribute app.js reads: classes, drawing
        "COLLECT": "on" if collecting else "off",
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


def create_app(predictor, revision="unknown", accuracy=None, collector=None):
    """The FastAPI app serving `predictor` (an object with .predict and .source); with a
    collect.Collector, POST /feedback files corrections through it."""
    app = FastAPI(title="Classify an image", docs_url=None, redoc_url=None, openapi_url=None)
    page = render_page(
        predictor.source, revision, accuracy, predictor.dataset, collector is not None
    )
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

    def file_correction(data, label):
        model_input(predictor, data, "upload")  # what /predict would refuse is refused here
        return collector.file(data, label)

    @app.post("/feedback")
    async def feedback(request: Request, label: str | None = None):
        if collector is None:
            return error(404, "not collecting; start the server with --collect DIR")
        if label is None:
            return error(422, "no label; POST /feedback?label=CLASS with the image as the body")
        try:
            collector.check_label(label)
            data = await read_body(request)
            path, new = await run_in_threadpool(file_correction, data, label)
        except TooLarge:
            return error(413, f"image over the {MAX_BODY // 1024 // 1024} MiB limit")
        except collect.UnknownLabel as e:
            return error(422, str(e))
        except preprocess.NoDigit:
            return error(422, "no digit found")
        except preprocess.BadImage as e:
            return error(400, str(e))
        except collect.Conflict as e:
            return error(409, str(e))
        except collect.Full as e:
            return error(507, str(e))
        except (PipelineError, OSError) as e:  # a link out of DIR; a disk error
            return error(500, f"not stored: {e}")
        return JSONResponse({"label": label, "file": path, "new": new}, 201 if new else 200)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--model", help="model file (default: data/export's ONNX, else .keras)")
    parser.add_argument(
        "--collect", metavar="DIR", help="file corrections from the page in DIR/<class>/"
    )
    parser.add_argument(
        "--collect-limit",
        type=int,
        default=collect.LIMIT,
        metavar="N",
        help=f"the most images DIR may hold (default {collect.LIMIT:,})",
    )
    args = parser.parse_args(argv)
    predictor = load_predictor(args.model)  # before listening: no model, no server
    collector = None
    if args.collect:
        collector = collect.Collector(
            args.collect, predictor.dataset["classes"], args.collect_limit
        )
    app = create_app(predictor, git_revision(), read_test_accuracy(), collector)
    print(f"serve: {predictor.source} on http://{args.host}:{args.port}", flush=True)
    if collector is not None:
        print(f"serve: filing corrections in {args.collect}", flush=True)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
