"""Datasets other than MNIST: a folder of labelled images (the same arrays as the IDX path,
colour, scikit-learn's digits, every bad folder) and the other IDX sets."""

import gzip
import hashlib
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import fetch, models, prepare
from stages.common import PipelineError
from tests.conftest import (
    HAVE_MNIST,
    ROOT,
    commit,
    copy_project,
    edit_params,
    extras,
    git_identity,
    mnist_arrays,
    png_bytes,
    png_header_only,
    run_stage,
    sh,
    write_params,
)

PIXELS = (Image.new("L", (9, 7), 200), Image.new("RGB", (9, 7), (10, 20, 30)))


@pytest.fixture(autouse=True)
def no_feedback(tmp_path):
    """The empty folder that fetch.feedback names by default, as a clone has it."""
    (tmp_path / "data" / "no-feedback").mkdir(parents=True, exist_ok=True)


def fetched(workdir, source, **overrides):
    """Runs the fetch and prepare stages on `source` as DVC would; returns their output."""
    write_params(workdir / "params.yaml", fetch__source=str(source), **overrides)
    fetch_run = run_stage("fetch", "--out", workdir / "raw", cwd=workdir, check=False)
    if fetch_run.returncode:
        return fetch_run
    return run_stage(
        "prepare", "--raw", workdir / "raw", "--out", workdir / "prepared", cwd=workdir
    )


def folder(root, layout):
    """Writes {"cat/a.png": PIL image or bytes, ...} under root; returns root."""
    for name, content in layout.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.save(path)
    return root


@pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")
def test_mnist_as_a_folder_of_pngs_gives_the_idx_path_s_arrays(workdir):
    train_x, train_y, test_x, test_y = (a[:300] for a in mnist_arrays())
    root = workdir / "mnist-pngs"
    for split, xs, ys in (("train", train_x, train_y), ("test", test_x, test_y)):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            (root / split / str(y)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(root / split / str(y) / f"{i:05d}.png")
    fetched(workdir, root, prepare__validation_split=0.0)
    got = {
        k: np.load(workdir / "prepared" / f"{k}.npy")
        for k in ("x_train", "y_train", "x_test", "y_test")
    }
    want = prepare.prepare(train_x, train_y, test_x, test_y, "all", 0.0)
    # The test images keep their files' order; the training images are in a seeded random
    # order, so that the validation split holds every class: compared as sets of rows.
    by_class = np.argsort(want["y_test"], kind="stable")  # the files' order: class, then name
    assert np.array_equal(got["x_test"], want["x_test"][by_class])
    assert np.array_equal(got["y_test"], want["y_test"][by_class])

    def rows(x, y):
        return sorted(zip(y.tolist(), (image.tobytes() for image in x), strict=True))

    assert rows(got["x_train"], got["y_train"]) == rows(want["x_train"], want["y_train"])
    assert not np.array_equal(got["y_train"], np.sort(got["y_train"]))  # shuffled
    info = json.loads((workdir / "prepared" / "dataset.json").read_text())
    assert info == {
        "name": str(root),
        "classes": [str(d) for d in range(10)],
        "preparation": "resize",
    }


def test_scikit_learn_digits_as_a_folder_split_by_class(workdir, monkeypatch):
    monkeypatch.syspath_prepend(extras("sklearn"))
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 images, 8x8, values 0-16
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        (workdir / "digits" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(
            workdir / "digits" / str(label) / f"{i}.png"
        )
    result = fetched(
        workdir, workdir / "digits", fetch__image_size=[8, 8], prepare__validation_split=0.2
    )
    assert "prepare: wrote" in result.stdout and "8x8x1" in result.stdout
    y_test = np.load(workdir / "prepared" / "y_test.npy")
    counts = np.bincount(digits.target)
    # Stratified: each class holds out round(20%) of its images.
    assert np.bincount(y_test).tolist() == [round(0.2 * n) for n in counts]
    x_train = np.load(workdir / "prepared" / "x_train.npy")
    kept = len(digits.target) - len(y_test)
    assert x_train.shape == (int(kept * 0.8), 8, 8, 1) and float(x_train.max()) == 1.0
    with pytest.raises(PipelineError) as error:
        models.build("fast", (8, 8, 1), 10)
    assert str(error.value).startswith("preset fast cannot take 8x8 images (")
    assert str(error.value).endswith("); choose compact or best, or raise fetch.image_size")
    assert models.build("compact", (8, 8, 1), 10).output_shape == (None, 10)


def test_a_colour_folder_is_resized_and_names_its_classes(workdir):
    layout = {}
    for name, colour in (("red", (255, 0, 0)), ("sea green", (0, 160, 80)), ("blue", (0, 0, 255))):
        for i in range(5):
            pixels = np.tile(np.array(colour, np.uint8), (20 + i, 30, 1))
            layout[f"{name}/{i}.jpg" if i % 2 else f"{name}/{i}.png"] = Image.fromarray(pixels)
    layout["red/.DS_Store"] = b"not an image, but hidden"
    folder(workdir / "images", layout)
    fetched(
        workdir,
        workdir / "images",
        fetch__image_size=[6, 4],
        fetch__channels=3,
        fetch__test_split=0.4,
        prepare__validation_split=0.4,  # of 9: 4, one or more per class
    )
    info = json.loads((workdir / "prepared" / "dataset.json").read_text())
    assert info["classes"] == ["blue", "red", "sea green"]
    x_test, y_test = (np.load(workdir / "prepared" / f"{k}_test.npy") for k in "xy")
    assert x_test.shape == (6, 6, 4, 3) and np.bincount(y_test).tolist() == [2, 2, 2]
    # Every pixel of a red image is red, after resizing and scaling (JPEG: near it).
    red = x_test[y_test == 1]
    assert np.allclose(red[..., 0], 1.0, atol=0.02) and np.allclose(red[..., 1:], 0, atol=0.02)


@pytest.mark.parametrize(
    ("layout", "params", "message"),
    [
        (
            {},
            {},
            "{root}: no images found; lay it out as <class>/<image>, one sub-folder per class",
        ),
        (
            {"cats/a.png": PIXELS[0]},
            {},
            "{root}: only one class (cats); a classifier needs 2 or more sub-folders, "
            "one per class",
        ),
        (
            {"cats/a.png": PIXELS[0], "dogs/.keep": b""},
            {},
            "{root}/dogs: no images; add some or remove the folder",
        ),
        (
            {
                "cats/a.png": PIXELS[0],
                "cats/b.png": PIXELS[0],
                "dogs/notes.txt": b"hello",
                "dogs/c.png": PIXELS[0],
            },
            {},
            "{root}/dogs/notes.txt: not an image Pillow can read; remove it or replace it by "
            "an image",
        ),
        (
            {
                "cats/a.png": PIXELS[0],
                "cats/b.png": PIXELS[0],
                "dogs/c.png": PIXELS[1],
                "dogs/d.png": PIXELS[1],
            },
            {"fetch__test_split": 0.5},
            "images of mixed channel counts: {root}/cats/a.png is grey, {root}/dogs/c.png colour; "
            "convert them all to one kind",
        ),
        (
            {
                "cats/a.png": PIXELS[1],
                "cats/b.png": PIXELS[1],
                "dogs/c.png": PIXELS[1],
                "dogs/d.png": PIXELS[1],
            },
            {"fetch__test_split": 0.5},
            "{root}/cats/a.png and the others are colour (3 channels) but fetch.channels is 1; "
            "set fetch.channels: 3",
        ),
        (
            {
                "cats/a.png": PIXELS[0],
                "cats/b.png": PIXELS[0],
                "dogs/c.png": png_header_only(10_000, 10_000),  # 100 MP claimed in 150 bytes
                "dogs/d.png": PIXELS[0],
            },
            {"fetch__test_split": 0.5},
            "{root}/dogs/c.png: too large (10000x10000 pixels; the limit is 40 megapixels); "
            "remove it or replace it by an image",
        ),
        (
            {"a/x.png": PIXELS[0], "a/y.png": PIXELS[0], "b/z.png": PIXELS[0]},
            {},
            "{root}/b: 1 image; holding out fetch.test_split of each class needs 2 or more; add "
            "images or lay the folder out as train/ and test/",
        ),
        (
            {
                "train/a/x.png": PIXELS[0],
                "train/b/y.png": PIXELS[0],
                "test/a/z.png": PIXELS[0],
                "test/c/w.png": PIXELS[0],
            },
            {},
            "{root}: train/ and test/ have different classes (a, b against a, c); give both the "
            "same sub-folders",
        ),
        (
            {"cats/a.png": PIXELS[0], "stray.png": PIXELS[0]},
            {},
            "{root}/stray.png: a file beside the class folders; lay {root} out as <class>/<image>",
        ),
    ],
    ids=[
        "empty",
        "one class",
        "empty class",
        "not an image",
        "mixed",
        "channels",
        "too large",
        "too small",
        "classes differ",
        "stray file",
    ],
)
def test_each_bad_folder_is_one_line_and_writes_nothing(workdir, layout, params, message):
    root = folder(workdir / "images", layout)
    root.mkdir(exist_ok=True)
    result = fetched(workdir, root, **params)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "Error: " + message.format(root=root)
    assert not (workdir / "raw").exists()
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".raw")] == []


