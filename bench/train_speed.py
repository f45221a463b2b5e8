"""Training speed: the train stage's `train_model` with params.yaml against the plain Keras
tutorial's recipe, and what each setting costs.

    python -m bench.train_speed [--smoke] [--out FILE]     # make bench: pipeline, tutorial
    python -m bench.train_speed --variants [NAME ...]      # the pipeline, one change each
    python -m bench.train_speed --variants plain fast ... --train-size 4000 --rounds 3

Each measurement is a fresh process (TensorFlow reads thread and oneDNN settings once, and
keeps deterministic ops on once on) that trains the reference CNN for 2 epochs and times
the second (no tracing), validation included; the order rotates round after round, so that
machine noise hits every variant. GFLOP/s: from the FLOPs TensorFlow's profiler counts.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from bench.common import TUTORIAL, TUTORIAL_PARAMS, load_data, load_params, print_machine
from stages.allocator import LIBRARY as TCMALLOC
from stages.common import write_json

FULL = {"train_size": 16_000, "rounds": 3, "batch_sizes": [32, 512, 1024]}
SMOKE = {"train_size": 320, "rounds": 1, "batch_sizes": [64]}
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
LIBS = "/usr/lib/x86_64-linux-gnu"  # Debian's libtcmalloc-minimal4, libjemalloc2
VARIANTS = {  # name -> (what, its process's environment, params.yaml overrides as for -S)
    "plain": (f"{TUTORIAL}: float32", {}, {f"train.{k}": v for k, v in TUTORIAL_PARAMS.items()}),
    "pipeline": ("pipeline train code, params.yaml", {}, {}),
    "float32": ("  ... in float32", {}, {"train.mixed_precision": "float32"}),
    "bfloat16": ("  ... in mixed_bfloat16", {}, {"train.mixed_precision": "mixed_bfloat16"}),
    "one_thread": ("  ... with 1 intra-op and 1 inter-op thread", ONE_THREAD, {}),
    "no_onednn": ("  ... with oneDNN off", {"TF_ENABLE_ONEDNN_OPTS": "0"}, {}),
    "xla": ("  ... compiled by XLA", {}, {"train.jit_compile": True}),
    "no_validation": ("  ... without the validation pass", {}, {"prepare.validation_split": 0.0}),
    "nondeterministic": ("  ... without deterministic ops", {}, {"train.deterministic": False}),
    "tcmalloc": ("  ... tcmalloc preloaded", {"LD_PRELOAD": f"{LIBS}/{TCMALLOC}"}, {}),
    "jemalloc": ("  ... jemalloc preloaded", {"LD_PRELOAD": f"{LIBS}/libjemalloc.so.2"}, {}),
    "one_interop": ("  ... with 1 inter-op thread", {"TF_NUM_INTEROP_THREADS": "1"}, {}),
    "onednn_system_alloc": (
        "  ... oneDNN on the system allocator",
        {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"},
        {},
    ),
    "spe_8": ("  ... steps_per_execution 8", {}, {"bench.steps_per_execution": 8}),
    "spe_32": ("  ... steps_per_execution 32", {}, {"bench.steps_per_execution": 32}),
    # KERAS_BACKEND=jax needs jax: PYTHONPATH=.venv/extras (make setup installs it there)
    "jax": ("  ... Keras' JAX backend (float32)", {"KERAS_BACKEND": "jax"}, {}),
    "jax_bf16": (
        "  ... Keras' JAX backend, mixed_bfloat16",
        {"KERAS_BACKEND": "jax"},
        {"train.mixed_precision": "mixed_bfloat16"},
    ),
    "fast": ("fast preset, its batch 512", {}, {"train.model": "fast", "train.batch_size": 512}),
    "fast_tcmalloc": (
        "  ... tcmalloc preloaded",
        {"LD_PRELOAD": f"{LIBS}/{TCMALLOC}"},
        {"train.model": "fast", "train.batch_size": 512},
    ),
    "fast_spe_8": (
        "  ... steps_per_execution 8",
        {},
        {"train.model": "fast", "train.batch_size": 512, "bench.steps_per_execution": 8},
    ),
}


def measure(name, train_size, batch_sizes):
    """In this process: images/s of variant `name` at each batch size, and what it ran."""
    import keras  # here, not above: TensorFlow starts in the measuring processes only

    from stages import models, train

    sections = {"prepare": {"train_size": train_size}, "train": {"epochs": 2}, "bench": {}}
    for key, value in VARIANTS[name][2].items():
        section, field = key.split(".")
        sections[section][field] = value
    if "steps_per_execution" in sections["bench"]:
        compile_with(models, sections["bench"]["steps_per_execution"])
    data = load_data(**sections["prepare"])
    stamps = []  # perf_counter at each epoch's begin and end
    clock = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda *_: stamps.append(time.perf_counter()),
        on_epoch_end=lambda *_: stamps.append(time.perf_counter()),
    )
    speeds = {}
    for b in batch_sizes:
        p = load_params(train.Params, **{**sections["train"], "batch_size": b})
        train.train_model(data, p, callbacks=[clock], verbose=0)
        speeds[b] = len(data["x_train"]) / (stamps[-1] - stamps[-2])
    tf_backend = keras.backend.backend() == "tensorflow"  # the FLOP count needs TensorFlow
    return {
        "images_per_s": speeds,
        "precision": keras.config.dtype_policy().name,
        "train_images": len(data["x_train"]),
        "val_images": len(data["x_val"]),
        "epoch_s": [end - begin for begin, end in zip(stamps[::2], stamps[1::2], strict=True)],
        "flop_per_image": training_flop_per_image(models.build(p.model)) if tf_backend else None,
    }


def compile_with(models, steps_per_execution):
    """Makes every model that models.build returns compile with steps_per_execution, so that
    the train stage's own compile_model and train_model run unchanged around it."""
    build = models.build

    def build_for_bench(*args, **kwargs):
        model = build(*args, **kwargs)
        compile_model = model.compile
        model.compile = lambda **kw: compile_model(**kw, steps_per_execution=steps_per_execution)
        return model

    models.build = build_for_bench


