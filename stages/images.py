"""One image file -> the uint8 array a folder dataset holds: what fetch does to every image
of a folder of labelled images, and what `predict` and the server do to an upload for a
model trained on one, so that both see exactly the same pixels.

    channels_of(image) -> 1 (grey) or 3 (colour)
    to_array(image, size, channels) -> uint8 (height, width, channels)

Grey is Pillow's modes 1, L, LA, I, I;16 and F; every other mode (RGB, RGBA, P, CMYK, ...)
is colour. An alpha channel is dropped. The image is resized to `size` with Pillow's
bilinear filter, which averages over the source pixels each output pixel covers when
shrinking. prepare then scales the values to [0, 1].
"""

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
# Resizing a photo of 4000x3000 pixels takes well under a second; anything bigger is refused
# rather than decoded (Pillow's own limit is a decompression-bomb guard at ~179 MP).
MAX_PIXELS = 50_000_000


class NotAnImage(Exception):
    """The bytes are not an image Pillow can decode (message says why)."""


def open_image(source):
    """A decoded Pillow image from a path or bytes; NotAnImage when it is not one."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if image.width * image.height > MAX_PIXELS:
            raise NotAnImage(f"{image.width}x{image.height} pixels, over {MAX_PIXELS:,}")
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise NotAnImage("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or damaged data
        raise NotAnImage(f"damaged image ({str(e).splitlines()[0][:80]})") from None
    return image


def channels_of(image):
    """1 for a grey image, 3 for a colour one."""
    return 1 if image.mode in GREY_MODES else 3


def to_array(image, size, channels):
    """A Pillow image -> uint8 (height, width, channels), resized to size = (height, width)."""
    converted = image.convert("L" if channels == 1 else "RGB")
    height, width = size
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.uint8).reshape(height, width, channels)