def test_photos_stored_sideways_are_fetched_upright_as_their_exif_orientation_says(workdir):
    """A phone stores a photo as its sensor saw it and tags how to turn it for display:
    fetch turns it as predict does (stages/images.py), so it is upright in training too."""
    upright = np.zeros((8, 6), np.uint8)
    upright[:4, :3] = 255  # the top-left quarter white: each turn or mirror of it differs
    layout = {}
    # Orientation 6: turn 90 degrees clockwise to display; 8: counter-clockwise.
    for tag, stored in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
        exif = Image.Exif()
        exif[0x0112] = tag
        sideways = Image.fromarray(upright).transpose(stored)  # 8 wide, 6 tall
        for name in ("a", "b"):
            layout[f"train/{name}/{tag}.png"] = png_bytes(sideways, "PNG", exif=exif.tobytes())
            layout[f"test/{name}/{tag}.jpg"] = png_bytes(
                sideways, "JPEG", exif=exif.tobytes(), quality=95
            )
    folder(workdir / "images", layout)
    fetched(workdir, workdir / "images", fetch__image_size=[8, 6], prepare__validation_split=0.0)
    x_train, x_test = (np.load(workdir / "prepared" / f"x_{k}.npy") for k in ("train", "test"))
    assert x_train.shape == x_test.shape == (4, 8, 6, 1)
    want = prepare.scale_images(np.stack([upright] * 4))
    assert np.array_equal(x_train, want)  # PNG: exactly
    assert np.abs(x_test - want).max() < 0.05  # JPEG: within its artefacts


