"""Fetch stage: obtains the dataset that `fetch.source` names, checked, in IDX form.

Reads   params.yaml `fetch` and SOURCE, one of
        - a dataset description (data/mnist.yaml, data/fashion-mnist.yaml, data/kmnist.yaml):
          its IDX files are downloaded from its `mirror_env` (a directory or URL, e.g. for
          offline use) or its mirrors, and each is accepted only by its checksum;
        - a folder of labelled images, one sub-folder per class (<class>/<image>), or
          train/<class>/<image> and test/<class>/<image>: every image is decoded, checked
          and resized to fetch.image_size with fetch.channels channels (stages/images.py).
        and FEEDBACK, a folder of corrections laid out as <class>/<image> (stages/feedback.py):
        an empty one, the default, holds none.
Writes  OUT/dataset.json (name, class names, how an upload is prepared, the file of each
        split) and OUT's IDX files, all or none; with feedback, also the IDX files of its
        feedback_train and feedback_test parts.

A folder without train/ and test/ is split by class (stratified) with fetch.test_split and
fetch.seed; its training images are stored in a seeded random order, so that prepare's
validation split (the last fraction) holds every class.
"""

import argparse
import gzip
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from stages import feedback, images, params
from stages.common import PipelineError, atomic_dir, run_cli, write_json

Side = Annotated[int, Field(ge=1, le=1024)]


class Params(params.Section):
    section = "fetch"
    # Only how long to wait for a mirror: every file is checked by checksum.
    untracked = ("timeout_s",)

    source: str = Field(min_length=1)  # a dataset description (.yaml) or a folder of images
    feedback: str = Field(min_length=1)  # a folder of corrections, <class>/<image>; empty: none
    # For a folder source only:
    image_size: tuple[Side, Side] = Field(strict=False)  # [height, width], in pixels
    channels: Literal[1, 3]  # 1 grey, 3 colour (RGB)
    test_split: float = Field(gt=0, lt=1)  # without train/ and test/: held out per class
    seed: int = Field(ge=0)  # of that split and of the training images' order
    timeout_s: float = Field(gt=0)  # per HTTP request


Checksum = Annotated[str, Field(pattern=r"^(sha256:[0-9a-f]{64}|md5:[0-9a-f]{32})$")]


class Description(BaseModel):
    """A dataset description file (data/mnist.yaml): an IDX set and where to get it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    classes: tuple[str, ...] = Field(min_length=2)
    preparation: Literal["digits", "resize"]  # how predict and the server prepare an upload
    mirror_env: str
    mirrors: tuple[params.Url, ...] = Field(min_length=1)
    train: tuple[str, str]  # images file, labels file
    test: tuple[str, str]
    checksums: dict[str, Checksum]  # sha256 of the decompressed content, or md5 of the file


DATASET_FILE = "dataset.json"
FOLDER_FILES = {
    "train": ("train-images.idx.gz", "train-labels.idx.gz"),
    "test": ("test-images.idx.gz", "test-labels.idx.gz"),
}
FEEDBACK_FILES = {
    part: (f"{part.replace('_', '-')}-images.idx.gz", f"{part.replace('_', '-')}-labels.idx.gz")
    for part in feedback.PARTS
}
CHUNK = 1 << 16


class BadFile(Exception):
    """A mirror served a file that fails verification (message says why)."""


def is_url(location):
    return location.startswith(("http://", "https://", "file://"))


def copy_from(location, name, dest, timeout_s):
    """Copies `name` from a mirror (directory or URL) to `dest`, with a progress bar."""
    if not is_url(location):
        shutil.copyfile(Path(location) / name, dest)
        return
    url = location.rstrip("/") + "/" + name
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise BadFile(f"download cut short after {received} of {total} bytes")


def verify(path, checksum):
    """Raises BadFile unless `path` has the checksum: "sha256:<hex>" of its decompressed
    content (it must be a complete gzip file), or "md5:<hex>" of the file itself."""
    kind, expected = checksum.split(":")
    digest = hashlib.new(kind)
    try:
        with gzip.open(path, "rb") if kind == "sha256" else open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise BadFile(f"not a complete gzip file ({e})") from None
    if digest.hexdigest() != expected:
        raise BadFile(f"{kind} mismatch (got {digest.hexdigest()[:12]}…, want {expected[:12]}…)")


def why_failed(error):
    """One short phrase for why a mirror failed."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        return f"unreachable ({error.reason})"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    return str(error) or type(error).__name__


def fetch_file(name, checksum, mirrors, dest_dir, timeout_s, mirror_env):
    """Puts a verified `name` into dest_dir from the first mirror that serves a good copy;
    returns that mirror."""
    dest = Path(dest_dir) / name
    failures = []
    for mirror in mirrors:
        try:
            copy_from(mirror, name, dest, timeout_s)
            verify(dest, checksum)
            return mirror
        # URLError, HTTPError and timeouts are OSErrors; a malformed reply from the
        # server raises an http.client.HTTPException.
        except (BadFile, OSError, http.client.HTTPException) as e:
            dest.unlink(missing_ok=True)
            failures.append(f"{mirror} ({why_failed(e)})")
    raise PipelineError(
        f"no mirror served a valid {name}: {'; '.join(failures)}. "
        f"Set {mirror_env} to a directory or URL holding the dataset's files"
    )


