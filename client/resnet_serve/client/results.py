"""What a classification returns: Result and its Predictions, from a ClassifyResponse (an error answer raises,
or in a stream becomes the item)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from resnet_serve.protos import classifier_pb2 as pb

from .errors import ClassifierError, status_code


@dataclass(frozen=True)
class Prediction:
    class_id: int
    label: str
    score: float


@dataclass(frozen=True)
class Result:
    request_id: str
    predictions: list[Prediction]
    model_version: str

    @property
    def top1(self) -> Prediction:
        return self.predictions[0]


def result_of(response: pb.ClassifyResponse) -> Result:
    if response.HasField("error"):
        raise ClassifierError(status_code(response.error.code), response.error.message, response.request_id)
    return Result(response.request_id,
                  [Prediction(p.class_id, p.label, p.score) for p in response.predictions], response.model_version)


def item_of(response: pb.ClassifyResponse) -> Result | ClassifierError:
    """A stream item: its Result, or its error as a value (a bad item does not end the stream)."""
    try:
        return result_of(response)
    except ClassifierError as e:
        return e


def with_id(item: Result | ClassifierError, request_id: str) -> Result | ClassifierError:
    """The item carrying the caller's id instead of the one on the wire."""
    if isinstance(item, Result):
        return replace(item, request_id=request_id)
    item.request_id = request_id
    return item
