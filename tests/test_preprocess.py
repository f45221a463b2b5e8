"""MNIST-style preprocessing on hand-made images, and the refusal of bad image files."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bench import predict_real_world as real_world
from tests.conftest import HAVE_MNIST, mnist_arrays
from tools import preprocess


def canvas(height, width, background=255):
    return np.full((height, width), background, np.uint8)


def png_bytes(image, format="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG that claims width x height 8-bit grey pixels but holds 100 bytes of data:
    decoding it in full would need width * height bytes, and would find it truncated."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


def ones_at(rows, cols):
    expected = np.zeros((28, 28), np.float32)
    expected[rows, cols] = 1.0
    return expected


def test_dark_bar_on_white_becomes_a_white_bar_on_black_cropped_and_centred():
    pixels = canvas(40, 40)
    pixels[3:23, 7:17] = 0  # 20 rows x 10 columns of black ink, off-centre
    x = preprocess.to_mnist(Image.fromarray(pixels))
    assert x.shape == (28, 28, 1) and x.dtype == np.float32
    # Already 20 tall: no scaling. Centre of mass (9.5, 4.5) of the crop goes to (14, 14),
    # so the bar starts at row 14 - 9.5 = 4.5 -> 5 and column 14 - 4.5 = 9.5 -> 10.
    assert np.array_equal(x[..., 0], ones_at(slice(5, 25), slice(10, 20)))


def test_light_ink_on_black_is_not_inverted_and_gives_the_same_result():
    dark_on_light = canvas(40, 40)
    dark_on_light[3:23, 7:17] = 0
    light_on_dark = 255 - dark_on_light
    assert np.array_equal(
        preprocess.to_mnist(Image.fromarray(light_on_dark)),
        preprocess.to_mnist(Image.fromarray(dark_on_light)),
    )


def test_longer_side_becomes_20_pixels_keeping_the_aspect_ratio():
    pixels = canvas(300, 200)
    pixels[100:220, 50:80] = 0  # 120 x 30: scaled by 1/6 to 20 x 5
    x = preprocess.to_mnist(Image.fromarray(pixels))[..., 0]
    # A solid block stays solid (1.0) through the antialiased resize; centre (9.5, 2).
    np.testing.assert_allclose(x, ones_at(slice(5, 25), slice(12, 17)), atol=1e-6)


def test_digit_is_placed_by_its_centre_of_mass_not_its_bounding_box():
    pixels = canvas(60, 60)
    pixels[10:14, 10:30] = 0  # a "T": bar of 4 x 20 ...
    pixels[14:30, 18:22] = 0  # ... on a stem of 16 x 4; bounding box 20 x 20
    x = preprocess.to_mnist(Image.fromarray(pixels))[..., 0]
    # Centre of mass of the crop: row (80 * 1.5 + 64 * 11.5) / 144 = 5.94 -> the top moves
    # to row round(14 - 5.94) = 8 (a bounding-box centring would put it at row 4).
    expected = ones_at(slice(8, 12), slice(5, 25)) + ones_at(slice(12, 28), slice(13, 17))
    assert np.array_equal(x, expected)


def test_a_large_drawing_is_antialiased_into_grey_levels():
    pixels = canvas(500, 500)
    pixels[50:450, 100:115] = 0  # an "L" 400 x 200: a stroke 15 wide ...
    pixels[435:450, 100:300] = 0  # ... and a base 15 tall
    x = preprocess.to_mnist(Image.fromarray(pixels))[..., 0]
    rows, cols = np.nonzero(x.max(axis=1))[0], np.nonzero(x.max(axis=0))[0]
    assert (len(rows), len(cols)) == (20, 10)  # scaled by 1/20, aspect ratio kept
    # The stroke is 0.75 px wide at this scale: grey, not white, in its middle rows.
    stroke = x[rows[5] : rows[15], cols[0]]
    assert np.all((stroke > 0.5) & (stroke < 0.95)), stroke


def test_grey_paper_and_grey_ink_are_normalised_to_black_and_white():
    pixels = canvas(40, 40, background=180)
    pixels[3:23, 7:17] = 60
    x = preprocess.to_mnist(Image.fromarray(pixels))[..., 0]
    assert np.array_equal(x, ones_at(slice(5, 25), slice(10, 20)))


def test_transparent_background_is_background_whatever_the_stroke_colour():
    for stroke in (0, 255):  # black strokes (a drawing) and white ones (a dark-themed canvas)
        rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent
        rgba[3:23, 7:17] = (stroke, stroke, stroke, 255)
        x = preprocess.to_mnist(Image.fromarray(rgba, mode="RGBA"))[..., 0]
        assert np.array_equal(x, ones_at(slice(5, 25), slice(10, 20))), stroke


def test_colour_image_is_read_as_grey_levels():
    rgb = np.full((40, 40, 3), (250, 240, 200), np.uint8)  # cream paper
    rgb[3:23, 7:17] = (20, 20, 120)  # blue ink
    x = preprocess.to_mnist(Image.fromarray(rgb))[..., 0]
    assert np.array_equal(x, ones_at(slice(5, 25), slice(10, 20)))


def test_blank_and_nearly_blank_images_have_no_digit():
    noise = np.random.default_rng(0).integers(240, 256, size=(40, 40)).astype(np.uint8)
    for pixels in (canvas(40, 40), canvas(40, 40, background=0), noise):
        with pytest.raises(preprocess.NoDigit, match=r"^no digit found$"):
            preprocess.to_mnist(Image.fromarray(pixels))


def test_read_image_decodes_each_supported_format():
    pixels = canvas(40, 40)
    pixels[3:23, 7:17] = 0
    for format in ("PNG", "JPEG", "BMP", "GIF", "WEBP"):
        image = preprocess.read_image(png_bytes(Image.fromarray(pixels), format), f"x.{format}")
        assert image.size == (40, 40), format
        assert np.argmax(preprocess.to_mnist(image)[..., 0].sum(axis=0)) in range(10, 20)


def test_read_image_turns_a_photo_upright_from_its_exif_orientation():
    pixels = canvas(40, 60)  # 40 rows x 60 columns, stored sideways
    pixels[10:14, 5:55] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = png_bytes(Image.fromarray(pixels), "JPEG", exif=exif.tobytes())
    assert preprocess.read_image(data, "photo.jpg").size == (40, 60)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello, world\n", "f: not a PNG, JPEG, BMP, GIF or WebP image"),
        (b"", "f: not a PNG, JPEG, BMP, GIF or WebP image"),
        (png_bytes(Image.new("L", (1, 1))), "f: too small (1x1 pixels; at least 8x8)"),
        (png_bytes(Image.new("L", (40, 7))), "f: too small (40x7 pixels; at least 8x8)"),
        (
            png_header_only(10_000, 10_000),
            "f: too large (10000x10000 pixels; the limit is 40 megapixels)",
        ),
        # Over PIL's own bomb limit (2 x 89 MP): PIL refuses it while reading the header.
        (png_header_only(20_000, 20_000), "f: too large (the limit is 40 megapixels)"),
    ],
)
def test_read_image_refuses_bad_files_with_one_line(data, message):
    with pytest.raises(preprocess.BadImage) as error:
        preprocess.read_image(data, "f")
    assert str(error.value) == message


def test_read_image_refuses_a_truncated_png_and_jpeg():
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64)).astype(np.uint8)
    for format in ("PNG", "JPEG"):
        data = png_bytes(Image.fromarray(pixels), format)
        with pytest.raises(preprocess.BadImage) as error:
            preprocess.read_image(data[: len(data) // 2], "cut")
        assert str(error.value).startswith(
            "cut: truncated or corrupt image (image file is truncated"
        )


def test_a_bomb_under_the_limit_of_pil_is_refused_before_decoding(monkeypatch):
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))
    with pytest.raises(preprocess.BadImage):
        preprocess.read_image(png_header_only(8_000, 6_000), "bomb.png")  # 48 MP, PIL allows it
    assert decoded == []


def block_on(pixels):
    """Draws a black 40 x 10 block at rows 30-69, columns 50-59 onto `pixels` (uint8)."""
    pixels[30:70, 50:60] = 0
    return preprocess.to_mnist(Image.fromarray(pixels))[..., 0]


# What a 40 x 10 block becomes: scaled by 1/2 to 20 x 5, centre of mass (9.5, 2) at (14, 14).
BLOCK = ones_at(slice(5, 25), slice(12, 17))


def test_ruled_and_squared_lines_are_removed_and_the_strokes_crossing_them_kept():
    ruled = canvas(120, 120)
    ruled[10::20, :] = 150  # 1-pixel grey lines, 20 apart; rows 50 and 70 cross the block
    np.testing.assert_allclose(block_on(ruled), BLOCK, atol=1e-6)
    squared = canvas(120, 120)
    squared[5::15, :] = 170
    squared[:, 7::15] = 170  # column 52 runs down the block
    np.testing.assert_allclose(block_on(squared), BLOCK, atol=1e-6)


def test_a_long_stroke_alone_is_not_taken_for_a_ruled_line():
    pixels = canvas(100, 100)
    pixels[5:95, 45:48] = 0  # 90% of the height, 3 wide, as thin as a line
    x = preprocess.to_mnist(Image.fromarray(pixels))[..., 0]
    assert (np.count_nonzero(x.max(axis=1) > 0.5), x.sum() > 10) == (20, True)


def test_the_sheets_edge_and_a_pen_at_the_border_are_not_the_digit():
    pixels = canvas(120, 120)
    pixels[:, :14] = 60  # the desk beyond the sheet, along the left edge
    pixels[104:110, 60:] = 20  # a pen coming in from the right edge, bigger than the digit
    np.testing.assert_allclose(block_on(pixels), BLOCK, atol=1e-6)


def test_a_shadow_across_the_digit_changes_nothing():
    pixels = canvas(120, 120)
    pixels[:50, :] = 110  # the top of the sheet in shadow, the edge across the block
    np.testing.assert_allclose(block_on(pixels), BLOCK, atol=1e-6)


def test_a_digit_in_two_pieces_is_read_whole():
    pixels = canvas(120, 120)
    pixels[30:48, 50:60] = 0
    pixels[52:70, 50:60] = 0  # a 4-pixel break: the same block, cut
    x = preprocess.to_mnist(Image.fromarray(pixels))[..., 0]
    rows, cols = np.nonzero(x.max(axis=1) > 0.5)[0], np.nonzero(x.max(axis=0) > 0.5)[0]
    # Both pieces, 20 x 5 as the whole block; the break, halved to 2 pixels, at rows 14-15.
    assert rows.tolist() == [*range(5, 14), *range(16, 25)]
    assert cols.tolist() == list(range(12, 17))


def test_a_row_gives_one_frame_per_digit_left_to_right():
    pixels = canvas(100, 200)
    pixels[20:80, 150:165] = 0  # right: 60 x 15 -> 20 x 5
    pixels[30:70, 40:60] = 0  # left: 40 x 20 -> 20 x 10
    pixels[90:93, 100:103] = 0  # a speck between them, no digit
    frames = preprocess.row_to_mnist(Image.fromarray(pixels))
    assert frames.shape == (2, 28, 28, 1) and frames.dtype == np.float32
    np.testing.assert_allclose(frames[0, ..., 0], ones_at(slice(5, 25), slice(10, 20)), atol=1e-6)
    np.testing.assert_allclose(frames[1, ..., 0], ones_at(slice(5, 25), slice(12, 17)), atol=1e-6)
    # As one digit, the image is its largest region: the left block (800 pixels, not 900?
    # no: 60 x 15 = 900 > 40 x 20 = 800, so the right one).
    single = preprocess.to_mnist(Image.fromarray(pixels))[..., 0]
    np.testing.assert_allclose(single, ones_at(slice(5, 25), slice(12, 17)), atol=1e-6)
    with pytest.raises(preprocess.NoDigit, match=r"^no digit found$"):
        preprocess.row_to_mnist(Image.fromarray(canvas(100, 200)))


@pytest.mark.skipif(not HAVE_MNIST, reason="offline MNIST mirror not present")
@pytest.mark.parametrize("condition", [*real_world.PAPER, real_world.ROW])
def test_each_photo_condition_gives_back_the_mnist_digits(condition):
    """12 test digits photographed under `condition` (the benchmark's renderer): the prepared
    frames match the original 28x28 digits pixel for pixel (correlation), as a model needs."""
    digits = mnist_arrays()[2][:12]
    rng = np.random.default_rng(7)
    row = condition == real_world.ROW
    effects = real_world.ROW_EFFECTS if row else real_world.PAPER[condition]
    groups = digits.reshape(4, 3, 28, 28) if row else digits[:, None]
    correlations = []
    for group in groups:
        data, _ = real_world.photograph(group, effects, rng)
        image = preprocess.read_image(data, condition)
        frames = preprocess.row_to_mnist(image) if row else preprocess.to_mnist(image)[None]
        assert len(frames) == len(group)
        for frame, digit in zip(frames, group, strict=True):
            correlations.append(np.corrcoef(frame.ravel(), digit.ravel())[0, 1])
    assert np.mean(correlations) > 0.85 and min(correlations) > 0.6, correlations
