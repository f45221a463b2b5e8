"""Turns anyone's digit image, a scan, a drawing or a photo of paper, into what the model
was trained on, as MNIST itself was made.

    read_image(data, name) -> PIL image            refuses what is not a sound, sensibly sized image
    to_mnist(image) -> float32 (28, 28, 1)         the digit, white on black, in [0, 1]
    row_to_mnist(image) -> float32 (k, 28, 28, 1)  each digit of a row, left to right

First the ink is separated from the paper (ink_contrast, ink_regions):
- grey levels; the polarity from which tail of the histogram is longer (a few dark strokes
  on light paper, or light strokes on a dark canvas);
- the paper's local brightness, estimated by a morphological closing (scikit-image) with a
  square a third of the image's shorter side, wider than any stroke: it follows uneven
  light and shadow, and the ink becomes its relative darkness against that estimate
  (a flat-field correction, so a stroke in shadow keeps its contrast);
- a global Otsu threshold on that contrast, then ruled and squared paper's lines removed:
  straight lines that run across most of the image, found by a Hough transform over
  near-horizontal and near-vertical angles, with stroke pixels that cross a line restored;
- connected components, then specks (under 0.01% of the image) dropped.
Then the digit is chosen (pick_digit): a region that touches the image's edge is clutter
(the sheet's edge, a pen, a finger) whenever a region away from the edge is large enough to
be a digit (its longer side at least 15% of the image's shorter side); of those, the
largest by ink area is the digit, and pieces near it (broken strokes) join it. A row of
digits is every such region, pieces grouped by the columns they share, left to right.

MNIST's recipe then makes the digit look like MNIST's (LeCun et al.): the digit's bounding
box is scaled, keeping its aspect ratio, so that its longer side is 20 pixels (antialiased,
hence grey levels), then placed in a 28x28 frame so that its centre of mass is at the
frame's centre.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage
from skimage import filters, measure, morphology, transform

from stages.common import PipelineError

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")  # PIL opens phone JPEGs (MPO) as JPEG
MAX_PIXELS = 40_000_000  # refused before decoding: 40 MP is 160 MB as RGBA, above any phone photo
MIN_SIDE = 8  # a smaller image holds no legible digit
FRAME = 28  # MNIST's image side
BOX = 20  # MNIST's digits fill a 20x20 box inside the frame
CENTRE = 14.0  # MNIST's centre of mass, in pixel indices: (13.99, 14.01) over the test set
MIN_CONTRAST = 0.15  # the darkest ink must differ this much from the background, else no digit
INK = 0.25  # after normalising ink to [0, 1], pixels above this count for the bounding box
WORK_SIDE = 512  # images are analysed with their longer side at most this many pixels
LINE_SHARE = 0.7  # a ruled line runs across at least this share of the image
MAX_TILT = 6  # degrees: how far from level a ruled line may be (a sheet photographed askew)
LINE_GAP = 4  # pixels: the thickest ruled line whose crossing strokes are restored
LINE_WIDTH = 6  # strips (pixels): a ruled line is at most this thick; a stroke is thicker
EDGE = 0.03  # a lone line reaches within this share of the image's width of both edges
SPECK = 1e-4  # ink regions under this share of the image are specks
MIN_DIGIT = 0.15  # a digit's longer side is at least this share of the image's shorter side
PIECE = 0.02  # a broken stroke's piece has at least this share of the digit's ink


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


def working_copy(grey, side=WORK_SIDE):
    """Grey levels with the longer side at most `side` (box-filtered): a phone photo holds
    far more pixels than a 20-pixel digit needs, and the analysis runs in milliseconds."""
    height, width = grey.shape
    scale = side / max(height, width)
    if scale >= 1:
        return grey
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL: (w, h)
    resized = Image.fromarray(grey.astype(np.float32), mode="F").resize(size, Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.float64)


def pooled(image, side=64):
    """(block-averaged copy about `side` pixels on its shorter side, block size)."""
    height, width = image.shape
    f = max(1, min(height, width) // side)
    blocks = image[: height // f * f, : width // f * f]
    return blocks.reshape(height // f, f, width // f, f).mean(axis=(1, 3)), f


def as_paper(grey):
    """Grey levels -> the same with the ink darker than the background: inverted when,
    against a local median (which follows shadow edges, whatever the polarity), the light
    tail is the longer one (light strokes on a dark canvas)."""
    small, _ = pooled(grey, 32)  # a median filter is slow; the tails show at this size
    detail = small - ndimage.median_filter(small, size=max(3, min(small.shape) // 3) | 1)
    dark, light = np.percentile(detail, [0.5, 99.5])
    return grey if -dark >= light else 1.0 - grey


def background(paper):
    """The paper's local brightness: a grey closing (dark strokes narrower than the square
    vanish, gradients and shadow edges stay) with a square a third of the shorter side,
    computed on a block-averaged copy about 64 pixels on its shorter side, then upsampled."""
    small, f = pooled(paper)
    side = max(3, min(small.shape) // 3) | 1  # odd
    closed = morphology.closing(small, morphology.footprint_rectangle((side, side)))
    if f == 1:
        return closed
    upsampled = Image.fromarray(closed.astype(np.float32), mode="F").resize(
        paper.shape[::-1], Image.Resampling.BILINEAR
    )
    return np.maximum(np.asarray(upsampled, dtype=np.float64), paper)


def ink_contrast(grey):
    """Grey levels -> ink in [0, 1]: how much darker each pixel is than the paper around
    it, relative to that paper's brightness. Raises NoDigit when nothing stands out."""
    paper = as_paper(grey)
    bg = background(paper)
    # Relative darkness; the floor keeps a dark region (the table beyond the sheet) from
    # turning its noise into contrast.
    floor = max(0.25 * float(np.median(bg)), 0.05)
    contrast = np.clip((bg - paper) / np.maximum(bg, floor), 0.0, 1.0)
    if contrast.max() < MIN_CONTRAST:
        raise NoDigit("no digit found")
    return contrast


