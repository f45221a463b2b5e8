"""Feedback through the pipeline: the folder's split by content hash, fetch's preparation of
its images (the same as predict's), prepare, train's oversampling, evaluate's metric, the
report, and a real `dvc repro` on tiny data: the metric appears and the right stages rerun."""

import gzip
import hashlib
import io
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stages import dataset, evaluate, feedback, fetch, prepare, train
from stages.common import PipelineError
from tests.conftest import (
    HAVE_MNIST,
    MNIST_INFO,
    MNIST_MIRROR,
    ROOT,
    copy_reproduced,
    edit_params,
    ran_stages,
    sh,
)
from tools import predict, report

MNIST = fetch.load_description(ROOT / "data" / "mnist.yaml")
DIGITS = MNIST_INFO["classes"]
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")


def drawing(shift=0, width=20, digit="1"):
    """A digit as the page sends it: white strokes on a black 280x280 canvas, as PNG bytes.
    `shift` moves it right by that many pixels, so each shift is another image."""
    canvas = Image.new("L", (280, 280))
    pen = ImageDraw.Draw(canvas)
    strokes = {"1": [(140, 50), (140, 230)], "7": [(80, 60), (200, 60), (120, 230)]}[digit]
    pen.line([(x + shift, y) for x, y in strokes], fill=255, width=width)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def file_images(root, images):
    """Writes {class: [bytes, ...]} as root/<class>/<content hash>.png, as the server does."""
    for label, blobs in images.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for data in blobs:
            (root / label / f"{feedback.content_hash(data)}.png").write_bytes(data)
    return root


# --- the split -----------------------------------------------------------------------------


def test_the_side_of_an_image_is_the_first_32_bits_of_its_hash_against_a_fifth():
    # 0.2 * 2**32 = 858993459.2 = 0x33333333.33: 0x33333333 is the last test value.
    assert feedback.is_test("33333333" + "f" * 56)
    assert not feedback.is_test("33333334" + "0" * 56)
    assert feedback.is_test("0" * 64) and not feedback.is_test("f" * 64)
    data = drawing()
    assert feedback.content_hash(data) == hashlib.sha256(data).hexdigest()


def test_fetch_prepares_each_image_as_predict_prepares_an_upload_and_splits_by_content(tmp_path):
    blobs = {
        "1": [drawing(s) for s in range(-40, 40, 4)],
        "7": [drawing(s, 24, "7") for s in (0, 9)],
    }
    root = file_images(tmp_path / "feedback", blobs)
    parts = feedback.read_feedback(root, DIGITS, "digits", (28, 28, 1))
    every = {feedback.content_hash(d): (label, d) for label, ds in blobs.items() for d in ds}
    for part, test in (("feedback_train", False), ("feedback_test", True)):
        digests = sorted(h for h in every if feedback.is_test(h) == test)
        x, y = parts[part]
        assert x.shape == (len(digests), 28, 28, 1) and x.dtype == np.uint8
        assert [DIGITS[i] for i in y] == [every[h][0] for h in digests]  # in hash order
        # predict's own preparation of the same bytes, to within MNIST's 8 bits
        digits_model = SimpleNamespace(dataset=MNIST_INFO, input_shape=(28, 28, 1))
        for image, h in zip(x, digests, strict=True):
            expected = predict.model_input(digits_model, every[h][1], "upload")[0]
            assert np.abs(image / 255 - expected).max() <= 1 / 510 + 1e-7
    sizes = [len(parts[p][1]) for p in feedback.PARTS]
    assert sum(sizes) == 22 and 0 < sizes[1] < sizes[0]


def test_an_image_keeps_its_side_as_the_folder_grows(tmp_path):
    root = tmp_path / "feedback"
    file_images(root, {"1": [drawing(s) for s in range(0, 30, 3)]})
    before = feedback.read_feedback(root, DIGITS, "digits", (28, 28, 1))
    file_images(root, {"1": [drawing(s) for s in range(1, 30, 3)], "7": [drawing(0, 20, "7")]})
    after = feedback.read_feedback(root, DIGITS, "digits", (28, 28, 1))
    for part in feedback.PARTS:
        old = {image.tobytes() for image in before[part][0]}
        new = {image.tobytes() for image in after[part][0]}
        assert old <= new  # every image of each part is still in that part
    assert len(after["feedback_train"][1]) + len(after["feedback_test"][1]) == 21


