"""Milliseconds per test image of each format the export stage writes: the trained .keras
model (in its training precision), ONNX (onnxruntime) and the SavedModel (TensorFlow).

    python -m bench.export_speed [--images 200] [--batch-size 1000] [--out DIR]

Batch 1: the median of the first IMAGES test images, one call each, after one untimed call.
Large batch: the median per image over the test set's batches. Reads the pipeline's outputs
where dvc.yaml puts them; writes OUT/export_speed.json.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import print_machine
from stages import export, models
from stages.common import PipelineError, run_cli, write_json
from stages.dataset import load_prepared
from stages.inference import ONNX_FILE
from tools.paths import dvc_var


def ms_per_image(run, x, batch_size, images):
    """(median ms per image at batch 1 over `images` calls, at batch_size over all of x)."""
    run(x[:1])
    single, batched = [], []
    for i in range(min(images, len(x))):
        start = time.perf_counter()
        run(x[i : i + 1])
        single.append(time.perf_counter() - start)
    for i in range(0, len(x), batch_size):
        start = time.perf_counter()
        run(x[i : i + batch_size])
        batched.append((time.perf_counter() - start) / len(x[i : i + batch_size]))
    return 1000 * float(np.median(single)), 1000 * float(np.median(batched))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images timed at batch 1")
    parser.add_argument("--batch-size", type=int, default=1000, help="the large batch")
    parser.add_argument("--out", default="bench/results", help="output directory")
    args = parser.parse_args(argv)
    onnx_file = Path(dvc_var("exported"), ONNX_FILE)
    if not onnx_file.exists():
        raise PipelineError(f"{onnx_file} not found; run `dvc repro export`")
    line = print_machine()
    x = load_prepared(dvc_var("prepared"), splits=("test",))["x_test"]
    trained = models.load_model(dvc_var("model"))
    runners = export.format_runners(
        trained, onnx_file, Path(dvc_var("exported"), export.SAVED_MODEL)
    )
    keras = f"keras ({export.compute_dtype(trained)})"  # the .keras model as trained
    figures = {}
    print(f"ms per image: batch 1 (median of {args.images}) / batch {args.batch_size}")
    for name, run in runners.items():
        single, batched = ms_per_image(run, x, args.batch_size, args.images)
        label = keras if name == "keras" else name
        figures[label] = {"batch_1": single, f"batch_{args.batch_size}": batched}
        print(f"  {label:24} {single:7.2f} / {batched:.3f}")
    write_json(Path(args.out) / "export_speed.json", {"machine": line, "ms_per_image": figures})


if __name__ == "__main__":
    run_cli(main)
