"""client streams: on the wire an item's id is its index; answers come back with the caller's id, in request order
or as they arrive (client/resnet_serve/client/streams.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from resnet_serve.client.errors import ClassifierError
from resnet_serve.client.results import Prediction, Result
from resnet_serve.client.streams import StreamOrder, default_id
from resnet_serve.protos import classifier_pb2 as pb


def answer(index: int | str, class_id: int = 1) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(request_id=str(index), model_version="1",
                               predictions=[pb.Prediction(class_id=class_id, label=f"c{class_id}", score=1.0)])


def ids(items: list) -> list[str]:
    return [item.request_id for item in items]


def test_an_items_default_id_is_its_path_else_its_position(tmp_path: Path) -> None:
    assert default_id(tmp_path / "cat.jpg", 4) == str(tmp_path / "cat.jpg")
    assert default_id("dog.png", 0) == "dog.png"
    assert default_id(b"\xff\xd8", 7) == "7"


def test_the_wire_id_is_the_index_whatever_the_callers_id() -> None:
    order = StreamOrder(ordered=True, ids=["a very long caller id " * 10, "b"])
    first = order.request(0, b"jpeg", top_k=3)
    assert (first.request_id, first.top_k, first.encoded) == ("0", 3, b"jpeg")
    assert order.request(1, np.zeros((2, 2, 3), np.uint8), 0).request_id == "1"
    assert order.names == {0: "a very long caller id " * 10, 1: "b"}


def test_fewer_ids_than_images_is_refused_naming_the_image() -> None:
    order = StreamOrder(ordered=False, ids=iter(["only"]))
    order.request(0, b"x", 0)
    with pytest.raises(ValueError) as raised:
        order.request(1, b"y", 0)
    assert str(raised.value) == "fewer request ids than images (none for image 1)"


def test_ordered_answers_are_held_until_every_earlier_one_came() -> None:
    order = StreamOrder(ordered=True, ids=["a", "b", "c", "d"])
    for i in range(4):
        order.request(i, b"x", 0)
    assert order.add(answer(2)) == []
    assert order.add(answer(1)) == []
    assert ids(order.add(answer(0))) == ["a", "b", "c"]
    assert ids(order.add(answer(3))) == ["d"]
    assert order.pending == {} and order.names == {}


def test_unordered_answers_are_handed_back_as_they_arrive() -> None:
    order = StreamOrder(ordered=False, ids=["a", "b"])
    order.request(0, b"x", 0)
    order.request(1, b"x", 0)
    assert order.add(answer(1, class_id=5)) == [Result("b", [Prediction(5, "c5", 1.0)], "1")]
    assert ids(order.add(answer(0))) == ["a"]


def test_an_error_item_takes_its_place_in_order_with_the_callers_id() -> None:
    order = StreamOrder(ordered=True, ids=["a", "b"])
    order.request(0, b"x", 0)
    order.request(1, b"x", 0)
    failed = pb.ClassifyResponse(request_id="0", error=pb.Error(code=3, message="image is empty"))
    assert order.add(answer(1)) == []
    items = order.add(failed)
    assert items[0] == ClassifierError(grpc.StatusCode.INVALID_ARGUMENT, "image is empty", "a")
    assert ids(items) == ["a", "b"]


def test_an_answer_whose_id_this_client_did_not_send_is_handed_back_as_it_is() -> None:
    order = StreamOrder(ordered=True)
    order.request(0, b"x", 0)
    assert ids(order.add(answer("not-an-index"))) == ["not-an-index"]
    assert ids(order.add(answer(0))) == ["0"]