def load_description(path):
    """Reads and checks a dataset description file."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
        return Description.model_validate(doc)
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except ValidationError as e:
        problems = params.explain(e, Description)
        raise PipelineError(f"{path} is not a dataset description ({problems})") from None


def mirror_list(description, env=None):
    """The mirrors to try, in order: $<mirror_env> first when set, then the description's."""
    env = os.environ if env is None else env
    first = [env[description.mirror_env]] if env.get(description.mirror_env) else []
    return first + list(description.mirrors)


def fetch_idx(description, mirrors, out_dir, timeout_s, feedback_dir=None):
    """Writes the description's four verified files and dataset.json to out_dir, and the
    parts of `feedback_dir` when given; leaves out_dir untouched on failure. Returns
    {file name: mirror it came from}."""
    names = [*description.train, *description.test]
    missing = [n for n in names if n not in description.checksums]
    if missing:
        raise PipelineError(f"{description.name}: no checksum for {', '.join(missing)}")
    with atomic_dir(out_dir) as tmp:
        sources = {
            name: fetch_file(
                name, description.checksums[name], mirrors, tmp, timeout_s, description.mirror_env
            )
            for name in names
        }
        files = {"train": description.train, "test": description.test}
        if feedback_dir is not None:
            shape = idx_shape(tmp / description.train[0])[1:]
            shape = (*shape, 1) if len(shape) == 2 else shape  # (height, width, channels)
            files |= write_feedback(
                tmp, feedback_dir, description.classes, description.preparation, shape
            )
        write_info(tmp, description.name, description.classes, description.preparation, files)
    return sources


def idx_shape(path):
    """The dimensions a gzipped IDX file's header gives: (N, height, width[, channels])."""
    with gzip.open(path, "rb") as f:
        ndim = f.read(4)[3]
        dims = f.read(4 * ndim)
    return tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim))


def write_feedback(out_dir, root, classes, preparation, shape):
    """Writes the feedback folder's two parts (stages/feedback.py) as IDX files in out_dir;
    returns their entries for dataset.json's files, none when the folder holds no image."""
    parts = feedback.read_feedback(root, classes, preparation, shape)
    if not sum(len(labels) for _, labels in parts.values()):
        return {}
    for part, (x, labels) in parts.items():
        images_file, labels_file = FEEDBACK_FILES[part]
        write_idx(Path(out_dir) / images_file, x)
        write_idx(Path(out_dir) / labels_file, labels)
    train, test = (len(parts[part][1]) for part in feedback.PARTS)
    print(
        f"fetch: {root}: {train + test} feedback images, {train} for training, {test} for testing"
    )
    return FEEDBACK_FILES


def write_info(out_dir, name, classes, preparation, files):
    write_json(
        Path(out_dir) / DATASET_FILE,
        {
            "name": name,
            "classes": list(classes),
            "preparation": preparation,
            "files": {split: list(pair) for split, pair in files.items()},
        },
    )


# --- a folder of labelled images ------------------------------------------------------


def visible(directory):
    """The entries of a directory that are not hidden (.DS_Store, .git, ...), sorted."""
    return sorted(e for e in Path(directory).iterdir() if not e.name.startswith("."))


def class_folders(root):
    """{class name: [image paths]} of a folder laid out as <class>/<image>."""
    entries = visible(root)
    stray = [e for e in entries if not e.is_dir()]
    if stray:
        raise PipelineError(
            f"{stray[0]}: a file beside the class folders; lay {root} out as <class>/<image>"
        )
    if not entries:
        raise PipelineError(
            f"{root}: no images found; lay it out as <class>/<image>, one sub-folder per class"
        )
    if len(entries) == 1:
        raise PipelineError(
            f"{root}: only one class ({entries[0].name}); a classifier needs 2 or more "
            "sub-folders, one per class"
        )
    found = {}
    for folder in entries:
        files = [f for f in visible(folder) if f.is_file()]
        if not files:
            raise PipelineError(f"{folder}: no images; add some or remove the folder")
        found[folder.name] = files
    return found


def read_images(paths, size, channels):
    """Decodes every image of `paths` -> uint8 (N, height, width, channels); one line
    naming the file for anything that is not an image or has the wrong channel count."""
    arrays, kinds = [], {}  # kinds: channel count -> its first file by name
    for path in paths:
        try:
            image = images.open_image(path)
        except images.NotAnImage as e:
            raise PipelineError(f"{path}: {e}; remove it or replace it by an image") from None
        kind = images.channels_of(image)
        kinds[kind] = min(kinds.get(kind, path), path, key=str)
        arrays.append(images.to_array(image, size, channels))  # only the small array is kept
    if len(kinds) > 1:
        raise PipelineError(
            f"images of mixed channel counts: {kinds[1]} is grey, {kinds[3]} colour; "
            "convert them all to one kind"
        )
    ((found, example),) = kinds.items()
    if found != channels:
        word = {1: "grey", 3: "colour"}
        raise PipelineError(
            f"{example} and the others are {word[found]} ({found} channel"
            f"{'s' * (found > 1)}) but fetch.channels is {channels}; set fetch.channels: {found}"
        )
    return np.stack(arrays)


