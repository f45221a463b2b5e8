"""Image files -> pixels: the one reader of images, for fetch (every image of a folder of
labelled images), `predict` and the server (every upload), so that training and serving
see the same pixels; and the uint8 array a folder dataset holds.

    open_image(source, formats=None) -> PIL image, mode L (grey) or RGB (colour), upright
    standard_mode(image) -> the same image in mode L or RGB
    channels_of(image) -> 1 (grey) or 3 (colour)
    to_array(image, size, channels) -> uint8 (height, width, channels)

open_image refuses an image over MAX_PIXELS from its header, before decoding anything (a
small file can expand to gigabytes), takes the first frame of an animation, turns the image
upright as its EXIF orientation says (phones store photos sideways and tag them), and
gives it one of two modes (standard_mode):
- grey, L: Pillow's modes 1, L, LA, I, I;16 and F, and a palette that holds only greys;
  16-bit greys are scaled to 8 bits (value / 257; Pillow's own conversion clips at 255);
- colour, RGB: every other mode (RGB, RGBA, a palette of colours, CMYK, YCbCr, ...);
- transparent pixels become background: black when the visible pixels are light on average
  (light strokes on a dark-themed canvas), else white (a drawing on a transparent sheet).
to_array resizes to `size` with Pillow's bilinear filter, which averages over the source
pixels each output pixel covers when shrinking; prepare then scales the values to [0, 1].
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What predict and the server take: the formats browsers, phones and scanners write.
UPLOADS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")  # Pillow opens phone JPEGs (MPO) as JPEG
# A 12 MP phone photo is decoded and prepared in well under a second; 40 MP is 160 MB as
# RGBA. Pillow's own limit (a decompression-bomb guard) is 179 MP.
MAX_PIXELS = 40_000_000
SIXTEEN_BIT = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class NotAnImage(Exception):
    """The bytes are not an image that can be read (message says why)."""


def format_names(formats):
    """("PNG", "JPEG", "WEBP") -> "PNG, JPEG or WebP"."""
    names = [{"WEBP": "WebP"}.get(f, f) for f in formats]
    return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]


def open_image(source, formats=None):
    """A path or bytes -> PIL image in mode L or RGB, upright, its first frame; NotAnImage
    saying why it is not one. `formats`: Pillow's names of the formats accepted (all)."""
    limit = f"the limit is {MAX_PIXELS // 10**6} megapixels"
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 MP and refuses above 179 MP; our own limit is lower.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            file = Image.open(
                io.BytesIO(source) if isinstance(source, bytes) else source, formats=formats
            )
    except Image.DecompressionBombError:
        raise NotAnImage(f"too large ({limit})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        kind = f"a {format_names(formats)} image" if formats else "an image Pillow can read"
        raise NotAnImage(f"not {kind}") from None
    with file:
        width, height = file.size
        if width * height > MAX_PIXELS:
            raise NotAnImage(f"too large ({width}x{height} pixels; {limit})")
        try:
            file.load()  # the first frame: an animation opens on it
            return standard_mode(ImageOps.exif_transpose(file))  # a copy: the file closes
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise NotAnImage(f"truncated or corrupt image ({str(e).splitlines()[0]})") from None


def is_grey(image):
    """Whether a PIL image holds only greys: by its mode, or for a palette its colours."""
    if image.mode in ("P", "PA"):
        rgb = np.asarray(image.convert("RGB"))
        return bool((rgb == rgb[..., :1]).all())
    return image.mode in ("1", "L", "LA", "La", "F") or image.mode in SIXTEEN_BIT


def flatten(rgba):
    """RGBA image -> RGB, its transparent pixels made background: black when the visible
    pixels are light on average, else white."""
    pixels = np.asarray(rgba, dtype=np.float64)
    alpha = pixels[..., 3] / 255.0
    luma = pixels[..., :3] @ [0.299, 0.587, 0.114]  # ITU-R 601, as Pillow's convert("L")
    light = np.sum(alpha * luma) > 127.5 * alpha.sum()
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255) if light else (255,) * 4)
    return Image.alpha_composite(background, rgba).convert("RGB")


def standard_mode(image):
    """A PIL image of any mode -> the same in mode L (grey) or RGB (colour)."""
    transparent = "A" in image.mode or "a" in image.mode or "transparency" in image.info
    if image.mode in ("L", "RGB") and not transparent:
        return image
    grey = is_grey(image)
    if image.mode in SIXTEEN_BIT:
        scaled = np.clip(np.asarray(image, dtype=np.float64) / 257, 0, 255)
        return Image.fromarray(np.round(scaled).astype(np.uint8))
    if transparent:
        image = flatten(image.convert("RGBA"))
    return image.convert("L" if grey else "RGB")


def channels_of(image):
    """1 for a grey image, 3 for a colour one (open_image's modes L and RGB)."""
    return 1 if image.mode == "L" else 3


def to_array(image, size, channels):
    """A PIL image -> uint8 (height, width, channels), resized to size = (height, width)."""
    converted = standard_mode(image).convert("L" if channels == 1 else "RGB")
    height, width = size
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.uint8).reshape(height, width, channels)
