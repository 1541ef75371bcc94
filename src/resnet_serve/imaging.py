"""The one image transform used by training, export checks and serving, so they can never drift apart:
resize the shorter side, centre-crop to the model input, scale to [0, 1], normalise per channel, HWC -> CHW."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

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


class Normaliser:
    """uint8 NHWC batches -> float32 NCHW normalised, written into a preallocated buffer in two passes (the
    worker's hot path: no temporaries, the transpose folded into the first pass)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.scale = (np.float32(1.0 / 255.0) / np.asarray(std, np.float32))[:, None, None]
        self.shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32))[:, None, None]

    def __call__(self, images: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.multiply(np.moveaxis(images, -1, -3), self.scale, out=out, casting="unsafe")
        out -= self.shift
        return out
