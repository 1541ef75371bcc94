"""Anything a user holds as an image -> a ClassifyRequest: file paths, encoded bytes, PIL images, numpy arrays."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from resnet_serve.protos import classifier_pb2 as pb

ImageLike = str | Path | bytes | bytearray | memoryview | np.ndarray | Any  # Any: a PIL.Image.Image


def to_request(image: ImageLike, top_k: int = 0, request_id: str = "") -> pb.ClassifyRequest:
    """Paths and bytes are sent encoded (the server decodes); PIL images as PNG; uint8 [H, W, 3] arrays as raw
    tensors (resized by the server); float32 [3, H, W] arrays as already-normalised model input."""
    req = pb.ClassifyRequest(top_k=top_k, request_id=request_id)
    if isinstance(image, (str, Path)):
        req.encoded = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        req.encoded = bytes(image)
    elif isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            req.tensor.CopyFrom(pb.Tensor(dtype=pb.Tensor.UINT8, shape=list(image.shape),
                                          data=np.ascontiguousarray(image).tobytes()))
        elif image.dtype.newbyteorder("=") == np.float32 and image.ndim == 3 and image.shape[0] == 3:
            # float32 of either byte order (e.g. read with ">f4"): sent little-endian, as the wire format says
            req.tensor.CopyFrom(pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=list(image.shape),
                                          data=np.ascontiguousarray(image, dtype="<f4").tobytes()))
        else:
            raise ValueError(f"arrays must be uint8 [H, W, 3] or float32 [3, H, W], got {image.dtype} {image.shape}")
    elif hasattr(image, "save") and hasattr(image, "mode"):  # PIL.Image.Image, without importing PIL eagerly
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        req.encoded = buf.getvalue()
    else:
        raise TypeError(f"cannot send {type(image).__name__} as an image")
    return req