def test_an_empty_folder_is_two_empty_parts(tmp_path):
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / ".gitkeep").write_text("")
    parts = feedback.read_feedback(tmp_path / "none", DIGITS, "digits", (28, 28, 1))
    assert {p: (x.shape, y.shape) for p, (x, y) in parts.items()} == {
        "feedback_train": ((0, 28, 28, 1), (0,)),
        "feedback_test": ((0, 28, 28, 1), (0,)),
    }


def test_a_resize_dataset_resizes_feedback_as_fetch_resizes_a_folder(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 100, 50))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    file_images(tmp_path / "fb", {"b": [buffer.getvalue()]})
    parts = feedback.read_feedback(tmp_path / "fb", ["a", "b"], "resize", (8, 16, 3))
    x, y = next((x, y) for x, y in parts.values() if len(y))
    assert x.shape == (1, 8, 16, 3) and y.tolist() == [1]
    assert x[0, 0, 0].tolist() == [200, 100, 50]


CLASSES = "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"


@pytest.mark.parametrize(
    "layout, message",
    [
        (
            {"stray.png": b"x"},
            "{root}/stray.png: a file beside the class folders; lay {root} out as <class>/<image>",
        ),
        (
            {"x/a.png": b"x"},
            f"{{root}}/x: x is not a class of the dataset ({CLASSES}); "
            "move its images to their class's folder",
        ),
        (
            {"3/a.txt": b"notes"},
            "{root}/3/a.txt: not a PNG, JPEG, BMP, GIF or WebP image; remove it",
        ),
        ({"3/blank.png": "blank"}, "{root}/3/blank.png: no digit found; remove it"),
        (
            {"3/a.png": "one", "4/b.png": "one"},
            "{root}/3/a.png and {root}/4/b.png are the same image filed as two classes; "
            "remove the wrong one",
        ),
    ],
)
def test_a_bad_feedback_folder_is_one_line_naming_the_file(tmp_path, layout, message):
    root = tmp_path / "feedback"
    made = {"blank": drawing(width=0), "one": drawing()}
    for name, content in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(
            made.get(content, content) if isinstance(content, str) else content
        )
    with pytest.raises(PipelineError) as error:
        feedback.read_feedback(root, DIGITS, "digits", (28, 28, 1))
    assert str(error.value) == message.format(root=root)


# --- fetch and prepare -----------------------------------------------------------------------


@needs_mnist
def test_fetch_writes_the_feedback_parts_beside_mnist_and_nothing_for_an_empty_folder(tmp_path):
    plain = tmp_path / "plain"
    fetch.fetch_idx(MNIST, [str(MNIST_MIRROR)], plain, 5)
    empty = tmp_path / "empty"
    fetch.fetch_idx(MNIST, [str(MNIST_MIRROR)], empty, 5, ROOT / "data" / "no-feedback")
    # The default, an empty folder: the very same files, so the baseline's hashes stay.
    assert sorted(p.name for p in empty.iterdir()) == sorted(p.name for p in plain.iterdir())
    for path in plain.iterdir():
        assert (empty / path.name).read_bytes() == path.read_bytes()

    root = file_images(tmp_path / "feedback", {"1": [drawing(s) for s in range(0, 40, 2)]})
    with_feedback = tmp_path / "with"
    fetch.fetch_idx(MNIST, [str(MNIST_MIRROR)], with_feedback, 5, root)
    info = json.loads((with_feedback / "dataset.json").read_text())
    assert info["files"]["feedback_train"] == [
        "feedback-train-images.idx.gz",
        "feedback-train-labels.idx.gz",
    ]
    info_plain = json.loads((plain / "dataset.json").read_text())
    assert {k: v for k, v in info.items() if k != "files"} == {
        k: v for k, v in info_plain.items() if k != "files"
    }
    _, raw, parts = prepare.load_raw(with_feedback)
    arrays = prepare.prepare_feedback(parts, 10)
    expected = feedback.read_feedback(root, DIGITS, "digits", (28, 28, 1))
    for part in feedback.PARTS:
        assert np.array_equal(arrays[f"x_{part}"], expected[part][0] / np.float32(255))
        assert arrays[f"x_{part}"].dtype == np.float32
        assert np.array_equal(arrays[f"y_{part}"], expected[part][1])
    assert len(raw) == 4 and prepare.load_raw(plain)[2] == {}


