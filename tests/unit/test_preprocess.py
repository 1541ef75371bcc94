"""server/resnet_serve/server/preprocess.py: request payloads -> model-sized pixels, or InvalidInput saying why.

Every refusal is checked by its exact message (it goes back to the caller as INVALID_ARGUMENT); every accepted
payload by the pixels it becomes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from resnet_serve.server.preprocess import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, InvalidInput, Preprocessor

SIZE = (32, 32)
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bands(*colours: tuple[int, int, int], band: int = 32, height: int = 32) -> Image.Image:
    """Vertical bands of one colour each, `band` pixels wide."""
    arr = np.zeros((height, band * len(colours), 3), np.uint8)
    for i, c in enumerate(colours):
        arr[:, i * band:(i + 1) * band] = c
    return Image.fromarray(arr)


def solid(colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (*SIZE, 3))


def refused(call, *args) -> str:
    with pytest.raises(InvalidInput) as err:
        call(*args)
    return str(err.value)


# --- encoded images --------------------------------------------------------------------------------------------


def test_defaults_are_the_documented_limits() -> None:
    pre = Preprocessor(SIZE)
    assert (pre.max_pixels, pre.max_aspect_ratio) == (DEFAULT_MAX_PIXELS, DEFAULT_MAX_ASPECT_RATIO) == (4096 * 4096,
                                                                                                         100.0)


@pytest.mark.parametrize(("fmt", "exact"), [("PNG", True), ("BMP", True), ("GIF", True), ("WEBP", False),
                                            ("JPEG", False)])
def test_every_accepted_format_decodes_to_its_pixels(fmt: str, exact: bool) -> None:
    out = Preprocessor(SIZE).encoded(encode(Image.new("RGB", (48, 48), (200, 40, 120)), fmt,
                                            **({"lossless": True} if fmt == "WEBP" else {})))
    assert out.dtype == np.uint8 and out.shape == (*SIZE, 3)
    tolerance = 0 if exact else 3
    assert np.abs(out.astype(int) - (200, 40, 120)).max() <= tolerance, fmt


def test_shorter_side_is_fitted_then_the_centre_is_cropped() -> None:
    """96x32 red|green|blue -> the middle 32x32, exactly green; 32x96 top-to-bottom likewise."""
    pre = Preprocessor(SIZE)
    np.testing.assert_array_equal(pre.encoded(encode(bands(RED, GREEN, BLUE), "PNG")), solid(GREEN))
    tall = bands(RED, GREEN, BLUE).transpose(Image.Transpose.TRANSPOSE)
    np.testing.assert_array_equal(pre.encoded(encode(tall, "PNG")), solid(GREEN))


def test_a_non_square_model_input_is_height_by_width() -> None:
    out = Preprocessor((16, 48)).encoded(encode(Image.new("RGB", (96, 32), RED), "PNG"))
    assert out.shape == (16, 48, 3) and (out == RED).all()


def test_transparency_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red: shows as white
    np.testing.assert_array_equal(Preprocessor(SIZE).encoded(encode(rgba, "PNG")), solid(WHITE))


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.fromarray(np.full((32, 32), 32768, np.uint16))  # half of 65535
    out = Preprocessor(SIZE).encoded(encode(grey, "PNG"))
    assert (out == 128).all()  # rint(32768 / 257); clipping would give 255


def test_exif_orientation_stands_the_image_up() -> None:
    """A 64x32 red|blue image tagged orientation 6 (rotate 90 clockwise to view) is 32x64, red on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = Preprocessor((64, 32)).encoded(encode(bands(RED, BLUE), "PNG", exif=exif))
    assert out.shape == (64, 32, 3)
    assert (out[:32] == RED).all() and (out[32:] == BLUE).all()


def test_empty_payload_is_refused() -> None:
    assert refused(Preprocessor(SIZE).encoded, b"") == "image is empty"


def test_unknown_header_is_refused_naming_the_formats() -> None:
    assert refused(Preprocessor(SIZE).encoded, b"%PDF-1.7 not an image") == \
        "image is not a JPEG, PNG, WebP, GIF or BMP file (unrecognised header)"


