"""Export stage: the trained model as ONNX and as a TensorFlow SavedModel, both computing in
float32, checked against the Keras model on the test images before anything is written.

Reads   params.yaml `export`, MODEL (.keras, maybe trained in mixed precision),
        DATA/{x,y}_test.npy.
Writes  OUT/model.onnx      for onnxruntime (what `python -m tools.predict` and the server use)
        OUT/saved_model/    for TF Serving: signature `serve`, float32 (N, height, width,
                            channels) -> (N, classes)
        Both carry the dataset the model was trained on (name, class names, how an upload
        is prepared): in the ONNX file's metadata (stages/inference.py reads it) and in
        saved_model/assets.extra/dataset.json.
        OUT/metrics.json    the headline: classes that differ from Keras and the largest
                            probability difference, over both formats
        OUT/parity.json     each comparison in full, accuracy of each format, file sizes
A failed parity check stops the stage with one line and writes none of these. All three
are byte-for-byte the same on every run with the same model, as DVC's lock file needs
(speeds vary from run to run, so they are measured by `python -m bench.export_speed`).
"""

import argparse
import json
import re
from pathlib import Path

from pydantic import Field

from stages import params
from stages.common import PipelineError, atomic_dir, atomic_file, run_cli, write_json


class Params(params.Section):
    section = "export"

    batch_size: int = Field(ge=1)  # the parity check's batches
    tolerance: float = Field(gt=0)  # max |Δp|, exports against Keras in float32
    precision_tolerance: float = Field(gt=0)  # max |Δp|, float32 export vs the model as trained


params.check_early(__name__, Params)

import keras
import numpy as np

from stages import models
from stages.dataset import load_prepared
from stages.inference import DATASET_KEY, ONNX_FILE, onnx_runner, onnx_session

SAVED_MODEL = "saved_model"
METRICS = "metrics.json"
PARITY = "parity.json"


def float32_copy(model):
    """The same network and weights with every layer computing in float32.

    A model trained in mixed precision keeps its policy (mixed_bfloat16 or mixed_float16)
    in the .keras file; its weights are float32 already, so only the compute dtype changes.
    Augmentation layers (keras.layers.Random*) do nothing at inference but would export
    random ops that ONNX lacks, so they become Identity.
    """

    def clone(layer):
        if type(layer).__name__.startswith("Random"):
            return keras.layers.Identity(name=layer.name)
        return type(layer).from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(model, clone_function=clone)
    for source, target in zip(model.layers, copy.layers, strict=True):
        if target.weights:
            target.set_weights(source.get_weights())
    copy(np.zeros((1, *model.input_shape[1:]), np.float32))  # builds it: export needs a call
    return copy


def compare(reference, probs):
    """Parity of `probs` against `reference` (both (N, 10)): how many predicted classes
    agree, and the largest absolute difference of any probability."""
    same = reference.argmax(axis=1) == probs.argmax(axis=1)
    return {
        "images": len(same),
        "agreement": float(same.mean()),
        "differing_classes": int((~same).sum()),
        "max_abs_diff": float(np.abs(reference.astype(np.float64) - probs).max()),
    }


def check_parity(name, parity, tolerance):
    """Raises when an exported format predicts another class for any image, or any of its
    probabilities is further than `tolerance` from Keras'."""
    if parity["differing_classes"] or parity["max_abs_diff"] > tolerance:
        raise PipelineError(
            f"{name} does not match the Keras model: {parity['differing_classes']} of "
            f"{parity['images']} test images get another class, max |Δp| "
            f"{parity['max_abs_diff']:.1e} (export.tolerance: {tolerance:.0e})"
        )


def compute_dtype(model):
    """The dtype policy of the model's first layer with weights, e.g. mixed_bfloat16."""
    return next(layer.dtype_policy.name for layer in model.layers if layer.weights)


