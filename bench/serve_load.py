"""Load on the draw-a-digit server: concurrent clients posting test digits as the page does.

    python -m bench.serve_load [--model PATH] [--requests 1000] [--clients 8]
                               [--out bench/results/serve_load.json]

Starts `python -m tools.serve` on a free port of 127.0.0.1, sends a short warm-up, then
REQUESTS posts of the first MNIST test images as the page sends a drawing (white on black,
upscaled to its 280x280 canvas, PNG) from CLIENTS threads. Reports throughput, client
latency and the server's own ms per prediction (p50/p95/p99), errors (any status but 200),
accuracy against the labels, and the server's resident memory (MiB) before and after.
"""

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.common import ROOT, print_machine, test_digits
from stages.common import PipelineError, run_cli, write_json

WARMUP = 20  # requests before the load: the first calls allocate the runtime's buffers
CANVAS = 280  # the page's canvas side (tools/static/index.html)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model=None, cwd=ROOT, timeout_s=120):
    """Starts tools.serve on a free port and waits for /health; returns (process, URL)."""
    port = free_port()
    command = [sys.executable, "-m", "tools.serve", "--port", str(port)]
    command += ["--model", str(model)] if model is not None else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would block the server
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    stop_server(process)
    log.seek(0)
    raise PipelineError(f"the server did not answer /health: {log.read().strip()[-300:]}")


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
            return int(line.split()[1]) / 1024  # "VmRSS:  123456 kB"
    raise PipelineError(f"no {field} in /proc/{pid}/status")


def load_test_digits(n):
    """The first n MNIST test images as canvas-sized PNG bytes, and their labels."""
    images, labels = test_digits()
    index = np.arange(n) % len(images)
    bodies = []
    for i in index:
        buffer = io.BytesIO()
        Image.fromarray(images[i]).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR).save(
            buffer, "PNG"
        )
        bodies.append(buffer.getvalue())
    return bodies, labels[index]


def post(http, body):
    """(seconds, status, digit or None, the server's ms or None) of one request (a digit
    dataset's classes are the digits' names)."""
    start = time.perf_counter()
    try:
        response = http.post("/predict", content=body)
        status, answer = response.status_code, response.json() if response.is_success else {}
    except httpx.HTTPError:
        status, answer = None, {}
    digit = int(answer["class"]) if "class" in answer else None
    return time.perf_counter() - start, status, digit, answer.get("ms")


def post_all(url, bodies, clients):
    """Posts every body once, `clients` at a time, over kept-alive connections as a browser
    does; the results in the order of `bodies`."""
    limits = httpx.Limits(max_connections=clients)
    with httpx.Client(base_url=url, timeout=30, limits=limits) as http:
        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(lambda body: post(http, body), bodies))


def percentiles(values_ms):
    if not len(values_ms):
        return {f"p{q}": None for q in (50, 95, 99)}
    return {f"p{q}": round(float(np.percentile(values_ms, q)), 1) for q in (50, 95, 99)}


def summarise(results, labels, wall_s):
    ok = [r for r in results if r[1] == 200]
    digits = np.array([-1 if r[2] is None else r[2] for r in results])
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
        post_all(url, bodies[:WARMUP], clients=1)
        rss = {"start": round(rss_mib(process.pid), 1)}
        start = time.perf_counter()
        results = post_all(url, bodies, clients)
        wall_s = time.perf_counter() - start
        rss["after_load"] = round(rss_mib(process.pid), 1)
    finally:
        stop_server(process)
    return {**summarise(results, labels, wall_s), "clients": clients, "model": source,
            "server_rss_mib": rss, "cpus": os.cpu_count()}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file for the server (default: the server's)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = parser.parse_args(argv)
    line = print_machine()
    s = {"machine": line, **run(args.model, args.requests, args.clients)}
    print(
        f"model: {s['model']}\n{s['requests']} requests from {s['clients']} clients in "
        f"{s['wall_s']} s: {s['throughput_rps']} requests/s, errors {s['errors']}\n"
        f"latency ms: {s['latency_ms']}\nserver ms per prediction: {s['server_ms']}\n"
        f"accuracy on the test digits: {s['accuracy']:.2%}\n"
        f"server RSS MiB: {s['server_rss_mib']}"
    )
    write_json(args.out, s)
    if s["errors"]:
        raise PipelineError(f"{s['errors']} of {s['requests']} requests failed")


if __name__ == "__main__":
    run_cli(main)