def in_fresh_process(name, train_size, batch_sizes):
    cmd = [sys.executable, "-m", "bench.train_speed", "--variant", name]
    cmd += ["--train-size", str(train_size), "--batch-sizes", *map(str, batch_sizes)]
    env = {**os.environ, **VARIANTS[name][1]}
    preload = env.get("LD_PRELOAD")
    if preload and not os.path.exists(preload):  # the loader would only warn, and run without
        sys.exit(f"Error: variant {name}: {preload} not found (apt-get install the library)")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip() or "no output").splitlines()[-1]
        sys.exit(f"Error: variant {name} failed: {last}")
    return json.loads(out.stdout.splitlines()[-1])


def run_rounds(names, cfg):
    """Each variant once a round, in a fresh process, the order rotated round after round;
    the pipeline also at cfg's other batch sizes. Returns every run and, per variant and
    batch size, the median images/s."""
    runs = {name: [] for name in names}
    for r in range(cfg["rounds"]):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            own = VARIANTS[name][2].get("train.batch_size", 128)
            sizes = [128, *cfg["batch_sizes"]] if name == "pipeline" else [own]
            runs[name].append(in_fresh_process(name, cfg["train_size"], sizes))
        speeds = ", ".join(
            f"{n} {next(iter(runs[n][-1]['images_per_s'].values())):.0f}" for n in names
        )
        print(f"round {r + 1}: {speeds} images/s", flush=True)
    medians = {
        name: {
            b: float(np.median([m["images_per_s"][b] for m in mine]))
            for b in mine[0]["images_per_s"]
        }
        for name, mine in runs.items()
    }
    return {"config": cfg, "runs": runs, "images_per_s": medians}


def training_flop_per_image(model):
    """TensorFlow's profiler's FLOP count of one image's forward pass, times 3 (the
    backward pass costs about twice the forward: gradients of inputs and of weights)."""
    import tensorflow as tf

    spec = tf.TensorSpec((1, *model.input_shape[1:]), tf.float32)
    graph = tf.function(model).get_concrete_function(spec).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return 3 * tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops


def report(results):
    cfg, first = results["config"], {n: runs[0] for n, runs in results["runs"].items()}
    flop, plain = first["plain"]["flop_per_image"], results["images_per_s"]["plain"]["128"]
    lines = [
        f"training images/s, reference CNN ({flop / 1e6:.1f} MFLOP per image: TensorFlow's "
        f"profiler, 3x forward), prepare.train_size {cfg['train_size']}, second epoch, median "
        f"of {cfg['rounds']} rotated rounds; x = ratio to the plain tutorial at batch 128"
    ]
    for name, speeds in results["images_per_s"].items():
        for b, ips in speeds.items():
            label = VARIANTS[name][0] + ("" if b == "128" else f", batch {b}")
            gflops = f"{ips * (first[name]['flop_per_image'] or flop) / 1e9:6.1f} GFLOP/s"
            lines.append(
                f"  {label:<56} {ips:6.0f} {gflops} {ips / plain:5.2f}x  {first[name]['precision']}"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, help="default: all")
    parser.add_argument("--out", help="JSON file (default under bench/results/)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--train-size", type=int, help="prepare.train_size (default 16000)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # one measurement, in the fresh process that in_fresh_process started
        print(json.dumps(measure(args.variant, args.train_size, args.batch_sizes)))
        return
    default = args.variants is None
    names = ["plain", "pipeline"] if default else args.variants or list(VARIANTS)
    if "plain" not in names:
        parser.error("--variants must include plain, the baseline of the ratios")
    line = print_machine(ceilings=not args.smoke)  # a smoke run's speeds are no figures
    cfg = dict(SMOKE if args.smoke else FULL)
    cfg.update({k: v for k, v in (("train_size", args.train_size), ("rounds", args.rounds)) if v})
    results = {"machine": line, **run_rounds(names, cfg)}
    print(report(results))
    out = args.out or f"bench/results/{'train_speed' if default else 'variants'}.json"
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
