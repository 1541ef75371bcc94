"""client errors: ClassifierError, from a transport error or an in-stream numeric code
(client/resnet_serve/client/errors.py)."""

from __future__ import annotations

import grpc
import pytest

from resnet_serve.client.errors import ClassifierError, error_of, status_code


def aio_error(code: grpc.StatusCode, details: str | None) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def test_the_error_says_its_code_and_message_and_keeps_them() -> None:
    e = ClassifierError(grpc.StatusCode.RESOURCE_EXHAUSTED, "server queue is full, retry later", "r1")
    assert str(e) == "RESOURCE_EXHAUSTED: server queue is full, retry later"
    assert (e.code, e.message, e.request_id) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                 "server queue is full, retry later", "r1")


def test_errors_compare_and_hash_by_code_message_and_id() -> None:
    a = ClassifierError(grpc.StatusCode.INTERNAL, "boom", "1")
    assert a == ClassifierError(grpc.StatusCode.INTERNAL, "boom", "1")
    assert len({a, ClassifierError(grpc.StatusCode.INTERNAL, "boom", "1")}) == 1
    assert a != ClassifierError(grpc.StatusCode.INTERNAL, "boom", "2")
    assert a != ClassifierError(grpc.StatusCode.UNAVAILABLE, "boom", "1")
    assert a != ClassifierError(grpc.StatusCode.INTERNAL, "boom!", "1")
    assert a != "INTERNAL: boom"


@pytest.mark.parametrize(("details", "message"), [("Deadline Exceeded", "Deadline Exceeded"), (None, "")])
def test_a_transport_error_becomes_a_classifier_error(details: str | None, message: str) -> None:
    e = error_of(aio_error(grpc.StatusCode.DEADLINE_EXCEEDED, details), "cat.jpg")
    assert e == ClassifierError(grpc.StatusCode.DEADLINE_EXCEEDED, message, "cat.jpg")


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_every_numeric_code_is_its_status_code(code: grpc.StatusCode) -> None:
    assert status_code(code.value[0]) is code


@pytest.mark.parametrize("value", [17, -1, 1 << 30])
def test_a_numeric_code_grpc_does_not_know_is_unknown(value: int) -> None:
    assert status_code(value) is grpc.StatusCode.UNKNOWN
