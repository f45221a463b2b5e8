"""Names the machine a figure comes from, in the line every benchmark prints first:

    python -m tools.machine                 # with the ceilings: TensorFlow, a few seconds
    python -m tools.machine --no-ceilings   # the CPU alone, at once

    machine: AMD EPYC, AVX-512 BF16, 2 cores, ceilings float32 173 / bfloat16 376 GFLOP/s

The CPU's model, class and cores come from stages.machine; a GPU TensorFlow sees is named
first. A ceiling is the speed of the reference model's largest convolution (64 -> 128
channels, 3x3, batch 128, 26x26 in), forward, best of 5, on the device TensorFlow picks:
what docs/benchmarks.md divides a training speed by for its "of ceiling" figures.
"""

import argparse
import os
import time

from stages import machine
from stages.common import run_cli

# The reference model's largest convolution: a batch of 26x26 images of 64 channels, 3x3
# kernels to 128 channels, VALID padding (24x24 out).
BATCH, SIZE, CHANNELS_IN, CHANNELS_OUT, KERNEL = 128, 26, 64, 128, 3


def conv_flop():
    """FLOPs of one forward convolution: 2 per multiply-add."""
    out = SIZE - KERNEL + 1
    return 2 * BATCH * out * out * CHANNELS_OUT * KERNEL * KERNEL * CHANNELS_IN


def conv_gflops(tf, dtype, repeats=5):
    """GFLOP/s of the convolution in `dtype`, the best of `repeats` calls after a warm-up."""
    x = tf.cast(tf.random.normal((BATCH, SIZE, SIZE, CHANNELS_IN)), dtype)
    w = tf.cast(tf.random.normal((KERNEL, KERNEL, CHANNELS_IN, CHANNELS_OUT)), dtype)
    # One element back to Python: waits for the convolution without copying its output.
    conv = tf.function(lambda: tf.nn.conv2d(x, w, 1, "VALID")[0, 0, 0, 0])
    conv().numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        conv().numpy()
        times.append(time.perf_counter() - start)
    return conv_flop() / min(times) / 1e9


def measure():
    """(names of the GPUs TensorFlow sees, {dtype: ceiling in GFLOP/s})."""
    import tensorflow as tf  # here: the quick line needs no TensorFlow

    gpus = [
        tf.config.experimental.get_device_details(d).get("device_name", d.name)
        for d in tf.config.list_physical_devices("GPU")
    ]
    return gpus, {name: conv_gflops(tf, name) for name in ("float32", "bfloat16")}


def format_line(cpu, gpus=(), ceilings=None, isa=None):
    """'machine: [GPU name, ...]cpu[, oneDNN limited to ISA][, ceilings float32 F /
    bfloat16 B GFLOP/s]'; isa: ONEDNN_MAX_CPU_ISA, under which a CPU runs a lesser one's
    kernels (AVX2 on an AVX-512 CPU), so its figures are named by both."""
    parts = [*(f"GPU {name}" for name in gpus), cpu]
    if isa:
        parts.append(f"oneDNN limited to {isa} (ONEDNN_MAX_CPU_ISA)")
    if ceilings:
        speeds = " / ".join(f"{dtype} {gflops:.0f}" for dtype, gflops in ceilings.items())
        parts.append(f"ceilings {speeds} GFLOP/s")
    return "machine: " + ", ".join(parts)


def machine_line(ceilings=True):
    """This machine's line; with `ceilings`, GPUs and ceilings measured by TensorFlow."""
    measured = measure() if ceilings else ((), None)
    return format_line(machine.describe_cpu(), *measured, os.environ.get("ONEDNN_MAX_CPU_ISA"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-ceilings",
        action="store_true",
        help="the CPU's model, class and cores only, without TensorFlow",
    )
    args = parser.parse_args(argv)
    print(machine_line(ceilings=not args.no_ceilings))


if __name__ == "__main__":
    run_cli(main)
