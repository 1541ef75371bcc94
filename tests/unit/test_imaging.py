"""common/resnet_serve/common/imaging.py: format sniffing, the file decoder's refusal, and the normalisation the
worker applies (the decode and resize path is exercised through the server's Preprocessor in test_preprocess.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_serve.common.imaging import (
    FORMATS,
    HEADER_BYTES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SUFFIXES,
    Normaliser,
    decode_file,
    normalise,
    sniff,
)


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_sniff_knows_every_format_from_its_first_bytes(fmt: str) -> None:
    assert sniff(encoded(fmt)[:HEADER_BYTES]) == fmt


@pytest.mark.parametrize("head", [b"", b"\xff\xd8", b"GIF90a", b"RIFF\0\0\0\0WAVE", b"%PDF-1.7", b"II*\0"])
def test_sniff_refuses_everything_else(head: bytes) -> None:
    assert sniff(head) is None


def test_suffixes_name_only_accepted_formats() -> None:
    assert set(SUFFIXES.values()) == set(FORMATS)


def test_decode_file_names_a_file_that_is_no_image(tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError) as err:
        decode_file(bad)
    assert str(err.value) == f"{bad} is not a JPEG, PNG, WebP, GIF or BMP file (unrecognised header)"
    good = tmp_path / "ok.bmp"
    good.write_bytes(encoded("BMP"))
    img = decode_file(good)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (10, 20, 30)


def test_normalise_is_scale_then_mean_std_in_chw() -> None:
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    expected = ((x / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(0, 3, 1, 2)
    out = normalise(x)
    assert out.dtype == np.float32 and out.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_normaliser_writes_into_the_buffer_it_is_given() -> None:
    x = np.full((1, 2, 2, 3), 255, np.uint8)
    buf = np.empty((1, 3, 2, 2), np.float32)
    out = Normaliser(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))(x, buf)
    assert out is buf
    np.testing.assert_allclose(buf[0, :, 0, 0], [1.0, 2.0, 0.5], rtol=1e-6)