def thin_runs(strong):
    """Boolean strips (P,) -> [(first, last)] of the runs of at most LINE_WIDTH strips."""
    edges = np.diff(np.concatenate([[0], strong.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(a, b - 1) for a, b in zip(starts, ends, strict=True) if b - a <= LINE_WIDTH]


def line_pixels(mask, horizontal):
    """Pixels of `mask` on ruled or squared paper's lines within MAX_TILT degrees of
    horizontal (or vertical). The Hough transform counts the pixels along every 1-pixel
    strip; a line is a run of at most LINE_WIDTH strips that each hold LINE_SHARE of the
    image's width (or height). Lines count when two or more are parallel, or when a lone one
    runs from edge to edge: a digit's long stroke is neither."""
    height, width = mask.shape
    length = width if horizontal else height
    found = np.zeros_like(mask)
    if mask.any(axis=0 if horizontal else 1).mean() < LINE_SHARE:
        return found  # too few columns (rows) hold ink for any line: skip the transform
    step = min(np.deg2rad(0.5), 2.0 / length)  # a line drifts at most 1 px within its strip
    tilt = np.arange(-np.deg2rad(MAX_TILT), np.deg2rad(MAX_TILT) + step / 2, step)
    votes, angles, distances = transform.hough_line(mask, theta=tilt + (np.pi / 2) * horizontal)
    strong = votes >= LINE_SHARE * length
    runs = [thin_runs(strong[:, j]) if strong[:, j].any() else [] for j in range(len(angles))]
    # The paper's lines are parallel: the one angle whose lines hold the most pixels.
    j = int(np.argmax([sum(votes[a : b + 1, j].sum() for a, b in r) for j, r in enumerate(runs)]))
    if not runs[j]:
        return found
    rows, cols = np.nonzero(mask)
    index = np.round(cols * np.cos(angles[j]) + rows * np.sin(angles[j]) - distances[0])
    bins = np.zeros(len(distances) + 2, bool)  # and a strip either side: antialiased edges
    for first, last in runs[j]:
        bins[max(first - 1, 0) : last + 2] = True
    on_line = bins[index.astype(int)]
    found[rows[on_line], cols[on_line]] = True
    if len(runs[j]) < 2:
        along = np.nonzero(found)[1 if horizontal else 0]
        if along.min() > EDGE * length or along.max() < (1 - EDGE) * length - 1:
            return np.zeros_like(mask)
    return found


def remove_lines(mask, faint):
    """(mask, lines): the mask without ruled or squared paper's lines, found in the `faint`
    mask (lower threshold: light lines whole), and those lines' pixels; where a stroke
    crosses a line, the line's pixels between the stroke's two sides stay in the mask."""
    removed = np.zeros_like(mask)
    for horizontal in (True, False):
        lines = line_pixels(faint & ~removed, horizontal)
        if lines.any():
            kept = mask & ~lines
            across = (2 * LINE_GAP + 1, 1) if horizontal else (1, 2 * LINE_GAP + 1)
            bridged = ndimage.binary_closing(kept, np.ones(across, bool))
            mask = kept | (mask & lines & bridged)
            removed |= lines & ~mask
    return mask, removed


def ink_regions(contrast):
    """Ink contrast -> (contrast without the paper's lines, labels, regions): the connected
    ink regions (scikit-image regionprops) left after the lines and specks are removed."""
    # Otsu's threshold from every other row and column: the same histogram, 4x faster.
    threshold = max(filters.threshold_otsu(contrast[::2, ::2]), MIN_CONTRAST)
    mask, lines = remove_lines(contrast > threshold, contrast > threshold / 2)
    speck = max(2, round(SPECK * mask.size))
    mask = morphology.remove_small_objects(mask, max_size=speck, connectivity=2)
    labels = measure.label(mask, connectivity=2)
    return np.where(lines, 0.0, contrast), labels, measure.regionprops(labels)


def touches_edge(region, shape):
    top, left, bottom, right = region.bbox
    return top == 0 or left == 0 or bottom == shape[0] or right == shape[1]


def candidates(regions, shape):
    """The regions that can be digits: those away from the image's edge when one of them
    is large enough to be a digit, else all."""
    interior = [r for r in regions if not touches_edge(r, shape)]
    big = [r for r in interior if max(r.image.shape) >= MIN_DIGIT * min(shape)]
    return (big, interior) if big else (regions, regions)


def near(a, b, gap):
    """Whether bounding boxes a and b are within `gap` pixels of each other."""
    return a[0] - gap < b[2] and b[0] - gap < a[2] and a[1] - gap < b[3] and b[1] - gap < a[3]


def pick_digit(regions, shape):
    """The regions that make the digit: the largest candidate by ink area, and every piece
    of at least PIECE of its area within a quarter of its size of it, repeatedly."""
    digits, pieces = candidates(regions, shape)
    seed = max(digits, key=lambda r: r.area)
    gap = 0.25 * max(seed.image.shape)
    chosen, box = [seed], list(seed.bbox)
    others = [r for r in pieces if r is not seed and r.area >= PIECE * seed.area]
    grown = True
    while grown:
        grown = False
        for r in others:
            if r not in chosen and near(box, r.bbox, gap):
                chosen.append(r)
                box = [f(a, b) for f, a, b in zip((min, min, max, max), box, r.bbox, strict=True)]
                grown = True
    return chosen


def group_row(regions, shape):
    """The digits of a row, left to right, each a list of regions: candidates and pieces
    that share columns are one digit; groups whose longer side is under half the tallest
    candidate's height are dropped (specks, a comma)."""
    digits, pieces = candidates(regions, shape)
    tallest = max(r.image.shape[0] for r in digits)
    parts = sorted(
        {id(r): r for r in [*digits, *pieces] if r.image.shape[0] >= 0.1 * tallest}.values(),
        key=lambda r: r.bbox[1],
    )
    groups = []
    for r in parts:
        if groups and r.bbox[1] < groups[-1][1]:  # starts before the previous group ends
            groups[-1][0].append(r)
            groups[-1][1] = max(groups[-1][1], r.bbox[3])
        else:
            groups.append([[r], r.bbox[3]])
    groups = [g for g, _ in groups]
    return [g for g in groups if longer_side(g) >= 0.5 * tallest]


def longer_side(regions):
    """The longer side of the bounding box of several regions."""
    top, left = min(r.bbox[0] for r in regions), min(r.bbox[1] for r in regions)
    bottom, right = max(r.bbox[2] for r in regions), max(r.bbox[3] for r in regions)
    return max(bottom - top, right - left)


def digit_ink(contrast, labels, chosen):
    """The chosen regions' ink, with the antialiased rim around them, on a 0 background;
    stretched so that the strokes reach 1, as MNIST's do."""
    top, left = (max(0, min(r.bbox[i] for r in chosen) - 1) for i in (0, 1))
    bottom, right = (max(r.bbox[i] for r in chosen) + 1 for i in (2, 3))
    window = (slice(top, bottom), slice(left, right))  # the regions and a 1-pixel rim
    inside = np.zeros(labels.shape, bool)
    inside[window] = np.isin(labels[window], [r.label for r in chosen])
    rim = np.zeros_like(inside)
    rim[window] = ndimage.binary_dilation(inside[window], np.ones((3, 3), bool))
    ink = np.where(rim, contrast, 0.0)
    peak = np.percentile(contrast[inside], 99)
    return np.clip(ink / peak, 0.0, 1.0)


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


def mnist_frame(ink):
    """A digit's ink on a 0 background -> float32 (28, 28, 1), MNIST's recipe."""
    digit = fit_box(crop_to_ink(ink))
    if digit.sum() == 0:
        raise NoDigit("no digit found")
    # Conv2D wants a channel axis; greyscale, so one channel.
    return place(digit).astype(np.float32)[..., np.newaxis]


def analyse(image):
    """PIL image -> (ink contrast, labels, regions); NoDigit when no ink region is left."""
    contrast, labels, regions = ink_regions(ink_contrast(working_copy(grey_levels(image))))
    if not regions:
        raise NoDigit("no digit found")
    return contrast, labels, regions


def to_mnist(image):
    """PIL image of a digit, any size, colour or polarity -> float32 (28, 28, 1) in [0, 1],
    white digit on black, as MNIST's. Raises NoDigit for a blank image."""
    contrast, labels, regions = analyse(image)
    return mnist_frame(digit_ink(contrast, labels, pick_digit(regions, labels.shape)))


def row_to_mnist(image):
    """PIL image of a row of separate digits -> float32 (k, 28, 28, 1), one MNIST frame per
    digit, left to right. Raises NoDigit for a blank image."""
    contrast, labels, regions = analyse(image)
    groups = group_row(regions, labels.shape)
    return np.stack([mnist_frame(digit_ink(contrast, labels, g)) for g in groups])