def test_the_stage_refuses_a_feedback_folder_that_is_not_there(workdir):
    (workdir / "params.yaml").write_text(
        (ROOT / "params.yaml").read_text().replace("feedback: data/no-feedback", "feedback: fb")
    )
    with pytest.raises(PipelineError) as error:
        fetch.main(["--out", "raw"])
    assert str(error.value) == (
        "fetch.feedback fb: no such folder; name a folder of corrections "
        "(`python -m tools.serve --collect data/feedback`, then `dvc add data/feedback`), "
        "or data/no-feedback for none"
    )


def test_fetch_idx_reads_the_image_shape_from_the_idx_header(tmp_path):
    path = tmp_path / "x.idx.gz"
    fetch.write_idx(path, np.zeros((3, 12, 9), np.uint8))
    assert fetch.idx_shape(path) == (3, 12, 9)
    with gzip.open(path) as f:
        assert f.read(4) == bytes([0, 0, 8, 3])


# --- train and evaluate -----------------------------------------------------------------------


def test_train_appends_each_feedback_image_n_times_and_keeps_validation():
    data = {
        "x_train": np.zeros((4, 28, 28, 1), np.float32),
        "y_train": np.array([0, 1, 2, 3], np.uint8),
        "x_val": np.zeros((2, 28, 28, 1), np.float32),
        "y_val": np.array([4, 5], np.uint8),
    }
    fb = {
        "x_feedback_train": np.ones((2, 28, 28, 1), np.float32),
        "y_feedback_train": np.array([7, 9], np.uint8),
    }
    mixed = train.with_feedback(data, fb, 3)
    assert mixed["y_train"].tolist() == [0, 1, 2, 3, 7, 7, 7, 9, 9, 9]
    assert mixed["x_train"].shape == (10, 28, 28, 1) and mixed["x_train"][4:].min() == 1
    assert mixed["x_val"] is data["x_val"] and mixed["y_val"] is data["y_val"]
    empty = {
        "x_feedback_train": np.zeros((0, 28, 28, 1), np.float32),
        "y_feedback_train": np.zeros(0, np.uint8),
    }
    with pytest.raises(
        PipelineError, match=r"^train\.feedback is set but the feedback training part is empty"
    ):
        train.with_feedback(data, empty, 3)


def test_train_with_feedback_on_and_none_in_the_data_says_what_to_set(tmp_path):
    with pytest.raises(PipelineError) as error:
        train.load_feedback(tmp_path)
    assert str(error.value) == (
        f"train.feedback is set but {tmp_path} holds no feedback; set fetch.feedback to a "
        "folder of corrections (docs/feedback.md) or train.feedback: none"
    )


def test_evaluate_scores_the_feedback_test_part_beside_the_test_set():
    labels = np.array([1, 7, 7, 3])
    probs = np.eye(10)[[1, 7, 1, 3]]  # the third is wrong
    assert evaluate.feedback_metrics(labels, probs) == {"accuracy": 0.75, "errors": 1, "images": 4}


def test_evaluate_without_feedback_writes_the_metrics_it_always_wrote(tmp_path):
    class Model:
        def predict(self, x, batch_size, verbose):
            return np.eye(10)[np.full(len(x), 3)]

    assert evaluate.score_feedback(Model(), tmp_path, 10) is None  # no feedback split
    for part, n in (("feedback_train", 2), ("feedback_test", 0)):
        np.save(tmp_path / f"x_{part}.npy", np.zeros((n, 28, 28, 1), np.float32))
        np.save(tmp_path / f"y_{part}.npy", np.full(n, 3, np.uint8))
    assert dataset.has_split(tmp_path, "feedback_test")
    assert evaluate.score_feedback(Model(), tmp_path, 10) == {"images": 0}
    np.save(tmp_path / "x_feedback_test.npy", np.zeros((2, 28, 28, 1), np.float32))
    np.save(tmp_path / "y_feedback_test.npy", np.array([3, 4], np.uint8))
    assert evaluate.score_feedback(Model(), tmp_path, 10) == {
        "accuracy": 0.5,
        "errors": 1,
        "images": 2,
    }


# --- the report -------------------------------------------------------------------------------


