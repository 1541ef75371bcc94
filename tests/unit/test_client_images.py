"""client images: anything a user holds as an image as a ClassifyRequest (client/resnet_serve/client/images.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_serve.client.images import to_request
from resnet_serve.protos import classifier_pb2 as pb


def test_a_path_is_sent_as_the_files_bytes(tmp_path: Path) -> None:
    f = tmp_path / "cat.jpg"
    f.write_bytes(b"\xff\xd8 not decoded by the client")
    for image in (f, str(f)):
        req = to_request(image, top_k=5, request_id="r")
        assert (req.encoded, req.top_k, req.request_id, req.WhichOneof("image")) == (
            f.read_bytes(), 5, "r", "encoded")


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_of_every_kind_are_sent_encoded(kind: type) -> None:
    assert to_request(kind(b"\x89PNG...")).encoded == b"\x89PNG..."


def test_a_uint8_hwc_array_is_a_raw_tensor_even_when_not_contiguous() -> None:
    arr = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)[:, ::2]  # a strided view
    req = to_request(arr)
    assert req.WhichOneof("image") == "tensor"
    assert (req.tensor.dtype, list(req.tensor.shape)) == (pb.Tensor.UINT8, [4, 3, 3])
    assert req.tensor.data == np.ascontiguousarray(arr).tobytes()


def test_a_float32_chw_array_is_sent_little_endian() -> None:
    arr = np.linspace(-1, 1, 3 * 2 * 2, dtype=">f4").reshape(3, 2, 2)  # big-endian float32 is float32 too
    req = to_request(arr)
    assert (req.tensor.dtype, list(req.tensor.shape)) == (pb.Tensor.FLOAT32, [3, 2, 2])
    assert np.array_equal(np.frombuffer(req.tensor.data, "<f4").reshape(3, 2, 2), arr)


@pytest.mark.parametrize("arr", [np.zeros((2, 2, 3), np.float64), np.zeros((2, 2, 4), np.uint8),
                                 np.zeros((2, 2), np.uint8), np.zeros((2, 2, 3), np.float32),
                                 np.zeros((1, 3, 2, 2), np.float32)])
def test_any_other_array_is_refused_saying_what_is_accepted(arr: np.ndarray) -> None:
    with pytest.raises(ValueError) as raised:
        to_request(arr)
    assert str(raised.value) == (f"arrays must be uint8 [H, W, 3] or float32 [3, H, W], got {arr.dtype} "
                                 f"{arr.shape}")


def test_a_pil_image_is_sent_as_an_rgb_png() -> None:
    img = Image.new("RGBA", (5, 3), (10, 20, 30, 128))
    req = to_request(img)
    with Image.open(io.BytesIO(req.encoded)) as sent:
        assert (sent.format, sent.mode, sent.size) == ("PNG", "RGB", (5, 3))
        assert sent.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("image", [42, None, [1, 2, 3]])
def test_anything_else_is_a_type_error(image: object) -> None:
    with pytest.raises(TypeError) as raised:
        to_request(image)
    assert str(raised.value) == f"cannot send {type(image).__name__} as an image"
