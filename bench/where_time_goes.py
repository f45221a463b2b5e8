"""Where the reference model's CPU training time goes: one setting changed at a time.

    python -m bench.where_time_goes [--smoke] [--out bench/results/where_time_goes.json]

Trains the reference CNN for 2 epochs on the same images with each variant below, each in
a fresh process (thread and oneDNN settings are read once, at TensorFlow's start), and
times the second epoch (validation included unless the variant drops it). Variants run in
a rotated order round after round so that machine noise spreads over all of them; the
table gives the median images/s and the ratio to the plain Keras tutorial.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# name -> (what changes, environment for the fresh process, side, overrides of train params)
VARIANTS = {
    "plain": ("plain Keras tutorial: float32, numpy, validation_split", {}, "plain", {}),
    "f32": ("pipeline train code, float32", {}, "pipeline", {"mixed_precision": "float32"}),
    "f32_noval": (
        "  ... without the validation pass",
        {},
        "pipeline",
        {"mixed_precision": "float32", "validate": False},
    ),
    "f32_tfdata": (
        "  ... fed by tf.data (shuffle, batch, prefetch)",
        {},
        "tfdata",
        {"mixed_precision": "float32"},
    ),
    "f32_1thread": (
        "  ... with 1 intra-op and 1 inter-op thread",
        {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"},
        "pipeline",
        {"mixed_precision": "float32"},
    ),
    "f32_no_onednn": (
        "  ... with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)",
        {"TF_ENABLE_ONEDNN_OPTS": "0"},
        "pipeline",
        {"mixed_precision": "float32"},
    ),
    "f32_xla": (
        "  ... compiled by XLA (jit_compile: true)",
        {},
        "pipeline",
        {"mixed_precision": "float32", "jit_compile": True},
    ),
    "bf16": (
        "pipeline train code, mixed_bfloat16 (committed)",
        {},
        "pipeline",
        {"mixed_precision": "mixed_bfloat16"},
    ),
    "bf16_noval": (
        "  ... without the validation pass",
        {},
        "pipeline",
        {"mixed_precision": "mixed_bfloat16", "validate": False},
    ),
    "bf16_xla": (
        "  ... compiled by XLA (jit_compile: true)",
        {},
        "pipeline",
        {"mixed_precision": "mixed_bfloat16", "jit_compile": True},
    ),
}
FULL = {"n_train": 6_400, "rounds": 3}  # 31 minutes here, XLA the slowest
SMOKE = {"n_train": 256, "rounds": 1}


def tfdata(x, y, batch_size, timer, **overrides):
    """The pipeline's model and compile step, fed by a tf.data pipeline instead of numpy."""
    import keras
    import tensorflow as tf

    from bench.train_speed import train_params
    from stages import prepare
    from stages.dataset import NUM_CLASSES
    from stages.train import compile_model, resolve_precision, seed_everything

    p = train_params(model="reference", batch_size=batch_size, **overrides)
    seed_everything(p.seed, p.deterministic)
    keras.mixed_precision.set_dtype_policy(resolve_precision(p.mixed_precision, [], False))
    (x_tr, y_tr), (x_val, y_val) = prepare.split_validation(x, y, 0.2)

    def batches(images, labels, shuffle):
        ds = tf.data.Dataset.from_tensor_slices(
            (images, keras.utils.to_categorical(labels, NUM_CLASSES))
        )
        if shuffle:
            ds = ds.shuffle(len(images), seed=p.seed)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    model = compile_model(p, int(np.ceil(len(x_tr) / batch_size)))
    model.fit(
        batches(x_tr, y_tr, True),
        epochs=2,
        validation_data=batches(x_val, y_val, False),
        callbacks=[timer],
        verbose=0,
    )


def measure(name, n_train):
    """In this process: images/s of one variant."""
    import functools

    from bench import train_speed

    _, _, side, overrides = VARIANTS[name]
    sides = {"plain": train_speed.plain_keras, "pipeline": train_speed.pipeline, "tfdata": tfdata}
    x, y = train_speed.load_mnist(n_train)
    return train_speed.images_per_second(
        functools.partial(sides[side], **overrides), x, y, batch_size=128
    )


def measure_in_fresh_process(name, n_train):
    env = {**os.environ, **VARIANTS[name][1]}
    cmd = [sys.executable, "-m", "bench.where_time_goes", "--variant", name]
    out = subprocess.run(
        [*cmd, "--n-train", str(n_train)], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.exit(f"Error: variant {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def run(cfg, names):
    rounds = []
    for r in range(cfg["rounds"]):
        order = names[r:] + names[:r]  # rotate who goes first
        rounds.append({n: measure_in_fresh_process(n, cfg["n_train"]) for n in order})
        print(f"round {r + 1}: " + ", ".join(f"{n} {rounds[-1][n]:.0f}" for n in names))
    medians = {n: float(np.median([r[n] for r in rounds])) for n in names}
    return {"config": cfg, "rounds": rounds, "images_per_s": medians}


def report(r):
    ips = r["images_per_s"]
    lines = [
        f"images/s, reference CNN, batch 128, {r['config']['n_train']} images, second epoch, "
        f"median of {r['config']['rounds']} rotated rounds; x = ratio to plain Keras",
    ]
    for name in ips:
        what = VARIANTS[name][0]
        lines.append(f"  {what:<56} {ips[name]:6.0f}  {ips[name] / ips['plain']:5.2f}x")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--out", default="bench/results/where_time_goes.json")
    parser.add_argument(
        "--only", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="these variants"
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--n-train", type=int, default=FULL["n_train"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps({"images_per_s": measure(args.variant, args.n_train)}))
        return
    if "plain" not in args.only:
        parser.error("--only must include plain, the baseline of the ratios")
    results = run(SMOKE if args.smoke else FULL, args.only)
    print(report(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
