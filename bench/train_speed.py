"""Training speed on this machine: the pipeline's train code against the plain Keras tutorial.

    python -m bench.train_speed [--smoke] [--out FILE]     # make bench: the table below
    python -m bench.train_speed --variants [NAME ...]      # where the time goes

Default: in one run, interleaving the sides round by round so that machine noise hits both:
1. images/s of the reference model trained by the train stage's `train_model` (params.yaml)
   and by the plain tutorial (float32, numpy, validation_split=0.2), and their ratio;
2. GFLOP/s of each side, from the FLOPs TensorFlow's profiler counts in the model's graph,
   against this machine's float32 and bfloat16 matmul speed;
3. the pipeline's images/s for several batch sizes;
4. each stage's peak memory (RSS) and how long `dvc status` and a `dvc repro` with nothing
   to do take, from a real `dvc repro` of dvc.yaml in a scratch copy of the project.
--variants: one setting changed at a time (VARIANTS), each variant in a fresh process
(thread and oneDNN settings are read once, when TensorFlow starts), in a rotated order
round after round; the table gives median images/s and the ratio to the plain tutorial.
Speeds time the second of two epochs (no tracing, no warm-up); test accuracy and
time to accuracy are bench/time_to_accuracy.py's.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import yaml

from bench.common import ROOT, TUTORIAL, load_data, mnist_dir, plain_tutorial, section_params
from stages import models
from stages.common import write_json
from stages.train import train_model

FULL = {"n_train": 12_800, "rounds": 3, "matmul_n": 4096, "batch_sizes": [32, 128, 512, 1024]}
SMOKE = {"n_train": 256, "rounds": 1, "matmul_n": 256, "batch_sizes": [32, 64]}
VARIANTS_FULL, VARIANTS_SMOKE = {"n_train": 6_400, "rounds": 3}, {"n_train": 256, "rounds": 1}
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
# name -> (what changes, environment of its fresh process, train params or "plain"/"tfdata")
VARIANTS = {
    "plain": (TUTORIAL + ": float32, numpy", {}, "plain"),
    "f32": ("pipeline train code, float32", {}, {"mixed_precision": "float32"}),
    "f32_noval": ("  ... without the validation pass", {}, {"validate": False}),
    "f32_tfdata": ("  ... fed by tf.data (shuffle, batch, prefetch)", {}, "tfdata"),
    "f32_1thread": ("  ... with 1 intra-op and 1 inter-op thread", ONE_THREAD, {}),
    "f32_no_onednn": ("  ... with oneDNN off", {"TF_ENABLE_ONEDNN_OPTS": "0"}, {}),
    "f32_xla": ("  ... compiled by XLA (jit_compile: true)", {}, {"jit_compile": True}),
    "bf16": ("pipeline train code, mixed_bfloat16", {}, {"mixed_precision": "mixed_bfloat16"}),
    "bf16_noval": (
        "  ... without the validation pass",
        {},
        {"mixed_precision": "mixed_bfloat16", "validate": False},
    ),
    "bf16_xla": (
        "  ... compiled by XLA (jit_compile: true)",
        {},
        {"mixed_precision": "mixed_bfloat16", "jit_compile": True},
    ),
    "bf16_determinism": (
        "  ... with deterministic ops (train.deterministic)",
        {},
        {"mixed_precision": "mixed_bfloat16", "deterministic": True},
    ),
}


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.last = time.perf_counter() - self.start


def pipeline(data, batch_size, timer, validate=True, **overrides):
    """The train stage's train_model, params.yaml's train section; 2 epochs."""
    p = section_params("train", model="reference", epochs=2, batch_size=batch_size, **overrides)
    if not validate:  # same training images, no validation pass
        data = {**data, "x_val": data["x_val"][:0], "y_val": data["y_val"][:0]}
    train_model(data, p, callbacks=[timer], verbose=0)


def tutorial(data, batch_size, timer):
    """The plain tutorial on the same images: it splits off the validation fifth itself."""
    x = np.concatenate([data["x_train"], data["x_val"]])
    y = np.concatenate([data["y_train"], data["y_val"]])
    plain_tutorial(x, y, epochs=2, seed=42, callbacks=[timer])


def tfdata(data, batch_size, timer, **overrides):
    """The pipeline's model and compile step, fed by tf.data from memory instead of numpy."""
    import tensorflow as tf

    from stages import train

    p = section_params("train", model="reference", batch_size=batch_size, **overrides)
    train.seed_everything(p.seed, p.deterministic)
    keras.mixed_precision.set_dtype_policy(p.mixed_precision)

    def batches(x, y, shuffle):
        ds = tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, 10)))
        return (ds.shuffle(len(x), seed=p.seed) if shuffle else ds).batch(batch_size).prefetch(2)

    model = train.compile_model(p, int(np.ceil(len(data["x_train"]) / batch_size)))
    model.fit(
        batches(data["x_train"], data["y_train"], True),
        epochs=2,
        validation_data=batches(data["x_val"], data["y_val"], False),
        callbacks=[timer],
        verbose=0,
    )


