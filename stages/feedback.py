"""A feedback folder as fetch reads it: the images people filed as corrections (the page's
buttons, `predict --label`; tools/collect.py), split by content, prepared as uploads are.

    read_feedback(root, classes, preparation, shape)
        -> {"feedback_train": (uint8 (N, h, w, c), uint8 labels (N,)), "feedback_test": ...}

The folder is laid out as a folder dataset, <class>/<image>, with only the dataset's
classes (a class may have no folder). Each image goes to the feedback test part when the
first 32 bits of the SHA-256 of its bytes, as a fraction of 2**32, are below TEST_SHARE,
else to the feedback training part: its side depends on its content alone, so it keeps
that side as the folder grows, and no test image ever reaches training.

Each image is prepared as `predict` and the server prepare an upload for the dataset: a
digit dataset's (MNIST's) as a handwritten digit (stages/preprocess.py to_mnist), rounded
to 8 bits as MNIST's own images are; any other's resized as fetch resizes a folder's
images (stages/images.py). Arrays are sorted by content hash, so the same folder gives the
same bytes whatever order the file system lists it in.
"""

import hashlib
from pathlib import Path

import numpy as np

from stages import images
from stages.common import PipelineError

# Not a param: a new share would move images from one side to the other.
TEST_SHARE = 0.2
PARTS = ("feedback_train", "feedback_test")


def content_hash(data):
    """The SHA-256 of an image's bytes, in hex: its name in a feedback folder."""
    return hashlib.sha256(data).hexdigest()


def is_test(digest):
    """Whether the image of this content hash belongs to the feedback test part."""
    return int(digest[:8], 16) < TEST_SHARE * 2**32


def visible(directory):
    """The entries of a directory that are not hidden (.gitkeep, a writer's temp file), sorted."""
    return sorted(e for e in Path(directory).iterdir() if not e.name.startswith("."))


def labelled_files(root, classes):
    """[(path, label index)] of every image of a feedback folder; one line for anything
    that is not laid out as <class>/<image> with the dataset's classes."""
    found = []
    for entry in visible(root):
        if not entry.is_dir():
            raise PipelineError(
                f"{entry}: a file beside the class folders; lay {root} out as <class>/<image>"
            )
        if entry.name not in classes:
            raise PipelineError(
                f"{entry}: {entry.name} is not a class of the dataset ({', '.join(classes)}); "
                "move its images to their class's folder"
            )
        label = classes.index(entry.name)
        found += [(path, label) for path in visible(entry) if path.is_file()]
    return found


def prepare_image(path, data, preparation, shape):
    """Image bytes -> uint8 (height, width, channels), as an upload is prepared for a model
    trained on the dataset; one line naming `path` when it cannot be."""
    if preparation == "digits":
        # Here, not at the top: scikit-image and SciPy add about 0.35 s to every fetch,
        # and only a folder of digit corrections needs them.
        from stages import preprocess  # digits prepared as predict prepares them

        try:
            x = preprocess.to_mnist(preprocess.read_image(data, str(path)))
        except preprocess.NoDigit:
            raise PipelineError(f"{path}: no digit found; remove it") from None
        except preprocess.BadImage as e:
            raise PipelineError(f"{e}; remove it") from None
        return np.round(x * 255).astype(np.uint8)  # to_mnist's [0, 1] on MNIST's 8 bits
    height, width, channels = shape
    try:
        image = images.open_image(data)
    except images.NotAnImage as e:
        raise PipelineError(f"{path}: {e}; remove it") from None
    return images.to_array(image, (height, width), channels)


def read_feedback(root, classes, preparation, shape):
    """The feedback folder at `root` -> {part: (images, labels)} for the two PARTS, each
    in content-hash order; empty parts when it holds no image. shape: (height, width,
    channels) of the dataset's images."""
    seen = {}  # content hash -> (path, label)
    for path, label in labelled_files(root, list(classes)):
        data = path.read_bytes()
        digest = content_hash(data)
        if digest in seen and seen[digest][1] != label:
            raise PipelineError(
                f"{seen[digest][0]} and {path} are the same image filed as two classes; "
                "remove the wrong one"
            )
        seen[digest] = (path, label, prepare_image(path, data, preparation, shape))
    parts = {part: ([], []) for part in PARTS}
    for digest in sorted(seen):
        _, label, x = seen[digest]
        xs, ys = parts["feedback_test" if is_test(digest) else "feedback_train"]
        xs.append(x)
        ys.append(label)
    empty = np.zeros((0, *shape), np.uint8)
    return {
        part: (np.stack(xs) if xs else empty, np.array(ys, np.uint8))
        for part, (xs, ys) in parts.items()
    }