def test_a_source_that_is_neither_file_nor_folder_is_one_line(workdir):
    result = fetched(workdir, "data/cifar.yaml")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Error: fetch.source data/cifar.yaml: no such file or folder; name a dataset "
        "description (data/mnist.yaml, data/fashion-mnist.yaml, data/kmnist.yaml) or a "
        "folder of labelled images, <class>/<image>"
    )


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist"])
def test_the_other_idx_sets_are_fetched_and_parsed_with_their_class_names(workdir, name):
    """Small IDX files in each set's format, served by a mirror directory, their MD5s in
    the set's own description in place of the published ones."""
    described = yaml.safe_load((ROOT / "data" / f"{name}.yaml").read_text())
    rng = np.random.default_rng(1)
    mirror = workdir / "mirror"
    mirror.mkdir()
    arrays = {}
    for split, n in (("train", 40), ("test", 10)):  # 30 training, 10 validation: 10 classes
        images_file, labels_file = described[split]
        arrays[split] = (
            rng.integers(0, 256, (n, 28, 28), np.uint8),
            rng.integers(0, 10, n).astype(np.uint8),
        )
        for file, array in zip((images_file, labels_file), arrays[split], strict=True):
            (mirror / file).write_bytes(gzip.compress(fetch.idx_bytes(array)))
    described["checksums"] = {
        f: f"md5:{hashlib.md5((mirror / f).read_bytes()).hexdigest()}"
        for f in described["checksums"]
    }
    (workdir / f"{name}.yaml").write_text(yaml.safe_dump(described))
    env_name = described["mirror_env"]
    write_params(
        workdir / "params.yaml", fetch__source=f"{name}.yaml", prepare__validation_split=0.25
    )
    run_stage("fetch", "--out", workdir / "raw", cwd=workdir, env={env_name: str(mirror)})
    run_stage("prepare", "--raw", workdir / "raw", "--out", workdir / "prepared", cwd=workdir)
    info = json.loads((workdir / "prepared" / "dataset.json").read_text())
    assert info == {"name": name, "classes": described["classes"], "preparation": "resize"}
    x_train = np.load(workdir / "prepared" / "x_train.npy")
    assert np.array_equal(x_train[..., 0], arrays["train"][0][:30] / np.float32(255))
    assert np.array_equal(np.load(workdir / "prepared" / "y_test.npy"), arrays["test"][1])


def test_dvc_repro_on_a_folder_trains_evaluates_exports_and_predicts_by_name(tmp_path):
    """The user's path: images in data/images, `dvc add`, the four params a folder needs
    (source, image size, channels, preset) and nothing else, `dvc repro`."""
    repo = copy_project(tmp_path / "project")
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))):
        for i in range(30):
            pixels = rng.integers(0, 60, (18 + i % 5, 20, 3)).astype(np.uint8)
            y, x = rng.integers(0, 8, 2)
            pixels[y : y + 10, x : x + 10] = colour
            (repo / "data/images" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(repo / "data/images" / name / f"{i}.png")
    shutil.copy(repo / "data/images/red/0.png", tmp_path / "upload.png")
    edit_params(
        repo / "params.yaml",
        fetch__source="data/images",
        fetch__image_size=[12, 12],
        fetch__channels=3,
        train__model="fast",
        evaluate__gallery_size=4,
    )
    sh(repo, "git", "init", "-q", "-b", "main")
    git_identity(repo)
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "add", "-q", "data/images")
    commit(repo, "project on my images")
    output = sh(repo, "dvc", "repro")
    assert (
        "fetch: data/images: 3 classes (blue, green, red), 72 training and 18 test images" in output
    )
    per_class = json.loads((repo / "data/evaluate/per_class.json").read_text())
    assert sorted(per_class) == ["blue", "green", "red"]
    assert [per_class[c]["support"] for c in ("blue", "green", "red")] == [6, 6, 6]
    # 57 training images (72 less validation), not the 48,000 fast is sized for: its epoch
    # passes over them as often as makes its 94 steps, in batches of 32 at 32/512 its rate.
    assert (
        "57 training images, fewer than the 48,000 the fast recipe is sized for: each "
        "epoch passes over them 53 times, 95 steps of batch 32 at rate 0.000625"
    ) in output
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert metrics["accuracy"] >= 0.9, metrics  # chance: a third
    predicted = json.loads(
        sh(repo, "python", "-m", "tools.predict", "--json", tmp_path / "upload.png")
    )
    assert predicted["classes"] == ["blue", "green", "red"]
    assert predicted["model"] == "onnx data/export/model.onnx"
    assert predicted["results"][0]["class"] == "red"
    # Nothing changed, nothing runs; a new image reruns the pipeline from fetch.
    assert "Data and pipelines are up to date." in sh(repo, "dvc", "repro")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(repo / "data/images/blue/extra.png")
    sh(repo, "dvc", "add", "-q", "data/images")
    status = sh(repo, "dvc", "status", "fetch")
    assert [" ".join(line.split()) for line in status.splitlines() if "modified:" in line] == [
        "modified: data/images"
    ]
