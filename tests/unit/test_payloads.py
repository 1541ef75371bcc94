"""client tools payloads: the load generator's requests, serialised once up front, and the same pictures N to an
OIP request (client/resnet_serve/client/tools/payloads.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from resnet_serve.client.tools.payloads import batches, payloads, with_id
from resnet_serve.protos import classifier_pb2 as pb


@pytest.mark.parametrize("kind", ["raw", "jpeg"])
def test_payloads_are_valid_requests_at_the_input_size(kind: str) -> None:
    blobs = payloads(kind, (24, 40), top_k=3, count=2)
    assert len(set(blobs)) == 2
    req = pb.ClassifyRequest.FromString(with_id(blobs[0], "17"))
    assert req.request_id == "17" and req.top_k == 3
    if kind == "raw":
        assert list(req.tensor.shape) == [24, 40, 3] and len(req.tensor.data) == 24 * 40 * 3
    else:
        assert Image.open(io.BytesIO(req.encoded)).size == (40, 24)


def test_the_same_seed_gives_the_same_pictures_and_another_seed_others() -> None:
    assert payloads("raw", (8, 8), count=3, seed=1) == payloads("raw", (8, 8), count=3, seed=1)
    assert payloads("raw", (8, 8), count=3, seed=1) != payloads("raw", (8, 8), count=3, seed=2)


def picture(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_users_files_are_sent_as_they_are_or_decoded_to_the_input_size() -> None:
    files = [picture(64, 32), picture(10, 30)]
    sent = [pb.ClassifyRequest.FromString(p) for p in payloads("jpeg", (24, 40), top_k=2, data=files)]
    assert [r.encoded for r in sent] == files and {r.top_k for r in sent} == {2}
    raw = [pb.ClassifyRequest.FromString(p) for p in payloads("raw", (24, 40), data=files, count=99)]
    assert len(raw) == 2  # one per file, whatever the count
    for r in raw:
        assert (r.tensor.dtype, list(r.tensor.shape), len(r.tensor.data)) == (pb.Tensor.UINT8, [24, 40, 3],
                                                                              24 * 40 * 3)


def test_with_id_sets_the_id_without_touching_the_picture_and_the_last_id_wins() -> None:
    blob = payloads("raw", (4, 4), top_k=1, count=1)[0]
    once = pb.ClassifyRequest.FromString(with_id(blob, "a"))
    twice = pb.ClassifyRequest.FromString(with_id(with_id(blob, "a"), "b"))
    assert (once.request_id, twice.request_id) == ("a", "b")
    assert once.tensor == twice.tensor == pb.ClassifyRequest.FromString(blob).tensor and once.top_k == 1


def test_an_unreadable_file_fails_for_raw_input() -> None:
    with pytest.raises(Image.UnidentifiedImageError):
        payloads("raw", (8, 8), data=[b"not an image"])


@pytest.mark.parametrize("kind", ["raw", "jpeg"])
def test_batches_stack_distinct_pictures_n_to_a_request(kind: str) -> None:
    arrays = batches(kind, (24, 40), batch=3)
    assert len(arrays) == 8  # 8 pictures, 3 to a request: the cycle repeats after 8 requests
    for arr in arrays:
        if kind == "raw":
            assert (arr.dtype, arr.shape) == (np.uint8, (3, 24, 40, 3))
            pictures = [a.tobytes() for a in arr]
        else:
            assert (arr.dtype, arr.shape) == (np.object_, (3, 1))
            pictures = list(arr[:, 0])
            assert all(Image.open(io.BytesIO(p)).size == (40, 24) for p in pictures)
        assert len(set(pictures)) == 3
    first = [a.tobytes() for a in arrays[0]] if kind == "raw" else list(arrays[0][:, 0])
    second = [a.tobytes() for a in arrays[1]] if kind == "raw" else list(arrays[1][:, 0])
    assert not set(first) & set(second)  # consecutive requests carry other pictures


def test_a_batch_of_one_is_each_picture_of_payloads_in_turn() -> None:
    reqs = [pb.ClassifyRequest.FromString(p) for p in payloads("raw", (8, 8), seed=4)]
    arrays = batches("raw", (8, 8), seed=4)
    assert [a.shape for a in arrays] == [(1, 8, 8, 3)] * len(reqs)
    assert [a.tobytes() for a in arrays] == [r.tensor.data for r in reqs]


def test_a_batch_larger_than_eight_gets_as_many_generated_pictures() -> None:
    (arr,) = batches("raw", (4, 4), batch=12)  # 12 pictures, 12 to a request: one request
    assert arr.shape == (12, 4, 4, 3) and len({a.tobytes() for a in arr}) == 12


def test_a_batch_larger_than_the_users_files_cycles_through_them() -> None:
    files = [picture(10, 10), picture(12, 10)]
    (arr,) = batches("jpeg", (8, 8), batch=4, data=files)
    assert list(arr[:, 0]) == files * 2
