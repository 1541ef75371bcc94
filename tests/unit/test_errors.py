"""errors: the one table from the server's exceptions to gRPC codes and messages, and the rules that keep a message
within what every client accepts (server/resnet_serve/server/errors.py), at and one past each bound."""

from __future__ import annotations

import logging

import grpc
import pytest

from resnet_serve.server.admission import PreprocessQueueFull
from resnet_serve.server.batcher import DeadlineExpired, QueueFull, ShuttingDown
from resnet_serve.server.errors import (
    ECHO_CHARS,
    MESSAGE_CHARS,
    ErrorTable,
    RequestError,
    cancel_code,
    check_request_id,
    clip,
    echo,
)
from resnet_serve.server.handle import call_deadline
from resnet_serve.server.preprocess import InvalidInput

Code = grpc.StatusCode


class ComputeFailed(Exception):
    """Stands for an engine error the server adds to the table (app.py adds the engine's own)."""


class ComputeFailedHard(ComputeFailed):
    pass


# --- the error table -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("exc", "code", "message"), [
    (InvalidInput("image is empty"), Code.INVALID_ARGUMENT, "image is empty"),
    (QueueFull("queue full (256 requests waiting)"), Code.RESOURCE_EXHAUSTED, "server queue is full, retry later"),
    (PreprocessQueueFull("preprocessing is full"), Code.RESOURCE_EXHAUSTED,
     "server is busy preprocessing images, retry later"),
    (DeadlineExpired("x"), Code.DEADLINE_EXCEEDED, "deadline expired while queued"),
    (ShuttingDown("x"), Code.UNAVAILABLE, "server is shutting down"),
    (ComputeFailed("worker 0 failed: out of memory"), Code.INTERNAL, "worker 0 failed: out of memory"),
    (ComputeFailedHard(""), Code.UNAVAILABLE, "ComputeFailedHard"),  # the most specific class listed wins
])
def test_the_error_table_maps_each_error_to_its_code_and_message(exc: BaseException, code: Code,
                                                                 message: str) -> None:
    table = ErrorTable({ComputeFailed: Code.INTERNAL, ComputeFailedHard: Code.UNAVAILABLE})
    error = table.to_error(exc)
    assert (error.code, error.message) == (code, message)


def test_an_error_the_table_does_not_know_is_internal_and_says_only_its_type(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="resnet_serve.server.errors"):
        error = ErrorTable().to_error(KeyError("secret path /etc/x"))
    assert (error.code, error.message) == (Code.INTERNAL, "internal error: KeyError")
    assert "secret path" in caplog.text  # the traceback is logged for the operator, not sent


def test_messages_are_clipped_and_echoed_strings_quoted_and_cut() -> None:
    assert clip("short") == "short"
    long = clip("x" * 5000)
    assert len(long) == MESSAGE_CHARS and long.endswith("... (truncated)")
    assert RequestError(Code.INTERNAL, "y" * 5000).message == clip("y" * 5000)
    assert echo("ok") == "'ok'" and echo("é\n") == "'\\xe9\\n'"
    assert echo("z" * 100) == f"'{'z' * 64}'... (100 characters)"


def test_request_ids_over_the_limit_are_refused() -> None:
    check_request_id("a" * 8, 8)
    with pytest.raises(RequestError) as raised:
        check_request_id("a" * 9, 8)
    assert (raised.value.code, raised.value.message) == (Code.INVALID_ARGUMENT,
                                                         "request id is 9 characters, over the limit of 8")


def test_a_cancelled_call_is_deadline_exceeded_only_once_its_deadline_passed() -> None:
    assert cancel_code(None) == Code.CANCELLED
    assert cancel_code(1.5) == Code.CANCELLED
    assert cancel_code(0.0) == Code.DEADLINE_EXCEEDED
    assert cancel_code(-0.1) == Code.DEADLINE_EXCEEDED
    assert call_deadline(None) is None


def test_a_message_exactly_at_the_limit_is_kept_and_one_character_more_is_cut() -> None:
    exact = "m" * MESSAGE_CHARS
    assert clip(exact) == exact
    cut = clip(exact + "m")
    assert cut == "m" * (MESSAGE_CHARS - 15) + "... (truncated)" and len(cut) == MESSAGE_CHARS


def test_an_echo_exactly_at_the_limit_is_whole_and_one_character_more_is_cut() -> None:
    assert echo("e" * ECHO_CHARS) == repr("e" * ECHO_CHARS)
    assert echo("e" * (ECHO_CHARS + 1)) == f"{'e' * ECHO_CHARS!r}... ({ECHO_CHARS + 1} characters)"
    assert echo("\u2603" * (ECHO_CHARS + 1)).isascii()  # cut in characters, then escaped


def test_a_subclass_of_a_listed_error_gets_its_code_and_fixed_text_and_an_empty_error_its_class_name() -> None:
    class TooManyQueued(QueueFull):
        pass

    class Unreadable(InvalidInput):
        pass

    table = ErrorTable()
    assert (table.to_error(TooManyQueued("999 waiting")).code, table.to_error(TooManyQueued("999 waiting")).message) \
        == (Code.RESOURCE_EXHAUSTED, "server queue is full, retry later")
    error = table.to_error(Unreadable(""))
    assert (error.code, error.message) == (Code.INVALID_ARGUMENT, "InvalidInput")


def test_extra_codes_extend_the_table_and_may_override_a_base_code() -> None:
    table = ErrorTable({InvalidInput: Code.FAILED_PRECONDITION, KeyError: Code.NOT_FOUND})
    assert table.to_error(InvalidInput("bad")).code == Code.FAILED_PRECONDITION
    assert (table.to_error(KeyError("k")).code, table.to_error(KeyError("k")).message) == (Code.NOT_FOUND, "'k'")
    assert ErrorTable().to_error(InvalidInput("bad")).code == Code.INVALID_ARGUMENT  # tables do not share state


def test_a_request_error_longer_than_the_limit_is_clipped_in_its_message_and_its_str() -> None:
    error = RequestError(Code.INVALID_ARGUMENT, "r" * (MESSAGE_CHARS + 1))
    assert error.message == str(error) == clip("r" * (MESSAGE_CHARS + 1))