def test_the_report_shows_the_feedback_accuracy_beside_the_test_accuracy():
    path = "data/evaluate/metrics.json"
    diff = {
        path: {
            "accuracy": {"old": 0.99, "new": 0.991, "diff": 0.001},
            "feedback.accuracy": {"old": 0.5, "new": 0.75, "diff": 0.25},
            "feedback.images": {"old": 12, "new": 12, "diff": 0},
        }
    }
    text = report.render("main", diff, {}, path, {})
    verdict = "**Test accuracy up by 0.10 pp**: 99.00% → 99.10% (against `main`)"
    assert f"{verdict}; feedback test accuracy 50.00% → 75.00% (12 images)" in text
    assert f"| `{path}` | feedback.accuracy | 0.5000 | 0.7500 | +0.2500 |" in text
    assert f"| `{path}` | feedback.images | 12 | 12 | +0 |" in text
    # Against a base without feedback: the new figure alone.
    diff[path]["feedback.accuracy"] = {"new": 0.75}
    text = report.render("main", diff, {}, path, {})
    assert "; feedback test accuracy 75.00% (12 images)" in text
    assert f"| `{path}` | feedback.accuracy | — | 0.7500 | new |" in text


# --- the real pipeline ------------------------------------------------------------------------


@pytest.mark.slow
@needs_mnist
def test_dvc_repro_with_feedback_reruns_from_fetch_and_reports_the_feedback_metric(
    reproduced, tmp_path
):
    repo = copy_reproduced(reproduced, tmp_path / "project")
    # Feedback as the page files it: 24 drawn 1s and 7s.
    blobs = {
        "1": [drawing(s) for s in range(-60, 60, 10)],
        "7": [drawing(s, 24, "7") for s in range(-60, 60, 10)],
    }
    file_images(repo / "data" / "feedback", blobs)
    # What a writer killed mid-write leaves: .dvcignore keeps it out of the tracked folder.
    (repo / "data" / "feedback" / ".incoming-x.tmp").write_bytes(b"half an image")
    sh(repo, "dvc", "add", "-q", "data/feedback")
    assert "nfiles: 24\n" in (repo / "data" / "feedback.dvc").read_text()
    edit_params(repo / "params.yaml", fetch__feedback="data/feedback")
    status = " ".join(sh(repo, "dvc", "status").split())
    assert status == (
        "fetch: changed deps: modified: data/feedback params.yaml: modified: fetch.feedback"
    )
    # Up to evaluate, which scores the feedback (export follows train as always).
    output = sh(repo, "dvc", "repro", "evaluate")
    assert ran_stages(output) == ["fetch", "prepare", "train", "evaluate"]
    digests = [feedback.content_hash(d) for ds in blobs.values() for d in ds]
    n_test = sum(feedback.is_test(h) for h in digests)
    counts = f"24 feedback images, {24 - n_test} for training, {n_test} for testing"
    assert f"fetch: data/feedback: {counts}" in output
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert metrics["feedback"]["images"] == n_test
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "main", "--json"))[
        "data/evaluate/metrics.json"
    ]
    assert diff["feedback.accuracy"] == {"old": None, "new": metrics["feedback"]["accuracy"]}
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "repro", "evaluate")

    # Nothing new: re-adding the folder changes nothing, and nothing reruns.
    sh(repo, "dvc", "add", "-q", "data/feedback")
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "status", "evaluate")
    # Training with the feedback: train and what follows, not fetch or prepare.
    edit_params(repo / "params.yaml", train__feedback=5)
    output = sh(repo, "dvc", "repro", "evaluate")
    assert ran_stages(output) == ["train", "evaluate"]
    assert f"train: {24 - n_test} feedback training images, each 5 times per epoch" in output
    # A new correction, re-added: the pipeline reruns from fetch (stopped at prepare here,
    # whose new output train then depends on).
    file_images(repo / "data" / "feedback", {"7": [drawing(70, 24, "7")]})
    sh(repo, "dvc", "add", "-q", "data/feedback")
    assert ran_stages(sh(repo, "dvc", "repro", "prepare")) == ["fetch", "prepare"]
    status = " ".join(sh(repo, "dvc", "status", "train").split())
    assert status.startswith("train: changed deps: modified: data/prepared"), status
    shutil.rmtree(repo)
