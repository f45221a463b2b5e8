"""Turns anyone's digit image, a scan, a drawing, a crop or a photo of paper, into what
the model was trained on, as MNIST itself was made.

    read_image(data, name) -> PIL image            the one reader (stages/images.py), and a
                                                   side of at least MIN_SIDE
    to_mnist(image) -> float32 (28, 28, 1)         the digit, white on black, in [0, 1]
    row_to_mnist(image) -> float32 (k, 28, 28, 1)  each digit of a row, left to right

First the ink is separated from the paper (analyse, ink_regions):
- grey levels; the polarity from which tail of the histogram is longer against a local
  median (a few dark strokes on light paper, or light strokes on a dark canvas);
- the paper's local brightness, estimated by a morphological closing (scikit-image) with a
  square a third of the image's shorter side, wider than any stroke: it follows uneven
  light and shadow, and the ink becomes its relative darkness against that estimate
  (a flat-field correction, so a stroke in shadow keeps its contrast);
- paper that this estimate finds evenly lit (a scan, a drawing, a crop) is read instead
  as if it had a margin of its border's grey (even_contrast): a crop's digit reaches the
  image's edges, and the paper beyond them is missing; so is a photo whose reading finds
  a digit at the edge or strokes of its border's grey (analyse);
- a global Otsu threshold on that contrast, then ruled and squared paper's lines removed:
  straight lines that run across most of the image, found by a Hough transform over
  near-horizontal and near-vertical angles, with stroke pixels that cross a line restored
  (three or more parallel lines, or one or two that run from edge to edge past the rest of
  the ink: a cropped digit's long stroke is neither);
- connected components, then specks (under 0.01% of the image) dropped.
Then the digit is chosen (pick_digit): a region that touches the image's edge is clutter
(the sheet's edge, a pen, a finger) whenever a region away from the edge is large enough to
be a digit (its longer side at least 15% of the image's shorter side); of those, the
largest by ink area is the digit, and pieces near it (broken strokes) join it, as does a
region at the edge that comes within 5% of its size (the digit where the edge cuts it).
A row of digits is every such region, pieces grouped by the columns they share, left to
right.

MNIST's recipe then makes the digit look like MNIST's (LeCun et al.): the digit's bounding
box is scaled, keeping its aspect ratio, so that its longer side is 20 pixels (antialiased,
hence grey levels), then placed in a 28x28 frame so that its centre of mass is at the
frame's centre. An image already made so (MNIST's own) comes out nearly unchanged.
"""

import numpy as np
from PIL import Image
from scipy import ndimage, spatial
from skimage import filters, measure, morphology, transform

from stages import images
from stages.common import PipelineError

MIN_SIDE = 8  # a smaller image holds no legible digit
FRAME = 28  # MNIST's image side
BOX = 20  # MNIST's digits fill a 20x20 box inside the frame
CENTRE = 14.0  # MNIST's centre of mass, in pixel indices: (13.99, 14.01) over the test set
MIN_CONTRAST = 0.15  # the darkest ink must differ this much from the background, else no digit
UNEVEN = 0.15  # paper whose brightness varies by more than this share is read as a photo
SAME_GREY = 0.05  # greys this close are the same material (paper, or a canvas)
INK = 0.25  # after normalising ink to [0, 1], pixels above this count for the bounding box
WORK_SIDE = 512  # images are analysed with their longer side at most this many pixels
LINE_SHARE = 0.7  # a ruled line runs across at least this share of the image
MAX_TILT = 6  # degrees: how far from level a ruled line may be (a sheet photographed askew)
LINE_GAP = 4  # pixels: the thickest ruled line whose crossing strokes are restored
LINE_WIDTH = 6  # strips (pixels): a ruled line is at most this thick; a stroke is thicker
EDGE = 0.03  # one or two lines reach within this share of the image's side of both edges
FEW_LINES = 3  # parallel lines that are the paper's wherever they end; fewer must cross it
SPECK = 1e-4  # ink regions under this share of the image are specks
MIN_DIGIT = 0.15  # a digit's longer side is at least this share of the image's shorter side
PIECE = 0.02  # a broken stroke's piece has at least this share of the digit's ink
EDGE_PIECE = 0.05  # a piece at the edge comes within this share of the digit's size of it


class BadImage(PipelineError):
    """Not a readable image, or one too small or too large to read."""


class NoDigit(PipelineError):
    """A readable image with nothing drawn on it."""


