"""Training speed of the pipeline's train stage against plain Keras, on this machine.

    python -m bench.train_speed [--smoke] [--out bench/results/train_speed.json]
    python -m bench.train_speed --accuracy SEED [SEED ...]   # full-data accuracy, both sides
    python -m bench.train_speed --determinism                # what deterministic ops cost

In one run, interleaving the sides round by round so that machine noise hits both alike:
1. images/s of the reference model trained by `stages.train.train_model` (the pipeline,
   default params) and by the Keras tutorial's plain `model.fit(numpy, validation_split=0.2)`
   in float32, and their ratio;
2. the float32 and bfloat16 matmul ceilings of this machine (GFLOP/s), and the training
   GFLOP/s of each side as a fraction of them;
3. the pipeline's images/s for batch sizes 32 to 1024;
4. the peak memory (RSS) of each stage, each run in a fresh process;
5. how long `dvc status` and a `dvc repro` with nothing to do take in this checkout.
Prints a table and writes the figures as JSON.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import yaml

from stages import models, params, prepare
from stages.common import write_json
from stages.evaluate import compute_metrics
from stages.train import train_model

ROOT = Path(__file__).resolve().parents[1]
# Per image, for the reference CNN (28x28x1 input): forward = 2 * multiply-adds of
# conv1 (26*26*64*9) + conv2 (24*24*128*576) + dense (18432*128 + 128*10) = 90.4 MFLOP;
# training = forward + backward (2x forward, minus conv1's unneeded input gradient).
FORWARD_FLOP = 2 * (26 * 26 * 64 * 9 + 24 * 24 * 128 * 576 + 18432 * 128 + 128 * 10)
TRAIN_FLOP = 3 * FORWARD_FLOP - 2 * 26 * 26 * 64 * 9

FULL = {
    "n_train": 12_800,
    "rounds": 3,
    "matmul_n": 4096,
    "batch_sizes": [32, 64, 128, 256, 512, 1024],
}
SMOKE = {"n_train": 256, "rounds": 1, "matmul_n": 256, "batch_sizes": [32, 64]}


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.last = time.perf_counter() - self.start


def mnist_dir():
    """The MNIST .gz files: $MNIST_MIRROR, else what the fetch stage wrote."""
    return os.environ.get("MNIST_MIRROR") or str(ROOT / "data" / "raw")


def load_mnist(n_train):
    """The first n_train training images plus a validation fifth, from the MNIST mirror."""
    mirror = mnist_dir()
    x, y, _, _ = prepare.load_raw(mirror)
    n = int(n_train / 0.8)
    return prepare.scale_images(x[:n]), y[:n]


def plain_keras(x, y, batch_size, timer, epochs=2, verbose=0, seed=42):
    """The Keras tutorial, as written: float32, numpy arrays, validation_split=0.2."""
    keras.mixed_precision.set_dtype_policy("float32")
    keras.utils.set_random_seed(seed)
    model = models.reference()
    model.compile(
        loss="categorical_crossentropy",
        optimizer=keras.optimizers.Adadelta(learning_rate=1.0),
        metrics=["accuracy"],
    )
    model.fit(
        x,
        keras.utils.to_categorical(y, 10),
        batch_size=batch_size,
        epochs=epochs,
        validation_split=0.2,
        callbacks=[timer],
        verbose=verbose,
    )
    return model


def train_params(**overrides):
    """The committed train params of params.yaml with overrides, validated."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    return params.validate("train", {**raw, **overrides})


