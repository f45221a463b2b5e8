"""IDX parsing, scaling and the validation split, on hand-made bytes and arrays."""

import gzip
import os
import stat

import numpy as np
import pytest

from stages import prepare
from stages.common import PipelineError, atomic_dir


def idx_bytes(array, magic=None):
    """Encodes a uint8 array as IDX: magic 0x0000 08 <ndim>, big-endian dims, then the body."""
    magic = magic if magic is not None else 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx_reads_labels_and_images():
    assert prepare.parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]), ndim=1).tolist() == [7, 0, 9]
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    assert np.array_equal(prepare.parse_idx(idx_bytes(images), ndim=3), images)


def test_wrong_magic_number_is_rejected():
    with pytest.raises(PipelineError) as error:
        prepare.parse_idx(idx_bytes(np.zeros(3), magic=0x0803), ndim=1, name="labels.gz")
    assert str(error.value) == (
        "labels.gz: wrong IDX magic number 0x00000803, expected 0x00000801; "
        "delete data/raw and rerun fetch"
    )


def test_body_shorter_than_header_says_is_rejected():
    with pytest.raises(PipelineError) as error:
        prepare.parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), ndim=1, name="labels.gz")
    assert str(error.value) == "labels.gz: header says 5 = 5 values but the file holds 2"


def test_read_idx_of_a_missing_file_says_which_stage_to_run(tmp_path):
    with pytest.raises(PipelineError) as error:
        prepare.read_idx(tmp_path / "x.gz", ndim=1)
    assert str(error.value) == f"{tmp_path / 'x.gz'} not found; run `dvc repro fetch` first"


def test_read_idx_decompresses(tmp_path):
    (tmp_path / "l.gz").write_bytes(gzip.compress(idx_bytes(np.array([3, 1, 4]))))
    assert prepare.read_idx(tmp_path / "l.gz", ndim=1).tolist() == [3, 1, 4]


def test_scaling_adds_a_channel_and_maps_255_to_1():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[1, 27, 27] = 255, 51
    scaled = prepare.scale_images(images)
    assert scaled.shape == (2, 28, 28, 1) and scaled.dtype == np.float32
    assert scaled[0, 0, 0, 0] == 1.0 and scaled[1, 27, 27, 0] == pytest.approx(0.2)
    assert scaled.sum() == pytest.approx(1.2)


def test_colour_images_keep_their_three_channels():
    images = np.zeros((2, 5, 7, 3), dtype=np.uint8)
    images[1, 4, 6] = (255, 0, 51)
    scaled = prepare.scale_images(images)
    assert scaled.shape == (2, 5, 7, 3)
    assert scaled[1, 4, 6].tolist() == [1.0, 0.0, pytest.approx(0.2)]


def test_images_of_the_wrong_shape_are_rejected():
    with pytest.raises(PipelineError) as error:
        prepare.scale_images(np.zeros((4, 32, 32, 2), dtype=np.uint8))
    assert str(error.value) == (
        "images must have shape (N, height, width) or (N, height, width, 1 or 3), "
        "got (4, 32, 32, 2)"
    )


def test_a_size_over_what_the_dataset_holds_is_one_line():
    images, labels = np.zeros((30, 28, 28), np.uint8), np.zeros(30, np.uint8)
    with pytest.raises(PipelineError) as error:
        prepare.prepare(images, labels, images, labels, 31, 0.5)
    assert str(error.value) == (
        "prepare.train_size is 31 but the dataset has 30 training images; lower it or set it to all"
    )


def test_split_takes_the_last_fraction_unshuffled_like_keras():
    x = np.arange(10)
    (x_tr, _), (x_val, _) = prepare.split_validation(x, x, 0.2)
    assert x_tr.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and x_val.tolist() == [8, 9]
    (x_tr, _), (x_val, _) = prepare.split_validation(np.arange(60_000), np.arange(60_000), 0.2)
    assert (len(x_tr), len(x_val), x_val[0]) == (48_000, 12_000, 48_000)
    (x_tr, _), (x_val, _) = prepare.split_validation(np.arange(7), np.arange(7), 0.5)
    assert (len(x_tr), len(x_val)) == (3, 4)  # floor(7 * 0.5) = 3, as Keras


def test_split_that_leaves_no_training_data_is_rejected():
    with pytest.raises(PipelineError) as error:
        prepare.split_validation(np.arange(1), np.arange(1), 0.5)
    assert str(error.value) == (
        "validation_split 0.5 leaves no training images out of 1; "
        "lower prepare.validation_split or raise prepare.train_size"
    )


def test_prepare_limits_train_size_before_splitting():
    images = np.zeros((100, 28, 28), dtype=np.uint8)
    labels = np.arange(100, dtype=np.uint8) % 10
    arrays = prepare.prepare(images, labels, images[:20], labels[:20], 50, 0.2)
    assert {k: len(v) for k, v in arrays.items()} == {
        "x_train": 40,
        "y_train": 40,
        "x_val": 10,
        "y_val": 10,
        "x_test": 20,
        "y_test": 20,
    }
    assert arrays["y_val"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_prepare_keeps_the_first_test_size_test_images():
    images = np.arange(30, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 10
    arrays = prepare.prepare(images, labels, images, labels, "all", 0.5, test_size=12)
    assert arrays["y_test"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert arrays["x_test"][:, 0, 0, 0].tolist() == [np.float32(i) / 255 for i in range(12)]
    assert (len(arrays["x_train"]), len(arrays["x_val"])) == (15, 15)  # train set untouched


@pytest.mark.parametrize(
    ("train_size", "validation_split", "test_size", "message"),
    [
        (
            30,
            0.2,
            "all",
            "6 validation images for 10 classes: too few for a sound split (at "
            "least one per class); add images, raise prepare.validation_split, or set it to 0",
        ),
        (
            12,
            0.5,
            "all",
            "6 training images for 10 classes: too few for a sound split (at "
            "least one per class); add images, or raise prepare.train_size",
        ),
        (
            "all",
            0.5,
            9,
            "9 test images for 10 classes: too few for a sound split (at least "
            "one per class); add images, raise fetch.test_split (a folder) or prepare.test_size",
        ),
    ],
)
def test_a_split_with_fewer_images_than_classes_is_one_line(
    train_size, validation_split, test_size, message
):
    images = np.zeros((30, 28, 28), dtype=np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 10
    with pytest.raises(PipelineError) as error:
        prepare.prepare(images, labels, images, labels, train_size, validation_split, test_size)
    assert str(error.value).startswith(message)
    no_validation = prepare.prepare(images, labels, images, labels, "all", 0.0, "all")
    assert len(no_validation["x_val"]) == 0  # none at all is sound: fit runs without


def test_labels_out_of_range_are_rejected():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    with pytest.raises(PipelineError) as error:
        prepare.prepare(
            images, np.array([1, 12], dtype=np.uint8), images, np.zeros(2, np.uint8), "all", 0.5
        )
    assert str(error.value) == "train: label 12 out of range 0-9 (10 classes in dataset.json)"


def test_written_outputs_get_the_usual_permissions_not_mkdtemps(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.npy").write_bytes(b"")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
