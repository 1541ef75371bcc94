"""The one image transform used by training, export checks and serving, so they can never drift apart:
resize the shorter side, centre-crop to the model input, scale to [0, 1], normalise per channel, HWC -> CHW."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL image -> uint8 [height, width, 3]: shorter side scaled to fit, then a centre crop."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (width, height):
        scale = max(height / h, width / w)
        nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - width) // 2, (nh - height) // 2
        img = img.crop((left, top, left + width, top + height))
    return np.asarray(img, dtype=np.uint8)


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
