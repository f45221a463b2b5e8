"""Evaluate stage: scores the trained model on the test images (all 10,000 by default).

Reads   params.yaml `evaluate`, MODEL (.keras), DATA/{x,y}_test.npy and DATA/dataset.json
        (the class names), LIVE/ (training curves).
Writes  OUT/metrics.json   the headline: accuracy, loss, errors, and dtype_policy (the
                           precision the model computes in: what `auto` chose in training);
                           with feedback (DATA/{x,y}_feedback_test.npy), also feedback:
                           accuracy, errors and images of the feedback test part
        OUT/per_class.json precision, recall, F1 and support per class, by name; DVC reads
                           it on request: `dvc metrics diff --targets OUT/per_class.json`
        OUT/confusion.csv  one row per test image: actual,predicted class names (DVC
                           confusion plots)
        OUT/plots/         confusion.png, curves.png, errors.png (most confident mistakes)
All of OUT is written at once, or not at all.
"""

import argparse
from pathlib import Path

from pydantic import Field

from stages import params
from stages.common import PipelineError, atomic_dir, run_cli, write_json


class Params(params.Section):
    section = "evaluate"

    batch_size: int = Field(ge=1)
    gallery_size: int = Field(ge=1, le=100)


params.check_early(__name__, Params)

import keras
import numpy as np
import pandas as pd

from stages import figures, models
from stages.dataset import has_split, load_info, load_prepared


def cross_entropy(probs, labels):
    """Mean categorical cross-entropy of softmax outputs, Keras' own (the loss training
    reports): labels (N,) ints, probs (N, classes)."""
    losses = keras.losses.sparse_categorical_crossentropy(labels, probs)
    return float(np.mean(keras.ops.convert_to_numpy(losses)))


def compute_metrics(labels, probs):
    """labels: (N,) ints; probs: (N, classes) softmax outputs -> the headline metrics."""
    predicted = probs.argmax(axis=1)
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "loss": cross_entropy(probs, labels),
        "errors": int(np.sum(predicted != labels)),
    }


def feedback_metrics(labels, probs):
    """labels: (N,) ints of the feedback test part, N >= 1; probs: (N, classes) ->
    {"accuracy", "errors", "images"}."""
    correct = int(np.sum(probs.argmax(axis=1) == labels))
    return {
        "accuracy": correct / len(labels),
        "errors": len(labels) - correct,
        "images": len(labels),
    }


def score_feedback(model, prepared_dir, batch_size):
    """feedback_metrics on the feedback test part, {"images": 0} when it is empty, None
    without feedback."""
    if not has_split(prepared_dir, "feedback_test"):
        return None
    part = load_prepared(prepared_dir, splits=("feedback_test",))
    x, y = part["x_feedback_test"], part["y_feedback_test"]
    if not len(y):
        return {"images": 0}
    return feedback_metrics(y, model.predict(x, batch_size=batch_size, verbose=0))


def confusion_matrix(labels, predicted, num_classes):
    """counts[actual, predicted]: how often each class was taken for each."""
    cells = num_classes * np.asarray(labels, np.int64) + np.asarray(predicted, np.int64)
    return np.bincount(cells, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_metrics(labels, probs, classes):
    """{class name: {"precision", "recall", "f1", "support"}, ...}, in class order; 0 where
    a class was never predicted or never present (scikit-learn's zero_division=0, and its
    F1 from the counts: 2 TP / (support + predictions), so the same floats)."""
    counts = confusion_matrix(labels, probs.argmax(axis=1), len(classes))
    hits, support, predictions = np.diag(counts), counts.sum(axis=1), counts.sum(axis=0)

    def ratio(num, den):
        return np.divide(num, den, out=np.zeros(len(classes)), where=den > 0)

    precision, recall = ratio(hits, predictions), ratio(hits, support)
    f1 = ratio(2.0 * hits, support + predictions)
    return {
        name: {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
        for c, name in enumerate(classes)
    }


def most_confident_errors(labels, probs, k):
    """Indices of up to k misclassified images, highest predicted probability first."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:k]]


def read_history(live_dir):
    """dvclive's per-epoch TSVs (step = epoch, 1-based) -> DataFrame indexed by epoch:
    loss, accuracy, val_loss, val_accuracy."""
    metrics_dir = Path(live_dir) / "plots" / "metrics"
    columns = {}
    for split, prefix in (("train", ""), ("eval", "val_")):
        for metric in ("loss", "accuracy"):
            tsv = metrics_dir / split / f"{metric}.tsv"
            if tsv.exists():
                frame = pd.read_csv(tsv, sep="\t")
                columns[prefix + metric] = frame.set_index("step")[metric]
    if "loss" not in columns:
        raise PipelineError(f"no training history in {metrics_dir}; run `dvc repro train` first")
    return pd.DataFrame(columns).rename_axis("epoch")


def write_outputs(
    out_dir, labels, probs, images, history, gallery_size, dtype_policy, classes, feedback=None
):
    """feedback: feedback_metrics of the feedback test part, or None without feedback."""
    with atomic_dir(out_dir) as tmp:
        metrics = {**compute_metrics(labels, probs), "dtype_policy": dtype_policy}
        if feedback is not None:
            metrics["feedback"] = feedback
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "per_class.json", per_class_metrics(labels, probs, classes))
        predicted = probs.argmax(axis=1)
        names = np.asarray(classes, dtype=object)
        pd.DataFrame({"actual": names[labels], "predicted": names[predicted]}).to_csv(
            tmp / "confusion.csv", index=False
        )
        plots = tmp / "plots"
        plots.mkdir()
        figures.confusion_heatmap(
            confusion_matrix(labels, predicted, len(classes)),
            classes,
            plots / "confusion.png",
        )
        figures.training_curves(history, plots / "curves.png")
        worst = most_confident_errors(labels, probs, gallery_size)
        figures.error_gallery(
            images[worst],
            names[labels[worst]],
            names[predicted[worst]],
            probs[worst, predicted[worst]],
            plots / "errors.png",
        )
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="trained .keras file")
    parser.add_argument("--data", required=True, help="directory of prepared .npy arrays")
    parser.add_argument("--live", required=True, help="dvclive directory written by train")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    p = params.load(Params)
    model = models.load_model(args.model)
    test = load_prepared(args.data, splits=("test",))
    history = read_history(args.live)
    probs = model.predict(test["x_test"], batch_size=p.batch_size, verbose=0)
    feedback = score_feedback(model, args.data, p.batch_size)
    metrics = write_outputs(
        args.out,
        test["y_test"],
        probs,
        test["x_test"],
        history,
        p.gallery_size,
        # What train's `auto` chose, as it recorded it; the loaded layers compute in it.
        models.recorded(args.model, "training").get("precision", "unrecorded"),
        load_info(args.data)["classes"],
        feedback,
    )
    print(
        f"evaluate: test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}, "
        f"{metrics['errors']} errors ({len(test['y_test'])} images, model computing in "
        f"{metrics['dtype_policy']}) -> {args.out}"
    )
    if feedback and feedback["images"]:
        print(
            f"evaluate: feedback test accuracy {feedback['accuracy']:.4f}, "
            f"{feedback['errors']} errors ({feedback['images']} images)"
        )


if __name__ == "__main__":
    run_cli(main)
