"""MNIST-style preprocessing on hand-made images, however they are cropped; the one reader
of image files (stages/images.py) and its refusal of bad ones."""

import io

import numpy as np
import pytest
from PIL import Image

from stages import images, preprocess
from tests.conftest import png_bytes, png_header_only


def canvas(height, width, background=255):
    return np.full((height, width), background, np.uint8)


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
        (png_bytes(Image.new("L", (40, 40)), "TIFF"), "f: not a PNG, JPEG, BMP, GIF or WebP image"),
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


def decoded(image, format="PNG", **options):
    """(mode, pixels) of what the one reader makes of `image` saved as `format`."""
    image = images.open_image(png_bytes(image, format, **options))
    return image.mode, np.asarray(image).tolist()


def test_the_one_reader_gives_grey_or_colour_whatever_the_files_mode():
    greys = Image.fromarray(np.array([[0, 128], [255, 64]], np.uint8))
    assert decoded(greys.convert("P"), "GIF") == ("L", [[0, 128], [255, 64]])  # grey palette
    colours = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8))
    assert decoded(colours.convert("P")) == ("RGB", [[[255, 0, 0], [0, 0, 255]]])
    # 16 bits: value / 257 (Pillow's own convert("L") clips: 0, 255, 255).
    sixteen = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))
    assert decoded(sixteen) == ("L", [[0, 100, 255]])
    cmyk = Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 0, 255, 255, 0]))  # white, red
    assert decoded(cmyk, "TIFF") == ("RGB", [[[255, 255, 255], [255, 0, 0]]])


def test_transparent_pixels_become_the_background_the_visible_strokes_need():
    # A black stroke and a transparent pixel (hidden grey 9): white paper behind it.
    dark = Image.fromarray(np.array([[[0, 255], [9, 0]]], np.uint8), "LA")
    assert decoded(dark) == ("L", [[0, 255]])
    # A light stroke on a transparent dark-themed canvas: black behind it.
    light = Image.fromarray(np.array([[[250, 250, 250, 255], [9, 9, 9, 0]]], np.uint8), "RGBA")
    assert decoded(light) == ("RGB", [[[250, 250, 250], [0, 0, 0]]])


def test_an_animation_is_read_as_its_first_frame():
    first, second = Image.new("L", (8, 8), 30), Image.new("L", (8, 8), 220)
    data = png_bytes(first, "GIF", save_all=True, append_images=[second], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert np.asarray(images.open_image(data)).tolist() == [[30] * 8] * 8


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


def seven():
    """A 7 cropped to its ink, 40 x 30: a bar along the top edge, a stroke down to the
    bottom edge."""
    pixels = canvas(40, 30)
    pixels[:6] = 0
    rows, cols = np.indices(pixels.shape)
    pixels[(rows >= 6) & (np.abs(cols - (29 - 0.45 * (rows - 6))) < 3.5)] = 0
    return pixels


@pytest.mark.parametrize("light_on_dark", [False, True])
def test_a_digit_cropped_tightly_or_touching_an_edge_reads_as_with_a_margin(light_on_dark):
    one = canvas(40, 12)
    one[:, 2:10] = 0  # a 1 filling its crop's height and most of its width
    for digit in (seven(), one):
        pixels = 255 - digit if light_on_dark else digit
        paper = int(pixels[-1, 0])
        margin = preprocess.to_mnist(Image.fromarray(np.pad(pixels, 12, constant_values=paper)))
        assert margin.sum() > 50  # the digit, read whole
        for edges in ((0, 0, 0, 0), (0, 12, 12, 12), (12, 12, 12, 0)):  # tight, one edge
            top, bottom, left, right = edges
            cut = np.pad(pixels, ((top, bottom), (left, right)), constant_values=paper)
            assert np.array_equal(preprocess.to_mnist(Image.fromarray(cut)), margin), edges