def labelled(folders, classes):
    """{class: [paths]} -> (paths, labels): labels index `classes`."""
    paths = [path for name in classes for path in folders[name]]
    labels = np.array([i for i, name in enumerate(classes) for _ in folders[name]], np.uint8)
    return paths, labels


def stratified_split(root, folders, classes, test_split, rng):
    """Holds out round(test_split * n) of each class's n images (at least 1, at most n - 1),
    drawn by `rng`; returns {"train": (paths, labels), "test": (paths, labels)}."""
    chosen = {"train": [], "test": []}
    for label, name in enumerate(classes):
        paths = folders[name]
        if len(paths) < 2:
            raise PipelineError(
                f"{Path(root) / name}: {len(paths)} image; holding out fetch.test_split of each "
                "class needs 2 or more; add images or lay the folder out as train/ and test/"
            )
        n_test = min(max(1, round(test_split * len(paths))), len(paths) - 1)
        held_out = set(rng.permutation(len(paths))[:n_test].tolist())
        for i, path in enumerate(paths):
            chosen["test" if i in held_out else "train"].append((path, label))
    return {
        split: ([path for path, _ in pairs], np.array([label for _, label in pairs], np.uint8))
        for split, pairs in chosen.items()
    }


def split_folder(root, test_split, seed):
    """(classes, {"train": (paths, labels), "test": (paths, labels)}) of a folder, from its
    own train/ and test/ when it has both, else split by class with test_split."""
    names = [e.name for e in visible(root)]
    rng = np.random.default_rng(seed)
    if set(names) == {"train", "test"}:
        train, test = class_folders(Path(root) / "train"), class_folders(Path(root) / "test")
        if set(train) != set(test):
            raise PipelineError(
                f"{root}: train/ and test/ have different classes ({', '.join(sorted(train))} "
                f"against {', '.join(sorted(test))}); give both the same sub-folders"
            )
        classes = sorted(train)
        splits = {"train": labelled(train, classes), "test": labelled(test, classes)}
    else:
        folders = class_folders(root)
        classes = sorted(folders)
        splits = stratified_split(root, folders, classes, test_split, rng)
    # A seeded random order for training, so that prepare's validation split is a sample.
    paths, labels = splits["train"]
    order = rng.permutation(len(paths))
    splits["train"] = ([paths[i] for i in order], labels[order])
    return classes, splits


def idx_bytes(array):
    """A uint8 array as IDX: magic 0x0000 08 <ndim>, big-endian uint32 dims, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx(path, array):
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as z:
        z.write(idx_bytes(array))  # mtime 0 and no name: the same arrays, the same bytes


def fetch_folder(root, out_dir, p):
    """Writes a folder dataset as IDX files and dataset.json; returns the split sizes."""
    classes, splits = split_folder(root, p.test_split, p.seed)
    # Every image decoded and checked at once: a bad one is named whichever split it is in.
    every = read_images(
        [path for paths, _ in splits.values() for path in paths], p.image_size, p.channels
    )
    sizes = {}
    with atomic_dir(out_dir) as tmp:
        start = 0
        for split, (paths, labels) in splits.items():
            x, start = every[start : start + len(paths)], start + len(paths)
            images_file, labels_file = FOLDER_FILES[split]
            write_idx(tmp / images_file, x)
            write_idx(tmp / labels_file, labels)
            sizes[split] = len(labels)
        shape = (*p.image_size, p.channels)
        files = FOLDER_FILES | write_feedback(tmp, p.feedback, classes, "resize", shape)
        write_info(tmp, str(root), classes, "resize", files)
    return classes, sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the dataset's IDX files")
    args = parser.parse_args(argv)
    p = params.load(Params)
    if not Path(p.feedback).is_dir():
        raise PipelineError(
            f"fetch.feedback {p.feedback}: no such folder; name a folder of corrections "
            "(`python -m tools.serve --collect data/feedback`, then `dvc add data/feedback`), "
            "or data/no-feedback for none"
        )
    source = Path(p.source)
    if source.is_dir():
        classes, sizes = fetch_folder(source, args.out, p)
        print(
            f"fetch: {source}: {len(classes)} classes ({', '.join(classes)}), "
            f"{sizes['train']} training and {sizes['test']} test images"
        )
    elif source.is_file():
        description = load_description(source)
        mirrors = mirror_list(description)
        sources = fetch_idx(description, mirrors, args.out, p.timeout_s, p.feedback)
        for name, mirror in sources.items():
            print(f"fetch: {name} verified, from {mirror}")
    else:
        raise PipelineError(
            f"fetch.source {p.source}: no such file or folder; name a dataset description "
            "(data/mnist.yaml, data/fashion-mnist.yaml, data/kmnist.yaml) or a folder of "
            "labelled images, <class>/<image>"
        )
    print(f"fetch: wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
