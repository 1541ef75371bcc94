"""Request payloads -> uint8 [H, W, 3] pixels at the model's input size (the engine worker normalises them) or
float32 [3, H, W] already-normalised input, or InvalidInput naming the problem.

Runs off the event loop for encoded images (decoding is the expensive part). Oversized images and absurd aspect
ratios are refused from their header, before any pixel is decoded; a JPEG is decoded at reduced scale and its limit
applies to the pixels actually decoded. Knows numpy and PIL; nothing of gRPC or Paddle.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from resnet_serve.common.imaging import FORMAT_NAMES, decode, resize_crop, sniff

DEFAULT_MAX_PIXELS = 16_777_216  # 4096 x 4096: bounds the decode work (about 0.5 s) one small PNG can ask for
DEFAULT_MAX_ASPECT_RATIO = 100.0
_OBJECT = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # Pillow's texts name the BytesIO: no addresses to callers


class InvalidInput(ValueError):
    """The request's image cannot be used; the message says why (it goes back to the caller)."""


@dataclass(frozen=True)
class Preprocessor:
    input_size: tuple[int, int]  # (H, W) of the model
    max_pixels: int = DEFAULT_MAX_PIXELS  # pixels decoded (a JPEG's after its reduced-scale decode)
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO  # longer side / shorter side

    def encoded(self, data: bytes) -> np.ndarray:
        """Encoded bytes in one of the formats training reads (imaging.FORMATS) -> uint8 [H, W, 3] at
        the model's input size, decoded by the same function as training (EXIF orientation, 16-bit, alpha)."""
        if not data:
            raise InvalidInput("image is empty")
        kind = sniff(data)
        if kind is None:
            raise InvalidInput(f"image is not a {FORMAT_NAMES} file (unrecognised header)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = decode(io.BytesIO(data), kind, self.input_size, self._check_size)
        except InvalidInput:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise InvalidInput(f"cannot decode {kind} image: {_OBJECT.sub('', str(e))}") from e
        return resize_crop(img, *self.input_size)

    def uint8_hwc(self, shape: Sequence[int], data: bytes) -> np.ndarray:
        """Raw uint8 [H, W, 3] RGB, any H, W (resized like an encoded image) -> uint8 [H, W, 3] at model size."""
        if len(shape) != 3:
            raise InvalidInput(f"uint8 tensor shape must be [H, W, 3], got {len(shape)} dimensions")
        if shape[2] != 3 or shape[0] <= 0 or shape[1] <= 0:
            raise InvalidInput(f"uint8 tensor shape must be [H, W, 3], got {list(shape)}")
        h, w = int(shape[0]), int(shape[1])
        self._check_size(w, h)
        if len(data) != h * w * 3:
            raise InvalidInput(f"uint8 tensor of shape {list(shape)} needs {h * w * 3} bytes, got {len(data)}")
        arr = np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
        if (h, w) != tuple(self.input_size):
            arr = resize_crop(Image.fromarray(arr), *self.input_size)
        return arr

    def float32_chw(self, shape: Sequence[int], data: bytes) -> np.ndarray:
        """Raw float32 [3, H, W], already normalised, exactly at the model's input size."""
        expected = [3, *self.input_size]
        if len(shape) != 3:
            raise InvalidInput(f"float32 tensor shape must be {expected} (the model input), got {len(shape)} "
                               "dimensions")
        if list(shape) != expected:
            raise InvalidInput(f"float32 tensor shape must be {expected} (the model input), got {list(shape)}")
        if len(data) != 3 * self.input_size[0] * self.input_size[1] * 4:
            raise InvalidInput(f"float32 tensor of shape {expected} needs {int(np.prod(expected)) * 4} bytes, "
                               f"got {len(data)}")
        arr = np.frombuffer(data, dtype="<f4").reshape(expected)
        if not np.isfinite(arr).all():
            raise InvalidInput("float32 tensor holds NaN or infinite values")
        return arr.astype(np.float32, copy=False)

    def _check_size(self, w: int, h: int) -> None:
        """Before any pixel is decoded: an encoded image's size from its header (a JPEG's at the reduced scale
        it will be decoded at), a raw tensor's from its shape."""
        self._check_aspect(w, h)
        self._check_pixels(w, h)

    def _check_pixels(self, w: int, h: int) -> None:
        if w * h > self.max_pixels:
            raise InvalidInput(f"image is {w}x{h} = {w * h} pixels, over the limit of {self.max_pixels}")

    def _check_aspect(self, w: int, h: int) -> None:
        """Only a centre square of the shorter side is classified: beyond this ratio that is not the image."""
        if max(w, h) > self.max_aspect_ratio * min(w, h):
            raise InvalidInput(f"image is {w}x{h}, an aspect ratio over the limit of {self.max_aspect_ratio:g}:1 "
                               "(the model sees a centre crop of the shorter side)")