def images_per_second(side, data, batch_size, **overrides):
    """Trains 2 epochs; images/s of the second, validation included."""
    timer = EpochTimer()
    side(data, batch_size, timer, **overrides)
    return len(data["x_train"]) / timer.last


def training_flop_per_image(model):
    """TensorFlow's profiler's FLOP count of one image's forward pass, times 3 (the
    backward pass costs about twice the forward: gradients of inputs and of weights)."""
    import tensorflow as tf

    spec = tf.TensorSpec((1, *models.INPUT_SHAPE), tf.float32)
    graph = tf.function(model).get_concrete_function(spec).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return 3 * tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops


def matmul_gflops(dtype, n, repeats=10):
    import tensorflow as tf

    a = tf.cast(tf.random.normal((n, n)), dtype)
    f = tf.function(lambda m: tf.linalg.matmul(m, m))
    f(a).numpy()  # trace and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


# Imported by every Python process of the scratch project (PYTHONPATH): a stage process
# (`python -m stages.X`) writes its peak RSS on exit. VmHWM, not getrusage: Linux carries
# ru_maxrss across fork+exec, so a stage would report the peak of dvc, its parent.
RSS_HOOK = """
import atexit, os, re, sys
from pathlib import Path

def _write_peak_rss():
    main = Path(sys.argv[0])
    if main.parent.name == "stages":
        kb = re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)
        Path(os.environ["BENCH_RSS_DIR"], main.stem).write_text(kb)

atexit.register(_write_peak_rss)
"""


def pipeline_rss_and_dvc_times(n_train):
    """Runs dvc.yaml with `dvc repro` in a scratch DVC copy (no git) of the project on n_train
    images and 1 epoch; returns each stage's peak RSS (MiB) and the seconds of `dvc status`
    and of a `dvc repro` with nothing to do, there."""
    with tempfile.TemporaryDirectory() as tmp:
        project, hook, rss_dir = Path(tmp, "project"), Path(tmp, "hook"), Path(tmp, "rss")
        for d in (project, hook, rss_dir):
            d.mkdir()
        shutil.copytree(ROOT / "stages", project / "stages", ignore=shutil.ignore_patterns("__py*"))
        shutil.copy2(ROOT / "dvc.yaml", project)
        doc = yaml.safe_load((ROOT / "params.yaml").read_text())
        doc["prepare"]["train_size"] = n_train
        doc["train"]["epochs"] = 1
        (project / "params.yaml").write_text(yaml.safe_dump(doc))
        (hook / "sitecustomize.py").write_text(RSS_HOOK)
        env = {
            **os.environ,
            "PYTHONPATH": str(hook),
            "BENCH_RSS_DIR": str(rss_dir),
            "MNIST_MIRROR": mnist_dir(),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }

        def sh(*cmd):
            start = time.perf_counter()
            out = subprocess.run(
                cmd, cwd=project, env=env, capture_output=True, text=True, check=False
            )
            if out.returncode != 0:
                sys.exit(f"Error: {' '.join(cmd)} failed in the scratch project:\n{out.stderr}")
            return time.perf_counter() - start, out.stdout

        sh("dvc", "init", "-q", "--no-scm")
        sh("dvc", "repro", "-q")
        status_s, _ = sh("dvc", "status")
        noop_s, out = sh("dvc", "repro")
        assert "Running stage" not in out, f"the second dvc repro ran a stage:\n{out}"
        rss = {p.name: round(int(p.read_text()) / 1024) for p in sorted(rss_dir.iterdir())}
    return {"peak_rss_mib": rss, "dvc_status_s": status_s, "dvc_repro_noop_s": noop_s}


def run(cfg):
    data = load_data(train_size=int(cfg["n_train"] / 0.8), validation_split=0.2)
    sides = {"plain_keras": tutorial, "pipeline": pipeline}
    results = {"config": cfg, "train_params": section_params("train").model_dump(), "rounds": []}
    for r in range(cfg["rounds"]):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # alternate who goes first
        results["rounds"].append({n: images_per_second(sides[n], data, 128) for n in order})
    for name in sides:
        results[name] = float(np.median([r[name] for r in results["rounds"]]))
    results["ratio"] = results["pipeline"] / results["plain_keras"]
    results["train_mflop_per_image"] = training_flop_per_image(models.reference()) / 1e6
    results["ceiling_gflops"] = {
        d: matmul_gflops(d, cfg["matmul_n"]) for d in ("float32", "bfloat16")
    }
    for name in sides:
        results[f"{name}_gflops"] = results[name] * results["train_mflop_per_image"] / 1e3
    results["batch_sizes"] = {b: images_per_second(pipeline, data, b) for b in cfg["batch_sizes"]}
    results.update(pipeline_rss_and_dvc_times(int(cfg["n_train"] / 0.8)))
    return results