def accuracy_by_seed(seeds, epochs, train_size, out):
    """Test accuracy of the reference model, plain Keras (float32) vs the pipeline's train
    code (committed params: bf16 where the CPU has it), same data, epochs and seed; one
    seed after another, both sides per seed. Rewrites `out` after each run."""
    x, y, x_test, y_test = prepare.load_raw(mnist_dir())
    x, y = prepare.scale_images(x[:train_size]), y[:train_size]
    x_test = prepare.scale_images(x_test)
    (x_tr, y_tr), (x_val, y_val) = prepare.split_validation(x, y, 0.2)
    data = {"x_train": x_tr, "y_train": y_tr, "x_val": x_val, "y_val": y_val}
    results = {"epochs": epochs, "train_images": len(x_tr), "runs": []}
    for seed in seeds:
        for side in ("plain_keras", "pipeline"):
            start = time.perf_counter()
            if side == "plain_keras":
                model = plain_keras(x, y, 128, EpochTimer(), epochs, verbose=2, seed=seed)
            else:
                p = train_params(model="reference", epochs=epochs, seed=seed)
                model, _ = train_model(data, p)
            seconds = time.perf_counter() - start
            probs = model.predict(x_test, batch_size=1000, verbose=0)
            acc = compute_metrics(y_test, probs)["accuracy"]
            run = {"side": side, "seed": seed, "test_accuracy": acc, "train_seconds": seconds}
            print(json.dumps(run), flush=True)
            results["runs"].append(run)
            for name in ("plain_keras", "pipeline"):
                accs = [r["test_accuracy"] for r in results["runs"] if r["side"] == name]
                results[name] = {"mean": float(np.mean(accs)), "std": float(np.std(accs))}
            write_json(out, results)
    return results


def pipeline(x, y, batch_size, timer, validate=True, **overrides):
    """stages.train.train_model with the committed params (batch size overridden);
    validate=False trains on the same images but skips the validation pass."""
    p = train_params(model="reference", epochs=2, batch_size=batch_size, **overrides)
    (x_tr, y_tr), (x_val, y_val) = prepare.split_validation(x, y, 0.2)
    if not validate:
        x_val, y_val = x_val[:0], y_val[:0]
    data = {"x_train": x_tr, "y_train": y_tr, "x_val": x_val, "y_val": y_val}
    train_model(data, p, callbacks=[timer], verbose=0)
    return p


def images_per_second(side, x, y, batch_size):
    """Trains 2 epochs; times the second (no tracing or warm-up), validation included."""
    timer = EpochTimer()
    side(x, y, batch_size, timer)
    return int(len(x) * 0.8) / timer.last


def determinism_cost(n_train=6400, rounds=2):
    """images/s of the pipeline with train.deterministic false and true, interleaved."""
    import functools

    x, y = load_mnist(n_train)
    sides = {flag: functools.partial(pipeline, deterministic=flag) for flag in (False, True)}
    runs = [{str(f): images_per_second(sides[f], x, y, 128) for f in sides} for _ in range(rounds)]
    medians = {f: float(np.median([r[f] for r in runs])) for f in ("False", "True")}
    return {"rounds": runs, "images_per_s": medians, "slowdown": medians["False"] / medians["True"]}


def matmul_gflops(dtype, n, repeats=10):
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype="float32")
    a = tf.cast(a, dtype)
    f = tf.function(lambda m: tf.linalg.matmul(m, m))
    f(a).numpy()  # trace and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


# Runs a stage module, then prints the process's peak RSS. VmHWM, not getrusage: Linux
# carries ru_maxrss across fork+exec, so a child would report the benchmark's own peak.
STAGE_RSS = """
import re, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    print("MAXRSS_KB", re.search(r"VmHWM:\\s+(\\d+)", status).group(1), file=sys.stderr)
"""