def read_image(data, name):
    """Bytes of a PNG, JPEG, BMP, GIF or WebP file -> PIL image in mode L or RGB, upright:
    the one reader of images (stages/images.py), and a side of at least MIN_SIDE."""
    try:
        image = images.open_image(data, images.UPLOADS)
    except images.NotAnImage as e:
        raise BadImage(f"{name}: {e}") from None
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise BadImage(
            f"{name}: too small ({width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE})"
        )
    return image


def grey_levels(image):
    """PIL image of any mode -> float (H, W) in [0, 1], 1 = white; transparency, palettes
    and 16 bits as the one reader makes them (stages/images.py standard_mode)."""
    return np.asarray(images.standard_mode(image).convert("L"), dtype=np.float64) / 255.0


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


def paper_level(paper):
    """(the paper's local brightness on a block-averaged copy about 64 pixels on its
    shorter side, the block size): a grey closing (dark strokes narrower than the square
    vanish, gradients and shadow edges stay) with a square a third of the shorter side."""
    small, f = pooled(paper)
    side = max(3, min(small.shape) // 3) | 1  # odd
    return morphology.closing(small, morphology.footprint_rectangle((side, side))), f


def background(paper, level=None):
    """The paper's local brightness: paper_level (or `level`, its result), upsampled."""
    closed, f = level or paper_level(paper)
    if f == 1:
        return closed
    upsampled = Image.fromarray(closed.astype(np.float32), mode="F").resize(
        paper.shape[::-1], Image.Resampling.BILINEAR
    )
    return np.maximum(np.asarray(upsampled, dtype=np.float64), paper)


def darkness(paper, level=None):
    """Grey levels, ink darker -> ink in [0, 1]: each pixel's darkness relative to the
    paper's brightness around it (background; `level`: paper_level's result)."""
    bg = background(paper, level)
    # The floor keeps a dark region (the table beyond the sheet) from turning its noise
    # into contrast.
    floor = max(0.25 * float(np.median(bg)), 0.05)
    return np.clip((bg - paper) / np.maximum(bg, floor), 0.0, 1.0)


def border_grey(grey):
    """The median grey of the image's outermost pixels."""
    return np.median(np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]]))


def even_contrast(grey):
    """Grey levels of evenly lit paper (a scan, a drawing, a crop) -> ink in [0, 1]. Its
    digit may reach the image's edges: the paper beyond them, missing, is added as a
    margin a quarter of the longer side wide, of the median grey of the image's outermost
    pixels (the paper wherever the ink does not touch the edge). Polarity and the paper's
    brightness are then judged as for a digit with room around it; strokes no darker than
    the margin are paper (a bold digit fills as_paper's local median, and the paper
    between its strokes passes for light strokes)."""
    height, width = grey.shape
    margin = max(height, width) // 4
    paper = as_paper(np.pad(grey, margin, constant_values=border_grey(grey)))
    contrast = darkness(paper)
    strokes = contrast > 0.5
    if strokes.any() and np.median(paper[strokes]) > paper[0, 0] - MIN_CONTRAST:
        contrast = darkness(1.0 - paper)
    return contrast[margin : margin + height, margin : margin + width]


def thin_runs(strong):
    """Boolean strips (P,) -> [(first, last)] of the runs of at most LINE_WIDTH strips;
    runs at most LINE_WIDTH apart are one (a thick stroke's strips dip in and out)."""
    edges = np.diff(np.concatenate([[0], strong.astype(np.int8), [0]]))
    runs = []
    for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        if runs and a - runs[-1][1] <= LINE_WIDTH:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    return [(a, b - 1) for a, b in runs if b - a <= LINE_WIDTH]


def line_pixels(mask, horizontal):
    """Pixels of `mask` on ruled or squared paper's lines within MAX_TILT degrees of
    horizontal (or vertical). The Hough transform counts the pixels along every 1-pixel
    strip; a line is a run of at most LINE_WIDTH strips that each hold LINE_SHARE of the
    image's width (or height). Lines count when three or more are parallel; one or two when
    they run from edge to edge past the rest of the ink: a digit's long stroke does neither."""
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
    if len(runs[j]) < FEW_LINES:
        rest = morphology.remove_small_objects(
            mask & ~found, max_size=max(2, round(SPECK * mask.size))
        )
        # A line or two count when they run from edge to edge and the rest of the ink
        # stays clear of those two edges, as a digit written on ruled paper does; the
        # strokes of a tightly cropped digit reach them, and a line that is all the ink
        # is the digit (a 1).
        if not (all(near_edges(found, horizontal)) and rest.any()):
            return np.zeros_like(mask)
        if any(near_edges(rest, horizontal)):
            return np.zeros_like(mask)
    return found


