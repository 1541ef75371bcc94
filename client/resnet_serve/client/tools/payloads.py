"""The load generator's pictures as serialised ClassifyRequests, made once up front so sending one costs no
encoding: generated pictures (raw uint8 tensors or JPEG files) or the user's own image files; and the same
pictures stacked N to a request (batches) for the Open Inference Protocol's batch dimension."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from resnet_serve.protos import classifier_pb2 as pb


def payloads(kind: str, hw: tuple[int, int], top_k: int = 0, count: int = 8, seed: int = 0,
             data: Sequence[bytes] = ()) -> list[bytes]:
    """Serialised ClassifyRequests without request ids: raw uint8 HWC tensors at the model's input size, or JPEG
    files of the same pictures (smooth gradients plus noise, so they compress like photographs). With `data`
    (image files' bytes), those instead: sent as they are (jpeg), or decoded and resized to the input size (raw)."""
    if data:
        return [_file_payload(kind, blob, hw, top_k) for blob in data]
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(count):
        base = (rng.uniform(0, 255, 3)[None, None] + rng.uniform(-1, 1, 3)[None, None] * (xx + yy)[..., None]
                * 255 / (h + w))
        arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        if kind == "raw":
            req = pb.ClassifyRequest(top_k=top_k, tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[h, w, 3],
                                                                   data=arr.tobytes()))
        else:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            req = pb.ClassifyRequest(top_k=top_k, encoded=buf.getvalue())
        out.append(req.SerializeToString())
    return out


def _file_payload(kind: str, blob: bytes, hw: tuple[int, int], top_k: int) -> bytes:
    if kind != "raw":
        return pb.ClassifyRequest(top_k=top_k, encoded=blob).SerializeToString()
    from PIL import Image

    from resnet_serve.common.imaging import resize_crop

    with Image.open(io.BytesIO(blob)) as img:
        arr = resize_crop(img, *hw)
    return pb.ClassifyRequest(top_k=top_k, tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=list(arr.shape),
                                                            data=arr.tobytes())).SerializeToString()


def batches(kind: str, hw: tuple[int, int], batch: int = 1, seed: int = 0,
            data: Sequence[bytes] = ()) -> list[np.ndarray]:
    """The pictures of payloads() (same generator and seed, or the same files), `batch` to a request: raw as uint8
    [N, H, W, 3], jpeg as object [N, 1] of file bytes. The pictures are taken in turn, so a request's N are distinct
    when there are at least N (generated: max(8, N) of them; files: as many as given) and consecutive requests
    differ; one array per request until the cycle repeats."""
    pics = [_picture(kind, pb.ClassifyRequest.FromString(b))
            for b in payloads(kind, hw, seed=seed, data=data, count=max(8, batch))]
    out = []
    for k in range(len(pics) // math.gcd(len(pics), batch)):
        chosen = [pics[(k * batch + j) % len(pics)] for j in range(batch)]
        if kind == "raw":
            out.append(np.stack(chosen))
        else:
            arr = np.empty((batch, 1), dtype=np.object_)
            arr[:, 0] = chosen
            out.append(arr)
    return out


def _picture(kind: str, req: pb.ClassifyRequest) -> np.ndarray | bytes:
    if kind == "raw":
        return np.frombuffer(req.tensor.data, dtype=np.uint8).reshape(tuple(req.tensor.shape))
    return req.encoded


def with_id(payload: bytes, request_id: str) -> bytes:
    """Protobuf merges concatenated messages: appending a serialised {request_id} sets the id without
    re-serialising the image."""
    return payload + pb.ClassifyRequest(request_id=request_id).SerializeToString()
