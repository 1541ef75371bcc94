"""The one image decoder and transform used by training, export checks and serving, so they can never drift apart:
decode (one set of formats, EXIF orientation applied, every colour mode to 8-bit RGB), resize the shorter side,
centre-crop to the model input, scale to [0, 1], normalise per channel, HWC -> CHW."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

# What training reads is what the server accepts: one list, sniffed from the file's first bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
SUFFIXES = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF", ".bmp": "BMP"}
FORMAT_NAMES = "JPEG, PNG, WebP, GIF or BMP"
HEADER_BYTES = 12
# Transparent pixels are composited over white (what an image viewer shows), never their hidden RGB values.
BACKGROUND = (255, 255, 255)
_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def sniff(head: bytes) -> str | None:
    """The image format from the first HEADER_BYTES bytes, or None when it is not one of FORMATS."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM":
        return "BMP"
    return None


def decode(fp: BinaryIO, kind: str, size: tuple[int, int] | None = None,
           check: Callable[[int, int], None] | None = None) -> Image.Image:
    """The one decoder: an open file of format `kind` (from sniff) -> an upright 8-bit RGB image.

    `check(width, height)` runs on the header, before any pixel is decoded, with the size that will be decoded:
    `size` (H, W), the model input, lets a JPEG decode at a reduced scale that still covers it (faster, and what
    serving does: evaluation passes it too so its pixels are the server's), and the server's pixel budget counts
    those pixels. Raises what PIL raises (OSError, SyntaxError, ValueError) for a broken file.
    """
    img = Image.open(fp, formats=[kind])
    if size is not None and kind == "JPEG":
        side = max(size)  # square request: an EXIF rotation below must not leave one side short
        img.draft("RGB", (side, side))
    if check is not None:
        check(*img.size)
    img.load()  # a GIF's first frame
    return to_rgb(upright(img))


def decode_file(path: Path, size: tuple[int, int] | None = None) -> Image.Image:
    """decode() for a file on disk; ValueError naming the file when it is not one of FORMATS."""
    with open(path, "rb") as f:
        kind = sniff(f.read(HEADER_BYTES))
        if kind is None:
            raise ValueError(f"{path} is not a {FORMAT_NAMES} file (unrecognised header)")
        f.seek(0)
        return decode(f, kind, size)


def upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (a phone photo taken sideways stands up); unreadable EXIF counts as none."""
    try:
        orientation = img.getexif().get(_ORIENTATION)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, IndexError):
        return img
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(method) if method is not None else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit grey scaled (not clipped to white), alpha and palette transparency
    composited over BACKGROUND, CMYK/YCbCr/grey/bilevel converted."""
    if img.mode in _SIXTEEN_BIT:
        grey = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL image -> uint8 [height, width, 3]: shorter side scaled to fit, then a centre crop.

    Only the source region that survives the crop is resampled (Pillow's `box`), straight to the output size: no
    intermediate is larger than the output, whatever the aspect ratio (resizing a 1x300000 strip whole, then
    cropping, would build a 9600000x32 image on the way)."""
    if img.mode not in ("RGB", "L"):  # grey is resized as is and expanded after: cheaper, the same pixels
        img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (width, height):
        scale = max(height / h, width / w)
        box_w, box_h = width / scale, height / scale  # the part of the source the output shows
        left, top = (w - box_w) / 2, (h - box_h) / 2
        img = img.resize((width, height), Image.BILINEAR, box=(left, top, left + box_w, top + box_h))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def normalise(images: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], scaled to [0, 1] then (x - mean) / std."""
    *lead, h, w, c = images.shape
    return Normaliser(mean, std)(images, np.empty((*lead, c, h, w), np.float32))


def normalisation_constants(mean: Sequence[float] = IMAGENET_MEAN,
                            std: Sequence[float] = IMAGENET_STD) -> tuple[np.ndarray, np.ndarray]:
    """float32 (scale, shift), each [3]: normalised = pixel * scale - shift. The one definition shared by
    Normaliser and the exported program's own normalisation (export/resnet_serve/export/pixels.py), so both
    compute the same float32 operations on the same constants."""
    std32 = np.asarray(std, np.float32)
    return np.float32(1.0 / 255.0) / std32, np.asarray(mean, np.float32) / std32


class Normaliser:
    """uint8 NHWC batches -> float32 NCHW normalised, written into a preallocated buffer in two passes (the
    worker's hot path for models that take float input: no temporaries, the transpose folded into the first
    pass)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        scale, shift = normalisation_constants(mean, std)
        self.scale = scale[:, None, None]
        self.shift = shift[:, None, None]

    def __call__(self, images: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.multiply(np.moveaxis(images, -1, -3), self.scale, out=out, casting="unsafe")
        out -= self.shift
        return out
