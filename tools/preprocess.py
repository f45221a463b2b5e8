"""Turns anyone's digit image into what the model was trained on, as MNIST itself was made.

    read_image(data, name) -> PIL image     refuses what is not a sound, sensibly sized image
    to_mnist(image) -> float32 (28, 28, 1)  white digit on black, in [0, 1]

MNIST's recipe (LeCun et al.): the digit's bounding box is scaled, keeping its aspect
ratio, so that its longer side is 20 pixels (antialiased, hence grey levels), then placed
in a 28x28 frame so that its centre of mass is at the frame's centre. Before that, a user's
image is made to look like MNIST's: grey levels, light ink on a dark background, and the
background level subtracted, so that a photo of grey paper has a black background too.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.common import PipelineError

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")  # PIL opens phone JPEGs (MPO) as JPEG
MAX_PIXELS = 40_000_000  # refused before decoding: 40 MP is 160 MB as RGBA, above any phone photo
MIN_SIDE = 8  # a smaller image holds no legible digit
FRAME = 28  # MNIST's image side
BOX = 20  # MNIST's digits fill a 20x20 box inside the frame
CENTRE = 14.0  # MNIST's centre of mass, in pixel indices: (13.99, 14.01) over the test set
MIN_CONTRAST = 0.15  # the darkest ink must differ this much from the background, else no digit
INK = 0.25  # after normalising ink to [0, 1], pixels above this count for the bounding box


class BadImage(PipelineError):
    """Not a readable image, or one too small or too large to read."""


class NoDigit(PipelineError):
    """A readable image with nothing drawn on it."""


def read_image(data, name):
    """Bytes of a PNG, JPEG, BMP, GIF or WebP file -> decoded PIL image, upright (EXIF).

    The pixel count is checked from the header, before anything is decoded, so a
    decompression bomb (a small file that expands to gigabytes) is refused cheaply.
    """
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 MP and refuses above 179 MP; our own limit is lower.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise BadImage(
            f"{name}: too large (the limit is {MAX_PIXELS // 10**6} megapixels)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise BadImage(f"{name}: not a PNG, JPEG, BMP, GIF or WebP image") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise BadImage(
            f"{name}: too large ({width}x{height} pixels; "
            f"the limit is {MAX_PIXELS // 10**6} megapixels)"
        )
    if min(width, height) < MIN_SIDE:
        raise BadImage(
            f"{name}: too small ({width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE})"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"{name}: truncated or corrupt image ({e})") from None
    return ImageOps.exif_transpose(image)


def grey_levels(image):
    """PIL image of any mode -> float (H, W) in [0, 1], 1 = white.

    Transparent pixels become background: an image with alpha is flattened onto black
    when its visible strokes are light, else onto white.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float greys
        grey = np.asarray(image, dtype=np.float64)
        return grey / max(grey.max(), 1e-12)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0
        alpha = rgba[..., 3]
        grey = rgba[..., :3] @ [0.299, 0.587, 0.114]  # ITU-R 601 luma, as PIL's convert("L")
        strokes = np.sum(alpha * grey) / max(alpha.sum(), 1e-12)
        background = 0.0 if strokes > 0.5 else 1.0
        return alpha * grey + (1.0 - alpha) * background
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def to_ink(grey):
    """Grey levels -> ink in [0, 1] on a 0 background: inverted when the background
    (the median of the border pixels) is light; background level subtracted; darkest
    ink stretched to 1, as MNIST's strokes reach 1."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    ink = 1.0 - grey if np.median(border) > 0.5 else grey
    ink = np.clip(ink - np.median(np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]])), 0, 1)
    if ink.max() < MIN_CONTRAST:
        raise NoDigit("no digit found")
    return ink / ink.max()


def crop_to_ink(ink):
    """The smallest rectangle holding every pixel above INK."""
    rows = np.flatnonzero((ink > INK).any(axis=1))
    cols = np.flatnonzero((ink > INK).any(axis=0))
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def fit_box(digit, box=BOX):
    """Scales (h, w) so that its longer side is `box`, keeping the aspect ratio; antialiased."""
    height, width = digit.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL: (w, h)
    resized = Image.fromarray(digit.astype(np.float32), mode="F").resize(
        size, Image.Resampling.LANCZOS
    )
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)


def centre_of_mass(digit):
    """(row, column) of the ink's centre of mass, in pixel indices."""
    total = digit.sum()
    rows, cols = np.indices(digit.shape)
    return (rows * digit).sum() / total, (cols * digit).sum() / total


def place(digit, frame=FRAME, centre=CENTRE):
    """Puts digit (h, w) into a frame x frame black image, its centre of mass at `centre`
    (whole-pixel shift), kept whole inside the frame."""
    height, width = digit.shape
    row, col = centre_of_mass(digit)
    top = int(np.clip(np.floor(centre - row + 0.5), 0, frame - height))
    left = int(np.clip(np.floor(centre - col + 0.5), 0, frame - width))
    out = np.zeros((frame, frame))
    out[top : top + height, left : left + width] = digit
    return out


def to_mnist(image):
    """PIL image of a digit, any size, colour or polarity -> float32 (28, 28, 1) in [0, 1],
    white digit on black, as MNIST's. Raises NoDigit for a blank image."""
    digit = fit_box(crop_to_ink(to_ink(grey_levels(image))))
    if digit.sum() == 0:
        raise NoDigit("no digit found")
    # Conv2D wants a channel axis; greyscale, so one channel.
    return place(digit).astype(np.float32)[..., np.newaxis]