def size_bytes(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def accuracy(probs, labels):
    return float(np.mean(probs.argmax(axis=1) == labels))


def predict_all(run, x, batch_size):
    """Runs `run` on all of x in batches of batch_size; returns the probabilities."""
    return np.concatenate(
        [np.asarray(run(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    )


# What the exporters write that is not the model is fixed here, so that the same model
# always gives the same bytes (as for the .keras file in stages/models.py), by public means
# only (docs/design.md, "Byte-identical exports"): the SavedModel's variables in the
# model's own order, its fingerprint's random UUID, tf2onnx's generated names (counters
# that vary from run to run) and its initializer order.


def serving_module(model):
    """A tf.Module whose `serve` runs `model` on float32 (N, height, width, channels).

    Keras' own `model.export` tracks the variables in the order its traced functions
    capture them, which varies from run to run (and keeps each one twice); this module
    tracks the model's weights in the model's order. Not `model.variables`: Dropout's
    seed state is unused in serving."""
    import tensorflow as tf

    module = tf.Module()
    module.weights = [weight.value for weight in model.weights]  # its tf.Variables, in order
    (images,) = model.inputs
    spec = tf.TensorSpec((None, *images.shape[1:]), tf.float32, name=images.name)
    module.serve = tf.function(
        lambda x: model(x, training=False), input_signature=[spec], autograph=False
    )
    return module


def write_saved_model(model, saved_model):
    """`model` as a SavedModel with Keras' endpoint `serve`, also as TF Serving's
    `serving_default`; its fingerprint's UUID is its checksum, not a random one."""
    import tensorflow as tf

    module = serving_module(model)
    signatures = {"serve": module.serve, "serving_default": module.serve}
    tf.saved_model.save(module, str(saved_model), signatures=signatures)
    fix_fingerprint(saved_model)


def fix_fingerprint(saved_model):
    """Replaces the fingerprint's random UUID by its checksum of the SavedModel's files."""
    from tensorflow.core.protobuf import fingerprint_pb2

    path = Path(saved_model) / "fingerprint.pb"
    fingerprint = fingerprint_pb2.FingerprintDef.FromString(path.read_bytes())
    fingerprint.uuid = str(fingerprint.saved_model_checksum)
    path.write_bytes(fingerprint.SerializeToString(deterministic=True))


GENERATED = re.compile(r"__\d+(:\d+)?$")  # tf2onnx's made-up names: const_axes__27


def fix_onnx(onnx_file, dataset):
    """Renames tf2onnx's generated tensor and node names in order of first use, and orders
    the initializers by first use, so that the same graph always gives the same bytes;
    records `dataset` in the file's metadata."""
    import onnx

    model = onnx.load(str(onnx_file))
    onnx.helper.set_model_props(model, {DATASET_KEY: json.dumps(dataset, sort_keys=True)})
    graph = model.graph
    renamed = {}

    def canonical(name):
        if not GENERATED.search(name):
            return name
        return renamed.setdefault(name, f"generated__{len(renamed)}")

    first_use = {}  # name -> (node, input position) of its first use
    for i, node in enumerate(graph.node):
        node.input[:] = [canonical(n) for n in node.input]
        node.output[:] = [canonical(n) for n in node.output]
        if GENERATED.search(node.name):
            node.name = f"node__{i}"
        for j, name in enumerate(node.input):
            first_use.setdefault(name, (i, j))
    unused = (len(graph.node), 0)
    initializers = sorted(graph.initializer, key=lambda t: first_use.get(canonical(t.name), unused))
    for tensor in initializers:
        tensor.name = canonical(tensor.name)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.save(model, str(onnx_file))


def format_runners(trained, onnx_file, saved_model):
    """{"keras", "onnx", "saved_model"} -> a function from a float32 batch to probabilities:
    the model as trained (in its own precision) and the two exported files."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model))  # its variables live as long as this
    return {
        "keras": trained.predict_on_batch,
        "onnx": onnx_runner(onnx_session(onnx_file)),
        "saved_model": lambda batch: loaded.serve(batch).numpy(),
    }


def export(trained, dataset, saved_model, onnx_file, x, labels, p):
    """Writes the float32 copy of `trained` as a SavedModel and an ONNX file, both with
    `dataset` (its name, classes, preparation), runs all formats on (x, labels) and checks
    parity; returns the metrics dict."""
    model = float32_copy(trained)
    write_saved_model(model, saved_model)
    extra = Path(saved_model) / "assets.extra"  # TF Serving's place for what the graph ignores
    extra.mkdir()
    write_json(extra / "dataset.json", dataset)
    model.export(str(onnx_file), format="onnx", verbose=False)
    fix_onnx(onnx_file, dataset)
    runners = {
        **format_runners(trained, onnx_file, saved_model),
        "keras_float32": model.predict_on_batch,
    }
    probs = {name: predict_all(run, x, p.batch_size) for name, run in runners.items()}
    parity = {
        # The conversion itself: same weights, same float32 arithmetic.
        "onnx": compare(probs["keras_float32"], probs["onnx"]),
        "saved_model": compare(probs["keras_float32"], probs["saved_model"]),
        # What serving in float32 changes from the model as trained (mixed precision).
        "onnx_vs_trained": compare(probs["keras"], probs["onnx"]),
    }
    check_parity("the ONNX export", parity["onnx"], p.tolerance)
    check_parity("the SavedModel export", parity["saved_model"], p.tolerance)
    trained_parity = parity["onnx_vs_trained"]
    if trained_parity["max_abs_diff"] > p.precision_tolerance:
        raise PipelineError(
            f"the float32 ONNX export is further from the model as trained than precision "
            f"explains: max |Δp| {trained_parity['max_abs_diff']:.1e} "
            f"(export.precision_tolerance: {p.precision_tolerance})"
        )
    return {
        "precision": compute_dtype(trained),
        "parity": parity,
        "accuracy": {name: accuracy(prob, labels) for name, prob in probs.items()},
    }


def headline(details):
    """The few numbers `dvc metrics diff` and `dvc exp show` carry for export."""
    formats = [details["parity"]["onnx"], details["parity"]["saved_model"]]
    return {
        "differing_classes": sum(f["differing_classes"] for f in formats),
        "max_abs_diff": max(f["max_abs_diff"] for f in formats),
        "max_abs_diff_vs_trained": details["parity"]["onnx_vs_trained"]["max_abs_diff"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="trained .keras file")
    parser.add_argument("--data", required=True, help="directory of prepared .npy arrays")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    p = params.load(Params)
    trained = models.load_model(args.model)
    dataset = models.recorded(args.model, "dataset")
    if not dataset:
        raise PipelineError(f"{args.model} records no dataset; retrain it with `dvc repro train`")
    test = load_prepared(args.data, splits=("test",))
    out = Path(args.out)
    # All or nothing: both exports get their final names only after every check passed.
    with atomic_dir(out / SAVED_MODEL) as saved_model, atomic_file(out / ONNX_FILE) as onnx:
        details = export(trained, dataset, saved_model, onnx, test["x_test"], test["y_test"], p)
        details["size_bytes"] = {
            "keras": size_bytes(args.model),
            "onnx": size_bytes(onnx),
            "saved_model": size_bytes(saved_model),
        }
    write_json(out / PARITY, details)
    write_json(out / METRICS, headline(details))
    onnx = details["parity"]["onnx"]
    print(
        f"export: {out / ONNX_FILE} and {out / SAVED_MODEL}: {onnx['agreement']:.2%} of "
        f"{onnx['images']} test classes agree, max |Δp| {onnx['max_abs_diff']:.1e} "
        f"(float32 Keras), {details['parity']['onnx_vs_trained']['max_abs_diff']:.1e} "
        f"(as trained, {details['precision']}); test accuracy {details['accuracy']['onnx']:.4f}"
    )


if __name__ == "__main__":
    run_cli(main)