def test_broken_file_names_its_format_and_no_memory_address() -> None:
    msg = refused(Preprocessor(SIZE).encoded, b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert msg.startswith("cannot decode PNG image: ") and " at 0x" not in msg and "BytesIO" not in msg


def test_truncated_jpeg_is_refused() -> None:
    data = encode(Image.new("RGB", (64, 64), RED), "JPEG")
    assert refused(Preprocessor(SIZE).encoded, data[: len(data) // 2]).startswith("cannot decode JPEG image: ")


def test_pixel_limit_is_checked_from_the_header() -> None:
    pre = Preprocessor(SIZE, max_pixels=1000)
    assert refused(pre.encoded, encode(Image.new("RGB", (40, 40)), "PNG")) == \
        "image is 40x40 = 1600 pixels, over the limit of 1000"
    assert pre.encoded(encode(Image.new("RGB", (40, 25)), "PNG")).shape == (*SIZE, 3)  # exactly 1000: accepted


def test_a_jpeg_counts_the_pixels_of_its_reduced_scale_decode() -> None:
    """2000x2000 JPEG for a 32x32 model decodes at 1/8 scale: 250x250 pixels, which the limit applies to."""
    data = encode(Image.new("RGB", (2000, 2000), BLUE), "JPEG")
    assert Preprocessor(SIZE, max_pixels=62_500).encoded(data).shape == (*SIZE, 3)
    assert refused(Preprocessor(SIZE, max_pixels=62_499).encoded, data) == \
        "image is 250x250 = 62500 pixels, over the limit of 62499"
    png = encode(Image.new("RGB", (2000, 2000), BLUE), "PNG")  # a PNG has no reduced-scale decode
    assert refused(Preprocessor(SIZE, max_pixels=62_500).encoded, png) == \
        "image is 2000x2000 = 4000000 pixels, over the limit of 62500"


def test_aspect_ratio_limit() -> None:
    pre = Preprocessor(SIZE, max_aspect_ratio=4)
    assert pre.encoded(encode(Image.new("RGB", (128, 32)), "PNG")).shape == (*SIZE, 3)  # exactly 4:1
    assert refused(pre.encoded, encode(Image.new("RGB", (32, 129)), "PNG")) == \
        "image is 32x129, an aspect ratio over the limit of 4:1 (the model sees a centre crop of the shorter side)"


# --- raw uint8 [H, W, 3] --------------------------------------------------------------------------------------


def test_uint8_at_model_size_is_passed_through() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(Preprocessor(SIZE).uint8_hwc([32, 32, 3], arr.tobytes()), arr)


def test_uint8_of_another_size_is_resized_like_an_encoded_image() -> None:
    img = bands(RED, GREEN, BLUE)
    pre = Preprocessor(SIZE)
    raw = pre.uint8_hwc([32, 96, 3], np.asarray(img).tobytes())
    np.testing.assert_array_equal(raw, pre.encoded(encode(img, "PNG")))
    np.testing.assert_array_equal(raw, solid(GREEN))


@pytest.mark.parametrize(("shape", "nbytes", "message"), [
    ([32, 32], 3072, "uint8 tensor shape must be [H, W, 3], got 2 dimensions"),
    ([1, 32, 32, 3], 3072, "uint8 tensor shape must be [H, W, 3], got 4 dimensions"),
    ([32, 32, 4], 4096, "uint8 tensor shape must be [H, W, 3], got [32, 32, 4]"),
    ([3, 32, 32], 3072, "uint8 tensor shape must be [H, W, 3], got [3, 32, 32]"),
    ([0, 32, 3], 0, "uint8 tensor shape must be [H, W, 3], got [0, 32, 3]"),
    ([32, 32, 3], 3071, "uint8 tensor of shape [32, 32, 3] needs 3072 bytes, got 3071"),
    ([32, 32, 3], 3073, "uint8 tensor of shape [32, 32, 3] needs 3072 bytes, got 3073"),
    ([1, 200, 3], 600, "image is 200x1, an aspect ratio over the limit of 100:1 (the model sees a centre crop of "
                       "the shorter side)"),
])
def test_uint8_refusals(shape: list[int], nbytes: int, message: str) -> None:
    assert refused(Preprocessor(SIZE).uint8_hwc, shape, bytes(nbytes)) == message


def test_uint8_size_limits_come_before_the_payload_is_read() -> None:
    """A shape claiming 10^12 pixels is refused by its size, not by the (short) payload's length."""
    assert refused(Preprocessor(SIZE).uint8_hwc, [1_000_000, 1_000_000, 3], bytes(3)) == \
        "image is 1000000x1000000 = 1000000000000 pixels, over the limit of 16777216"


# --- raw float32 [3, H, W] ------------------------------------------------------------------------------------


def test_float32_is_taken_as_is() -> None:
    arr = np.random.default_rng(1).standard_normal((3, *SIZE)).astype("<f4")
    out = Preprocessor(SIZE).float32_chw([3, 32, 32], arr.tobytes())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(("shape", "data", "message"), [
    ([3, 32], bytes(3 * 32 * 4), "float32 tensor shape must be [3, 32, 32] (the model input), got 2 dimensions"),
    ([32, 32, 3], bytes(12288), "float32 tensor shape must be [3, 32, 32] (the model input), got [32, 32, 3]"),
    ([3, 64, 64], bytes(3 * 64 * 64 * 4), "float32 tensor shape must be [3, 32, 32] (the model input), got "
                                          "[3, 64, 64]"),
    ([3, 32, 32], bytes(12287), "float32 tensor of shape [3, 32, 32] needs 12288 bytes, got 12287"),
    ([3, 32, 32], np.full((3, 32, 32), np.nan, "<f4").tobytes(), "float32 tensor holds NaN or infinite values"),
    ([3, 32, 32], np.pad(np.array([np.inf], "<f4"), (0, 3071)).tobytes(), "float32 tensor holds NaN or infinite "
                                                                            "values"),
])
def test_float32_refusals(shape: list[int], data: bytes, message: str) -> None:
    assert refused(Preprocessor(SIZE).float32_chw, shape, data) == message