def near_edges(pixels, horizontal):
    """(whether `pixels` come within EDGE of the first edge, of the last edge) along the
    rows (horizontal) or the columns."""
    length = pixels.shape[1 if horizontal else 0]
    along = np.nonzero(pixels)[1 if horizontal else 0]
    return along.min() <= EDGE * length, along.max() >= (1 - EDGE) * length - 1


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


def part_of(region, seed, gap):
    """Whether a region at the image's edge is part of the digit grown from `seed`: its
    pixels come within `gap` of the seed's (a broken stroke, not clutter beside it)."""
    if not near(region.bbox, seed.bbox, gap):
        return False
    distance, _ = spatial.cKDTree(seed.coords).query(region.coords, distance_upper_bound=gap)
    return bool(np.isfinite(distance).any())


def pick_digit(regions, shape):
    """The regions that make the digit: the largest candidate by ink area, and every piece
    of at least PIECE of its area within a quarter of its size of it, repeatedly; and a
    region at the image's edge that is part_of it (EDGE_PIECE of its size)."""
    digits, pieces = candidates(regions, shape)
    seed = max(digits, key=lambda r: r.area)
    size = max(seed.image.shape)
    chosen, box = [seed], list(seed.bbox)
    others = [r for r in regions if r is not seed and r.area >= PIECE * seed.area]
    grown = True
    while grown:
        grown = False
        for r in others:
            if r in chosen:
                continue
            if (
                near(box, r.bbox, 0.25 * size)
                if r in pieces
                else part_of(r, seed, EDGE_PIECE * size)
            ):
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


def find_ink(contrast):
    """Ink contrast -> (contrast, labels, regions); NoDigit when nothing stands out."""
    if contrast.max() < MIN_CONTRAST:
        raise NoDigit("no digit found")
    contrast, labels, regions = ink_regions(contrast)
    if not regions:
        raise NoDigit("no digit found")
    return contrast, labels, regions


def reaches_edge(found):
    """Whether the digit that pick_digit chooses among the regions touches the edge."""
    _, labels, regions = found
    return any(touches_edge(r, labels.shape) for r in pick_digit(regions, labels.shape))


def background_as_ink(grey, found):
    """Whether the strokes found are no darker than the border's grey (read as light
    strokes: no lighter), within SAME_GREY: the paper read as ink, the polarity wrong, as
    when a bold digit fills as_paper's local median or light strokes fill a small canvas."""
    strokes = grey[found[0] > 0.5]
    if not strokes.size:
        return False
    lighter = np.median(strokes) - border_grey(grey)
    return (lighter if as_paper(grey) is grey else -lighter) > -SAME_GREY


def analyse(image):
    """PIL image -> (ink contrast, labels, regions). Evenly lit paper, whose brightness as
    the photo reading estimates it varies by less than UNEVEN, is read by even_contrast.
    Other paper (light falling off, a shadow, the desk beyond the sheet) is read as a
    photo, where as_paper's local median and the closing's square, a third of the shorter
    side, follow the light; even_contrast reads it when that finds no digit or one that
    reaches the edge (a crop) or whose strokes have the border's grey while most of the
    image has it too; when only the strokes have it, if the digit even_contrast finds
    reaches the edge. NoDigit when no ink region is left."""
    grey = working_copy(grey_levels(image))
    paper = as_paper(grey)
    level = paper_level(paper)
    low, high = np.percentile(level[0], [5, 98])
    if low >= (1 - UNEVEN) * high:
        return find_ink(even_contrast(grey))
    try:
        found = find_ink(darkness(paper, level))
    except NoDigit:
        return find_ink(even_contrast(grey))
    inverted = background_as_ink(grey, found)
    mostly_border = abs(np.median(grey) - border_grey(grey)) < SAME_GREY
    sure = reaches_edge(found) or (inverted and mostly_border)
    if sure or inverted:
        try:
            even = find_ink(even_contrast(grey))
        except NoDigit:
            return found
        if sure or reaches_edge(even):
            return even
    return found


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
