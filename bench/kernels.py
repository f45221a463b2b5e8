"""Where a step of `fast`'s fit goes: its time, oneDNN's kernels, and the arithmetic
against the machine's ceiling.

    python -m bench.kernels [--isa AVX2] [--precision float32] [--train-size 60000]

Two child processes train `fast` for its one epoch (seed 42) with the train stage's own
train_model: one quiet, for the step times, the ceiling (tools.machine's convolution, in
the same precision) and the arithmetic (TensorFlow's profiler's FLOPs, 3x forward); one
with ONEDNN_VERBOSE=1, whose kernels' exec times are summed per kernel, the first 2 steps
left out, beside its own median step. --isa sets ONEDNN_MAX_CPU_ISA in both, so a CPU
runs the kernels oneDNN gives a lesser one (AVX2: no AVX-512) on its own cores, caches and
clock.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time

from bench.common import load_data, load_params, print_machine
from stages.common import PipelineError, run_cli

SKIPPED_STEPS = 2  # tracing and oneDNN's first choice of kernels


def child(precision, train_size):
    """Trains fast for one epoch; prints one JSON line: step times, FLOPs, ceiling."""
    import keras
    import tensorflow as tf

    from bench.train_speed import training_flop_per_image
    from stages import models, train
    from tools.machine import conv_gflops

    class StepTimes(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times, self.last = [], time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    data = load_data(train_size=train_size, validation_split=0)
    p = load_params(train.Params, model="fast", seed=42, mixed_precision=precision)
    steps = StepTimes()
    train.train_model(data, p, callbacks=[steps], verbose=0)
    batch = train.with_recipe(p, len(data["x_train"])).batch_size
    report = {"steps": steps.times, "batch": batch}
    if os.environ.get("ONEDNN_VERBOSE") != "1":  # else its kernels are the training's alone
        dtype = "bfloat16" if precision == "mixed_bfloat16" else "float32"
        report["flop_per_step"] = training_flop_per_image(models.build("fast")) * batch
        report["ceiling"] = conv_gflops(tf, dtype)
    print("RESULT " + json.dumps(report), flush=True)


def run_child(args, verbose):
    env = {**os.environ, "ONEDNN_VERBOSE": "1" if verbose else "0"}
    command = [sys.executable, "-m", "bench.kernels", "--child", "--precision", args.precision]
    command += ["--train-size", str(args.train_size)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if run.returncode:
        raise PipelineError(f"the training child failed: {run.stderr.strip().splitlines()[-1]}")
    return run.stdout.splitlines()


def kernel_times(lines, skipped=SKIPPED_STEPS):
    """{(primitive, implementation, propagation, shapes): ms summed} over the exec lines of
    ONEDNN_VERBOSE output, and the number of steps they cover. A step starts where the
    first kernel executed recurs; the first `skipped` steps are left out."""
    # onednn_verbose,v1,primitive,exec,cpu,<primitive>,<implementation>,<propagation>,
    # <memory>,<attributes>,<auxiliary>,<shapes>,<ms>
    execs = [
        line.split(",") for line in lines if line.startswith("onednn_verbose,v1,primitive,exec,")
    ]
    key = lambda f: (f[5], f[6], f[7], f[-2])  # noqa: E731
    forward = [key(f) for f in execs if f[7] == "forward_training"]
    if not forward:
        raise PipelineError("no ONEDNN_VERBOSE exec lines: is oneDNN on (TF_ENABLE_ONEDNN_OPTS)?")
    marker, steps, times = forward[0], 0, collections.Counter()
    for f in execs:
        steps += key(f) == marker
        if steps > skipped:
            times[key(f)] += float(f[-1])
    if steps <= skipped:
        raise PipelineError(f"{steps} steps: too few to leave out the first {skipped}")
    return times, steps - skipped


def result(lines):
    """The child's RESULT line, as a dict."""
    return json.loads(next(s for s in lines if s.startswith("RESULT ")).removeprefix("RESULT "))


def median_step_ms(steps):
    """The median step, in ms, of those after the first SKIPPED_STEPS."""
    later = sorted(steps[SKIPPED_STEPS:])
    return 1000 * later[len(later) // 2]


def describe(k):
    primitive, implementation, propagation, shapes = k
    return f"{primitive} {propagation.replace('_training', '')} {shapes} ({implementation})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", help="ONEDNN_MAX_CPU_ISA for the children, e.g. AVX2")
    parser.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16"])
    parser.add_argument("--train-size", default="all", help="prepare.train_size")
    parser.add_argument("--rows", type=int, default=10, help="kernels listed, by time")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    train_size = args.train_size if args.train_size == "all" else int(args.train_size)
    if args.child:
        return child(args.precision, train_size)
    if args.isa:  # for the children, and named in the machine line
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.isa
    print_machine(ceilings=False)
    r = result(run_child(args, verbose=False))
    steps = r["steps"]
    step_ms = median_step_ms(steps)
    print(
        f"fast, {args.precision}, batch {r['batch']}: fit {sum(steps):.1f} s over {len(steps)} "
        f"steps; first step {steps[0]:.2f} s, then median {step_ms:.1f} ms"
    )
    arithmetic_ms = 1000 * r["flop_per_step"] / (r["ceiling"] * 1e9)
    print(
        f"arithmetic: {r['flop_per_step'] / 1e9:.1f} GFLOP a step, at the ceiling "
        f"({r['ceiling']:.0f} GFLOP/s) {arithmetic_ms:.1f} ms: {arithmetic_ms / step_ms:.0%} "
        "of a step"
    )
    lines = run_child(args, verbose=True)
    times, counted = kernel_times(lines)
    total = sum(times.values()) / counted
    step_ms = median_step_ms(result(lines)["steps"])  # printing every kernel slows a step
    print(f"oneDNN kernels, ms per step over {counted} steps (verbose run: {step_ms:.1f} ms):")
    for k, ms in times.most_common(args.rows):
        print(f"  {ms / counted:7.2f}  {ms / counted / total:4.0%}  {describe(k)}")
    rest = sum(ms for _, ms in times.most_common()[args.rows :]) / counted
    print(f"  {rest:7.2f}  {rest / total:4.0%}  {len(times) - args.rows} other kernels")
    # TensorFlow runs independent ops on 2 inter-op threads: their kernels overlap, and the
    # sum can exceed a step.
    print(f"  {total:7.2f}  100%  all oneDNN kernels")


if __name__ == "__main__":
    run_cli(main)
