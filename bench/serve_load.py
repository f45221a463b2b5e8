"""Load on the draw-a-digit server: concurrent clients posting test-set digits as PNGs.

    python -m bench.serve_load [--model PATH] [--requests 1000] [--clients 8]
                               [--out bench/results/serve_load.json]

Starts `python -m tools.serve` on a free port of 127.0.0.1 (its model: --model, else the
server's default), sends a short warm-up from one client, then REQUESTS posts of the first
MNIST test images as the page sends a drawing (white on black, upscaled to its 280x280
canvas, PNG) from CLIENTS concurrent clients. Prints and writes throughput, client-side
latency percentiles, the server's own time per prediction (the `ms` of each answer: decode,
preprocess, predict), errors (any status but 200), accuracy against the labels, and the
server's RSS (VmRSS of /proc/PID/status) at start, after the warm-up and after the load.
"""

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.common import mnist_dir
from stages import prepare
from stages.common import PipelineError, run_cli, write_json

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 20  # requests before the measured load: first calls allocate the runtime's buffers
CANVAS = 280  # the page's canvas side (tools/static/index.html)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model=None, cwd=ROOT, timeout_s=120):
    """Starts tools.serve on a free port and waits for /health; returns (process, base URL)."""
    port = free_port()
    command = [sys.executable, "-m", "tools.serve", "--port", str(port)]
    if model is not None:
        command += ["--model", str(model)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    # Output to a file, not a pipe: a pipe nobody reads would block a chatty server.
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise PipelineError(
                f"the server exited with {process.returncode}: {log.read().strip()}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(process)
    raise PipelineError(f"the server did not answer /health within {timeout_s} s")


def stop_server(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rss_mib(pid, field="VmRSS"):
    """Resident memory of process `pid` in MiB, from /proc (Linux); VmHWM for the peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # the line is "VmRSS:  123456 kB"
    raise PipelineError(f"no {field} in /proc/{pid}/status")


def encode_png(image, side=CANVAS):
    """uint8 (28, 28) -> PNG bytes of it upscaled to side x side, as the page's canvas."""
    buffer = io.BytesIO()
    Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR).save(buffer, "PNG")
    return buffer.getvalue()


def load_test_digits(n):
    """The first n MNIST test images as PNG bytes, and their labels (n > 10,000 repeats)."""
    images_file, labels_file = prepare.SOURCES["test"]
    images = prepare.read_idx(Path(mnist_dir()) / images_file, 3)
    labels = prepare.read_idx(Path(mnist_dir()) / labels_file, 1)
    index = np.arange(n) % len(images)
    return [encode_png(images[i]) for i in index], labels[index]


def post_all(url, bodies, clients):
    """Posts every body once, `clients` at a time; returns per request (seconds, status,
    digit or None, the server's ms or None), in the order of `bodies`."""
    results = [None] * len(bodies)
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=30) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    response = http.post(
                        "/predict", content=bodies[i], headers={"Content-Type": "image/png"}
                    )
                    status = response.status_code
                    answer = response.json() if status == 200 else {}
                except httpx.HTTPError:
                    status, answer = None, {}
                seconds = time.perf_counter() - start
                results[i] = (seconds, status, answer.get("digit"), answer.get("ms"))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def percentiles(values_ms):
    """p50, p95 and p99 in ms, rounded to 0.1 ms; None each when there are no values."""
    if not len(values_ms):
        return {f"p{q}": None for q in (50, 95, 99)}
    return {f"p{q}": round(float(np.percentile(values_ms, q)), 1) for q in (50, 95, 99)}


def summarise(results, labels, wall_s):
    ok = [r for r in results if r[1] == 200]
    digits = np.array([r[2] if r[2] is not None else -1 for r in results])
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": round(wall_s, 4),
        "throughput_rps": round(len(results) / wall_s, 1),
        "latency_ms": percentiles([1000 * r[0] for r in results]),
        "server_ms": percentiles([r[3] for r in ok]),
        "accuracy": float(np.mean(digits == labels)),
    }


def run(model, requests, clients):
    bodies, labels = load_test_digits(requests)
    process, url = start_server(model)
    try:
        source = httpx.get(f"{url}/health").json()["model"]
        rss = {"start": rss_mib(process.pid)}
        post_all(url, bodies[:WARMUP], clients=1)
        rss["after_warmup"] = rss_mib(process.pid)
        start = time.perf_counter()
        results = post_all(url, bodies, clients)
        wall_s = time.perf_counter() - start
        rss["after_load"] = rss_mib(process.pid)
    finally:
        stop_server(process)
    summary = summarise(results, labels, wall_s)
    summary.update(
        clients=clients,
        model=source,
        server_rss_mib={k: round(v, 1) for k, v in rss.items()},
        cpus=os.cpu_count(),
    )
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file for the server (default: the server's)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = parser.parse_args(argv)
    s = run(args.model, args.requests, args.clients)
    rss = s["server_rss_mib"]
    print(
        f"model: {s['model']}\n"
        f"{s['requests']} requests from {s['clients']} clients in {s['wall_s']} s: "
        f"{s['throughput_rps']} requests/s, errors {s['errors']}\n"
        f"latency ms: p50 {s['latency_ms']['p50']}, p95 {s['latency_ms']['p95']}, "
        f"p99 {s['latency_ms']['p99']}\n"
        f"server ms per prediction (decode, preprocess, predict): "
        f"p50 {s['server_ms']['p50']}, p95 {s['server_ms']['p95']}, p99 {s['server_ms']['p99']}\n"
        f"accuracy on the test digits: {s['accuracy']:.2%}\n"
        f"server RSS MiB: start {rss['start']}, after warm-up {rss['after_warmup']}, "
        f"after load {rss['after_load']}"
    )
    write_json(args.out, s)
    if s["errors"]:
        raise PipelineError(f"{s['errors']} of {s['requests']} requests failed")


if __name__ == "__main__":
    run_cli(main)
