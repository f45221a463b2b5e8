"""Milliseconds per test image of each format the export stage writes, at batch 1 and at a
large batch: the trained .keras model (in its training precision), ONNX (onnxruntime) and
the SavedModel (TensorFlow). The export stage checks these files but does not time them,
since timings differ from run to run and its outputs must not.

    python -m bench.export_speed [--images 200] [--batch-size 1000] [--out DIR]

Batch 1: the median over the first IMAGES test images, one call each. Large batch: the
median per image over the batches of the 10,000 test images. Each format runs once untimed
first (graph set-up, caches). Writes OUT/export_speed.json.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from stages import export, models
from stages.common import PipelineError, run_cli, write_json
from stages.dataset import load_prepared
from tools.paths import dvc_var


def ms_per_image(run, x, batch_size, images):
    """(median ms per image at batch 1 over `images` calls, at batch_size over all of x)."""
    run(x[:1])
    single = []
    for i in range(min(images, len(x))):
        start = time.perf_counter()
        run(x[i : i + 1])
        single.append(time.perf_counter() - start)
    batched = []
    for i in range(0, len(x), batch_size):
        start = time.perf_counter()
        run(x[i : i + batch_size])
        batched.append((time.perf_counter() - start) / len(x[i : i + batch_size]))
    return 1000 * float(np.median(single)), 1000 * float(np.median(batched))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images timed at batch 1")
    parser.add_argument("--batch-size", type=int, default=1000, help="the large batch")
    parser.add_argument("--out", default="bench/results", help="output directory")
    args = parser.parse_args(argv)
    exported = Path(dvc_var("exported"))
    if not (exported / export.ONNX_FILE).exists():
        raise PipelineError(f"{exported / export.ONNX_FILE} not found; run `dvc repro export`")
    x = load_prepared(dvc_var("prepared"), splits=("test",))["x_test"]
    trained = models.load_model(dvc_var("model"))
    runners = export.format_runners(
        trained, exported / export.ONNX_FILE, exported / export.SAVED_MODEL
    )
    keras_label = f"keras ({export.compute_dtype(trained)})"  # its precision, as trained
    runners = {keras_label if name == "keras" else name: run for name, run in runners.items()}
    figures = {}
    print(f"ms per image: batch 1 (median of {args.images}) / batch {args.batch_size}")
    for name, run in runners.items():
        single, batched = ms_per_image(run, x, args.batch_size, args.images)
        figures[name] = {"batch_1": single, f"batch_{args.batch_size}": batched}
        print(f"  {name:24} {single:7.2f} / {batched:.3f}")
    write_json(Path(args.out) / "export_speed.json", figures)


if __name__ == "__main__":
    run_cli(main)