def report(r):
    c = r["ceiling_gflops"]
    rows = (("plain Keras (float32)", "plain_keras"), ("pipeline", "pipeline"))
    return "\n".join(
        [
            f"training images/s, reference CNN, batch 128, {r['config']['n_train']} images, "
            f"median of {r['config']['rounds']} interleaved rounds",
            *(f"  {label:24} {r[k]:6.0f}  {r[k + '_gflops']:6.1f} GFLOP/s" for label, k in rows),
            f"  ratio pipeline / plain   {r['ratio']:6.2f}x",
            f"training FLOP per image (TensorFlow profiler, 3x forward): "
            f"{r['train_mflop_per_image']:.1f} M",
            f"matmul ceiling: float32 {c['float32']:.0f} GFLOP/s, "
            f"bfloat16 {c['bfloat16']:.0f} GFLOP/s",
            f"  plain Keras at {r['plain_keras_gflops'] / c['float32']:.0%} of the float32 "
            f"ceiling; pipeline at {r['pipeline_gflops'] / c['float32']:.0%} of float32, "
            f"{r['pipeline_gflops'] / c['bfloat16']:.0%} of bfloat16",
            "pipeline images/s by batch size: "
            + ", ".join(f"{b}: {v:.0f}" for b, v in r["batch_sizes"].items()),
            "peak RSS per stage (MiB): "
            + ", ".join(f"{s} {m}" for s, m in r["peak_rss_mib"].items()),
            f"dvc status: {r['dvc_status_s']:.2f} s; "
            f"dvc repro with nothing to do: {r['dvc_repro_noop_s']:.2f} s",
        ]
    )


def measure_variant(name, n_train):
    """In this process: images/s of one variant."""
    _, _, how = VARIANTS[name]
    data = load_data(train_size=int(n_train / 0.8), validation_split=0.2)
    if how == "plain":
        return images_per_second(tutorial, data, 128)
    if how == "tfdata":
        return images_per_second(tfdata, data, 128, mixed_precision="float32")
    return images_per_second(pipeline, data, 128, **{"mixed_precision": "float32", **how})


def run_variants(cfg, names):
    rounds = []
    for r in range(cfg["rounds"]):
        rounds.append({})
        for name in names[r:] + names[:r]:  # rotate who goes first
            cmd = [sys.executable, "-m", "bench.train_speed", "--variant", name]
            out = subprocess.run(
                [*cmd, "--n-train", str(cfg["n_train"])],
                env={**os.environ, **VARIANTS[name][1]},
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                sys.exit(f"Error: variant {name} failed:\n{out.stderr[-3000:]}")
            rounds[-1][name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"round {r + 1}: " + ", ".join(f"{n} {rounds[-1][n]:.0f}" for n in names))
    medians = {n: float(np.median([r[n] for r in rounds])) for n in names}
    return {"config": cfg, "rounds": rounds, "images_per_s": medians}


def report_variants(r):
    ips = r["images_per_s"]
    lines = [
        f"images/s, reference CNN, batch 128, {r['config']['n_train']} images, second epoch, "
        f"median of {r['config']['rounds']} rotated rounds; x = ratio to the plain tutorial"
    ]
    for name, v in ips.items():
        lines.append(f"  {VARIANTS[name][0]:<62} {v:6.0f}  {v / ips['plain']:5.2f}x")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs")
    parser.add_argument(
        "--variants", nargs="*", choices=VARIANTS, help="where the time goes (default: all)"
    )
    parser.add_argument("--out", help="JSON file (default under bench/results/)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--n-train", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # one variant, in the fresh process run_variants started
        print(json.dumps(measure_variant(args.variant, args.n_train)))
        return
    if args.variants is not None:
        names = args.variants or list(VARIANTS)
        if "plain" not in names:
            parser.error("--variants must include plain, the baseline of the ratios")
        results = run_variants(VARIANTS_SMOKE if args.smoke else VARIANTS_FULL, names)
        text, out = report_variants(results), args.out or "bench/results/variants.json"
    else:
        results = run(SMOKE if args.smoke else FULL)
        text, out = report(results), args.out or "bench/results/train_speed.json"
    print(text)
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
