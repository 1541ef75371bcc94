"""Errors as callers see them, the same for every transport (classifier.v1 and the Open Inference Protocol): the
one table that turns the server's exceptions into gRPC status codes and messages, and the rules that keep a
message within what every client accepts. Knows gRPC status codes; nothing of protobuf or Paddle."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc

from .admission import PreprocessQueueFull
from .batcher import DeadlineExpired, QueueFull, ShuttingDown
from .preprocess import InvalidInput

log = logging.getLogger(__name__)

BASE_ERROR_CODES: dict[type[BaseException], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}
# Fixed texts where the exception's own would say less (PreprocessQueueFull is a QueueFull: RESOURCE_EXHAUSTED).
MESSAGES: dict[type[BaseException], str] = {
    QueueFull: "server queue is full, retry later", DeadlineExpired: "deadline expired while queued",
    ShuttingDown: "server is shutting down", PreprocessQueueFull: "server is busy preprocessing images, retry later"}
# Error texts travel in the grpc-message header, which clients accept up to 8 KiB by default (percent-encoded):
# a client's own text is echoed at most ECHO_CHARS characters long, ASCII-escaped, and no message is longer
# than MESSAGE_CHARS.
ECHO_CHARS, MESSAGE_CHARS = 64, 1024
NOT_LOADED = "model is loading, not serving yet"


def echo(text: str) -> str:
    """A client's string quoted for an error message: ASCII only, at most ECHO_CHARS characters of it."""
    if len(text) <= ECHO_CHARS:
        return ascii(text)
    return f"{ascii(text[:ECHO_CHARS])}... ({len(text)} characters)"


def clip(message: str) -> str:
    """At most MESSAGE_CHARS characters, marked when cut."""
    return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS - 15] + "... (truncated)"


class RequestError(Exception):
    """An answer that is an error: a status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        message = clip(message)
        super().__init__(message)
        self.code, self.message = code, message


def check_request_id(request_id: str, limit: int) -> None:
    """Every answer echoes the id: bounding it keeps every answer within the message size clients accept."""
    if len(request_id) > limit:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request id is {len(request_id)} characters, over the limit of {limit}")


class ErrorTable:
    """Exception -> RequestError: the most specific class listed (along the exception's MRO) gives the code; the
    message is a fixed text (MESSAGES) or the exception's own. Anything unlisted is INTERNAL, logged with its
    traceback, and the caller learns only its type."""

    def __init__(self, extra: Mapping[type[BaseException], grpc.StatusCode] | None = None):
        self.codes = {**BASE_ERROR_CODES, **(extra or {})}

    def to_error(self, exc: BaseException) -> RequestError:
        for cls in type(exc).__mro__:
            if cls in self.codes:
                msg = MESSAGES.get(type(exc)) or MESSAGES.get(cls) or str(exc) or cls.__name__
                return RequestError(self.codes[cls], msg)
        log.exception("unexpected error while classifying", exc_info=exc)
        return RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def cancel_code(time_remaining: float | None) -> grpc.StatusCode:
    """The code of a handler that was cancelled, given the call's time remaining then: DEADLINE_EXCEEDED when the
    caller's deadline had passed, CANCELLED when the caller went away."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if time_remaining is not None and time_remaining <= 0 else \
        grpc.StatusCode.CANCELLED
