"""Metrics math, the error gallery's order, and the figures, on hand-checkable data."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from stages import evaluate, models
from stages.common import PipelineError
from stages.dataset import load_prepared
from tests.conftest import MNIST_INFO, make_prepared


def one_hot_probs(predicted, confidence, classes=10):
    """Softmax-like rows: `confidence` on the predicted class, the rest spread evenly."""
    probs = np.full((len(predicted), classes), 0.0)
    for i, (p, c) in enumerate(zip(predicted, confidence, strict=False)):
        probs[i] = (1 - c) / (classes - 1)
        probs[i, p] = c
    return probs


def test_metrics_on_a_hand_checked_confusion():
    # 4 images: two 0s (one predicted 1), one 1, one 2 predicted 1.
    labels = np.array([0, 0, 1, 2])
    probs = one_hot_probs([0, 1, 1, 1], [0.9, 0.6, 0.8, 0.7])
    m = evaluate.compute_metrics(labels, probs)
    true_class_p = [0.9, 0.4 / 9, 0.8, 0.3 / 9]
    assert m == {
        "accuracy": 0.5,
        "errors": 2,
        "loss": pytest.approx(-np.mean(np.log(true_class_p))),
    }
    per_class = evaluate.per_class_metrics(labels, probs, MNIST_INFO["classes"])
    assert per_class["0"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    assert per_class["1"] == {
        "precision": pytest.approx(1 / 3),
        "recall": 1.0,
        "f1": 0.5,
        "support": 1,
    }
    assert per_class["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert per_class["9"]["support"] == 0
    # Probability of the true class: 0.9, 0.4/9, 0.8, 0.3/9.
    want = -(math.log(0.9) + math.log(0.4 / 9) + math.log(0.8) + math.log(0.3 / 9)) / 4
    assert m["loss"] == pytest.approx(want)


def test_cross_entropy_clips_zero_probability_like_keras():
    probs = np.zeros((1, 10))
    probs[0, 3] = 1.0
    assert evaluate.cross_entropy(probs, np.array([5])) == pytest.approx(-math.log(1e-7))


def test_gallery_lists_the_most_confident_mistakes_first():
    labels = np.array([0, 1, 2, 3, 4])
    probs = one_hot_probs([0, 7, 2, 8, 9], [0.99, 0.6, 0.9, 0.95, 0.7])
    assert evaluate.most_confident_errors(labels, probs, k=2).tolist() == [3, 4]
    assert evaluate.most_confident_errors(labels, probs, k=10).tolist() == [3, 4, 1]
    assert (
        evaluate.most_confident_errors(labels, one_hot_probs(labels, [0.5] * 5), k=3).tolist() == []
    )


def write_history(live_dir, losses, val_losses):
    for split, values in (("train", losses), ("eval", val_losses)):
        for metric in ("loss", "accuracy"):
            d = live_dir / "plots" / "metrics" / split
            d.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"step": range(1, len(values) + 1), metric: values}).to_csv(
                d / f"{metric}.tsv", sep="\t", index=False
            )


def test_history_is_read_from_dvclive_with_1_based_epochs(tmp_path):
    write_history(tmp_path, [0.5, 0.3], [0.4, 0.35])
    history = evaluate.read_history(tmp_path)
    assert history.index.tolist() == [1, 2]
    assert history["val_loss"].tolist() == [0.4, 0.35]
    assert sorted(history.columns) == ["accuracy", "loss", "val_accuracy", "val_loss"]


def test_outputs_are_written_together_as_valid_pngs(tmp_path):
    labels = np.arange(20) % 10
    probs = one_hot_probs((labels + (np.arange(20) % 3 == 0)) % 10, np.linspace(0.5, 0.99, 20))
    images = np.random.default_rng(0).uniform(size=(20, 28, 28, 1)).astype(np.float32)
    write_history(tmp_path / "live", [0.5, 0.3], [0.4, 0.35])
    metrics = evaluate.write_outputs(
        tmp_path / "out",
        labels,
        probs,
        images,
        evaluate.read_history(tmp_path / "live"),
        gallery_size=4,
        dtype_policy="mixed_bfloat16",
        classes=MNIST_INFO["classes"],
    )
    confidence = np.linspace(0.5, 0.99, 20)
    wrong = np.arange(20) % 3 == 0
    true_class_p = np.where(wrong, (1 - confidence) / 9, confidence)
    assert metrics == {
        "accuracy": 13 / 20,
        "loss": pytest.approx(-np.log(true_class_p).mean()),
        "errors": 7,
        "dtype_policy": "mixed_bfloat16",
    }
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
    per_class = json.loads((tmp_path / "out" / "per_class.json").read_text())
    assert [per_class[str(c)]["support"] for c in range(10)] == [2] * 10
    confusion = pd.read_csv(tmp_path / "out" / "confusion.csv")
    assert confusion.columns.tolist() == ["actual", "predicted"] and len(confusion) == 20
    for name in ("confusion.png", "curves.png", "errors.png"):
        data = (tmp_path / "out" / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 300 and height >= 150, (name, width, height)


def test_classes_are_named_in_every_output_and_colour_images_are_drawn(tmp_path):
    labels = np.array([0, 1, 2, 2, 1])
    probs = one_hot_probs(np.array([0, 1, 2, 0, 1]), np.full(5, 0.8), classes=3)
    images = np.random.default_rng(0).uniform(size=(5, 12, 16, 3)).astype(np.float32)
    write_history(tmp_path / "live", [0.5], [0.4])
    classes = ["cat", "dog", "T-shirt/top, long"]
    evaluate.write_outputs(
        tmp_path / "out",
        labels,
        probs,
        images,
        evaluate.read_history(tmp_path / "live"),
        gallery_size=4,
        dtype_policy="float32",
        classes=classes,
    )
    per_class = json.loads((tmp_path / "out" / "per_class.json").read_text())
    assert list(per_class) == ["T-shirt/top, long", "cat", "dog"]  # sorted by write_json
    assert per_class["T-shirt/top, long"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    confusion = pd.read_csv(tmp_path / "out" / "confusion.csv")
    assert confusion["actual"].tolist() == ["cat", "dog", classes[2], classes[2], "dog"]
    assert confusion["predicted"].tolist() == ["cat", "dog", classes[2], "cat", "dog"]
    assert (tmp_path / "out" / "plots" / "errors.png").read_bytes()[:4] == b"\x89PNG"


def test_a_truncated_model_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PipelineError) as error:
        models.load_model(path)
    assert str(error.value).startswith(f"{path} is not a readable Keras model (")
    assert str(error.value).endswith(
        "); restore it with `dvc checkout` or rebuild it with `dvc repro train`"
    )


def test_a_file_that_is_no_zip_archive_is_a_one_line_error(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("a text file")
    with pytest.raises(PipelineError) as error:
        models.load_model(path)
    assert str(error.value).startswith(f"{path} is not a readable Keras model (not a zip ")


def test_a_truncated_prepared_array_is_a_one_line_error(tmp_path):
    make_prepared(tmp_path)
    path = tmp_path / "x_test.npy"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PipelineError) as error:
        load_prepared(tmp_path, splits=("test",))
    assert str(error.value).startswith(f"{path} is not a readable .npy array (")
    assert str(error.value).endswith(
        "); restore it with `dvc checkout` or rebuild it with `dvc repro prepare`"
    )