def stage_peak_rss(n_train):
    """Runs each stage once in a scratch project on n_train images; returns MiB per stage."""
    mirror = mnist_dir()
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["prepare"]["train_size"] = min(60_000, int(n_train / 0.8))
    doc["train"]["epochs"] = 1
    commands = {
        "fetch": ["stages.fetch", "--out", "raw"],
        "prepare": ["stages.prepare", "--raw", "raw", "--out", "prepared"],
        "train": [
            "stages.train",
            "--data",
            "prepared",
            "--model",
            "model.keras",
            "--live",
            "live",
            "--checkpoint",
            "ckpt",
        ],
        "evaluate": [
            "stages.evaluate",
            "--model",
            "model.keras",
            "--data",
            "prepared",
            "--live",
            "live",
            "--out",
            "eval",
        ],
    }
    rss = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(doc))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MNIST_MIRROR": mirror}
        for stage, argv in commands.items():
            result = subprocess.run(
                [sys.executable, "-c", STAGE_RSS, *argv],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            kb = int(result.stderr.rsplit("MAXRSS_KB", 1)[1].split()[0])
            rss[stage] = round(kb / 1024)
    return rss


def dvc_seconds(*args):
    start = time.perf_counter()
    result = subprocess.run(["dvc", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, result.stdout + result.stderr


def dvc_timings():
    """`dvc status` and a no-op `dvc repro`, only if the checkout is up to date (else n/a)."""
    status_s, out = dvc_seconds("status")
    if "up to date" not in out:
        return {"dvc_status_s": round(status_s, 2), "dvc_repro_noop_s": None}
    repro_s, out = dvc_seconds("repro")
    assert "Running stage" not in out, "the no-op dvc repro ran a stage"
    return {"dvc_status_s": round(status_s, 2), "dvc_repro_noop_s": round(repro_s, 2)}


def run(cfg):
    x, y = load_mnist(cfg["n_train"])
    p = train_params()
    results = {"config": cfg, "train_params": dataclasses.asdict(p), "rounds": []}
    sides = {"plain_keras": plain_keras, "pipeline": pipeline}
    for r in range(cfg["rounds"]):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # alternate who goes first
        results["rounds"].append(
            {name: images_per_second(sides[name], x, y, 128) for name in order}
        )
    for name in sides:
        results[name] = float(np.median([r[name] for r in results["rounds"]]))
    results["ratio"] = results["pipeline"] / results["plain_keras"]
    results["ceiling_gflops"] = {
        d: matmul_gflops(d, cfg["matmul_n"]) for d in ("float32", "bfloat16")
    }
    for name in sides:
        results[f"{name}_gflops"] = results[name] * TRAIN_FLOP / 1e9
    results["batch_sizes"] = {b: images_per_second(pipeline, x, y, b) for b in cfg["batch_sizes"]}
    results["peak_rss_mib"] = stage_peak_rss(cfg["n_train"])
    results.update(dvc_timings())
    return results


def report(r):
    c = r["ceiling_gflops"]
    noop = "n/a (not up to date)" if r["dvc_repro_noop_s"] is None else f"{r['dvc_repro_noop_s']} s"
    lines = [
        f"training images/s, reference CNN, batch 128, {r['config']['n_train']} images, "
        f"median of {r['config']['rounds']} interleaved rounds",
        *(
            f"  {label:24} {r[k]:6.0f}  {r[k + '_gflops']:6.1f} GFLOP/s"
            for label, k in (("plain Keras (float32)", "plain_keras"), ("pipeline", "pipeline"))
        ),
        f"  ratio pipeline / plain   {r['ratio']:6.2f}x",
        f"matmul ceiling: float32 {c['float32']:.0f} GFLOP/s, bfloat16 {c['bfloat16']:.0f} GFLOP/s",
        f"  plain Keras at {r['plain_keras_gflops'] / c['float32']:.0%} of the float32 ceiling; "
        f"pipeline at {r['pipeline_gflops'] / c['float32']:.0%} of float32, "
        f"{r['pipeline_gflops'] / c['bfloat16']:.0%} of bfloat16",
        "pipeline images/s by batch size: "
        + ", ".join(f"{b}: {v:.0f}" for b, v in r["batch_sizes"].items()),
        "peak RSS per stage (MiB): " + ", ".join(f"{s} {m}" for s, m in r["peak_rss_mib"].items()),
        f"dvc status: {r['dvc_status_s']} s; dvc repro with nothing to do: {noop}",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks it runs, in seconds"
    )
    parser.add_argument(
        "--accuracy",
        type=int,
        nargs="+",
        metavar="SEED",
        help="instead: full-data test accuracy, plain Keras vs pipeline, for each seed",
    )
    parser.add_argument("--epochs", type=int, default=12, help="with --accuracy")
    parser.add_argument(
        "--train-size", type=int, default=None, help="with --accuracy: first N training images"
    )
    parser.add_argument(
        "--determinism",
        action="store_true",
        help="instead: measure what train.deterministic: true costs in images/s",
    )
    parser.add_argument("--out", default=None, help="JSON file (default under bench/results/)")
    args = parser.parse_args(argv)
    if args.accuracy:
        out = args.out or "bench/results/accuracy.json"
        r = accuracy_by_seed(args.accuracy, args.epochs, args.train_size, out)
        for name in ("plain_keras", "pipeline"):
            print(f"{name}: mean {r[name]['mean']:.4%}, std {r[name]['std']:.4%}")
        print(f"wrote {out}")
        return
    if args.determinism:
        print(json.dumps(determinism_cost()))
        return
    out = args.out or "bench/results/train_speed.json"
    results = run(SMOKE if args.smoke else FULL)
    print(report(results))
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
