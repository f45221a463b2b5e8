"""Files corrections into a feedback folder, the layout the pipeline reads (fetch.feedback):
DIR/<class>/<sha256 of the bytes>.<format>, each image exactly as it was sent to /predict
or given to `predict`. Used by the server's POST /feedback and by `predict --label`.

- The name comes from the content (stages/feedback.py content_hash), never from the
  client: a repeat is stored once, and the class folder is one of the model's classes,
  checked to be a plain folder name when the collector is made.
- Every file is written to a hidden temporary file in DIR, flushed to disk, then renamed:
  a crash or a failed write leaves no partial image under its name, only a hidden
  `.incoming-*.tmp` that fetch skips and .dvcignore keeps out of `dvc add`.
- One lock in the process serialises the count, the checks and the write, so concurrent
  posts cannot exceed the limit or file one image under two classes.
"""

import io
import os
import tempfile
import threading
from pathlib import Path

from PIL import Image

from stages.common import PipelineError
from stages.feedback import content_hash

LIMIT = 10_000  # files; at 5-7 KiB per drawing, about 60 MiB
TEMP_PREFIX, TEMP_SUFFIX = ".incoming-", ".tmp"
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg"}  # else the format's name in lower case


class UnknownLabel(PipelineError):
    """The label is not one of the model's classes."""


class Full(PipelineError):
    """The folder holds `limit` files already."""


class Conflict(PipelineError):
    """The same image is filed under another class already."""


def check_folder_names(classes):
    """Raises PipelineError unless every class name can be a folder of its own in DIR."""
    for name in classes:
        if name in ("", ".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise PipelineError(
                f"class {name!r} cannot be a folder name, so its corrections cannot be "
                "collected (folder datasets' classes always can)"
            )


def extension(data):
    """The file extension for image bytes, from their format: png, jpg, webp, ..."""
    image_format = Image.open(io.BytesIO(data)).format
    return EXTENSIONS.get(image_format, image_format.lower())


class Collector:
    """A feedback folder being filled: its root, the model's classes and the file limit."""

    def __init__(self, root, classes, limit=LIMIT):
        check_folder_names(classes)
        self.folder = Path(root)  # as given, for messages
        self.root = self.folder.resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(f"{root}: cannot collect there ({e.strerror})") from None
        self.classes = list(classes)
        self.limit = limit
        self.lock = threading.Lock()

    def count(self):
        """The images in the folder's class folders."""
        return sum(
            1
            for name in self.classes
            if (self.root / name).is_dir()
            for entry in os.scandir(self.root / name)
            if entry.is_file() and not entry.name.startswith(".")
        )

    def check_room(self):
        """Raises Full when the folder holds `limit` images."""
        if self.count() >= self.limit:
            raise Full(f"the feedback folder holds {self.limit} images, its limit; nothing stored")

    def check_label(self, label):
        if label not in self.classes:
            raise UnknownLabel(
                f"label {label!r} is not one of the model's classes: {', '.join(self.classes)}"
            )

    def file(self, data, label):
        """Stores image bytes (already checked to be an image the model reads) as `label`;
        returns (path relative to the root, True when new, False when already there)."""
        self.check_label(label)
        name = f"{content_hash(data)}.{extension(data)}"
        folder = self.root / label
        with self.lock:
            filed = [c for c in self.classes if (self.root / c / name).exists()]
            if label in filed:
                return f"{label}/{name}", False
            if filed:
                raise Conflict(f"this image is filed as {filed[0]} already")
            self.check_room()
            folder.mkdir(exist_ok=True)
            if folder.resolve() != self.root / label:  # a link placed in the folder
                raise PipelineError(f"{folder} leads out of {self.root}; nothing stored")
            write_atomically(self.root, folder / name, data)
        return f"{label}/{name}", True


def write_atomically(temp_dir, path, data):
    """Writes `data` to a hidden temporary file in temp_dir (the same file system as
    `path`), flushed to disk, then renames it to `path`: all of it or nothing."""
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=temp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)  # mkstemp's 0600 would hide it from other users
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
