"""client results: a ClassifyResponse as a Result, an error answer raised or (in a stream) an item, and the caller's
id put back (client/resnet_serve/client/results.py)."""

from __future__ import annotations

import grpc
import pytest

from resnet_serve.client.errors import ClassifierError
from resnet_serve.client.results import Prediction, Result, item_of, result_of, with_id
from resnet_serve.protos import classifier_pb2 as pb

ANSWER = pb.ClassifyResponse(request_id="7", model_version="3", predictions=[
    pb.Prediction(class_id=2, label="cat", score=0.75), pb.Prediction(class_id=0, label="dog", score=0.25)])
FAILED = pb.ClassifyResponse(request_id="8", error=pb.Error(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                            message="image is empty"))


def test_an_answer_is_a_result_with_its_predictions_best_first() -> None:
    result = result_of(ANSWER)
    assert result == Result("7", [Prediction(2, "cat", 0.75), Prediction(0, "dog", 0.25)], "3")
    assert result.top1 == Prediction(2, "cat", 0.75)


def test_an_error_answer_raises_with_its_code_message_and_id() -> None:
    with pytest.raises(ClassifierError) as raised:
        result_of(FAILED)
    assert (raised.value.code, raised.value.message, raised.value.request_id) == (
        grpc.StatusCode.INVALID_ARGUMENT, "image is empty", "8")
    assert str(raised.value) == "INVALID_ARGUMENT: image is empty"


def test_an_error_with_an_unknown_code_is_unknown() -> None:
    with pytest.raises(ClassifierError) as raised:
        result_of(pb.ClassifyResponse(error=pb.Error(code=99, message="new")))
    assert raised.value.code == grpc.StatusCode.UNKNOWN


def test_a_stream_item_is_its_result_or_its_error_as_a_value() -> None:
    assert item_of(ANSWER) == result_of(ANSWER)
    assert item_of(FAILED) == ClassifierError(grpc.StatusCode.INVALID_ARGUMENT, "image is empty", "8")


def test_with_id_puts_the_callers_id_on_a_result_and_on_an_error() -> None:
    result = result_of(ANSWER)
    renamed = with_id(result, "cat.jpg")
    assert renamed.request_id == "cat.jpg" and renamed.predictions == result.predictions
    assert result.request_id == "7"  # a Result is frozen: a new one is returned
    error = item_of(FAILED)
    assert with_id(error, "bad.jpg") is error and error.request_id == "bad.jpg"


def test_an_answer_without_predictions_is_a_result_with_none() -> None:
    result = result_of(pb.ClassifyResponse(request_id="1"))
    assert result.predictions == [] and result.model_version == ""
    with pytest.raises(IndexError):
        _ = result.top1
