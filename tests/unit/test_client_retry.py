"""client retry: jittered exponential backoff, retrying only UNAVAILABLE and CANCELLED, every attempt inside one
overall deadline (client/resnet_serve/client/retry.py)."""

from __future__ import annotations

import grpc
import pytest

from resnet_serve.client.errors import ClassifierError
from resnet_serve.client.retry import MIN_ATTEMPT_S, RETRYABLE, Attempts, RetryPolicy


def aio_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


def test_the_backoffs_are_one_fewer_than_the_attempts_jittered_growing_and_capped() -> None:
    policy = RetryPolicy(attempts=6, initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2.0)
    for _ in range(50):  # the jitter is random: the bounds hold for every draw
        delays = list(policy.backoffs())
        assert len(delays) == 5
        for delay, ceiling in zip(delays, [0.1, 0.2, 0.3, 0.3, 0.3], strict=True):
            assert 0.5 * ceiling <= delay <= ceiling


def test_one_attempt_means_no_retry() -> None:
    assert list(RetryPolicy(attempts=1).backoffs()) == []
    assert Attempts(RetryPolicy(attempts=1), None).retry_after(aio_error(grpc.StatusCode.UNAVAILABLE)) is None


def test_the_default_policy_retries_three_times() -> None:
    attempts = Attempts(RetryPolicy(), None)
    delays = [attempts.retry_after(aio_error(grpc.StatusCode.UNAVAILABLE)) for _ in range(4)]
    assert [d is not None for d in delays] == [True, True, True, False]


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c not in RETRYABLE])
def test_only_unavailable_and_cancelled_are_retried(code: grpc.StatusCode) -> None:
    attempts = Attempts(RetryPolicy(attempts=2), None)
    assert attempts.retry_after(aio_error(code)) is None
    # a refusal spends no backoff: the one retry is still there for an UNAVAILABLE
    assert attempts.retry_after(aio_error(grpc.StatusCode.UNAVAILABLE)) is not None


def test_cancelled_by_the_server_is_retried_like_unavailable() -> None:
    assert set(RETRYABLE) == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    attempts = Attempts(RetryPolicy(attempts=3), None)
    assert attempts.retry_after(aio_error(grpc.StatusCode.CANCELLED)) is not None


def test_without_a_timeout_nothing_remains_to_count() -> None:
    attempts = Attempts(RetryPolicy(), None)
    assert attempts.deadline is None and attempts.remaining() is None


def test_a_spent_deadline_leaves_zero_and_no_retry() -> None:
    attempts = Attempts(RetryPolicy(attempts=5), 0.0)
    assert attempts.remaining() == 0.0
    assert attempts.retry_after(aio_error(grpc.StatusCode.UNAVAILABLE)) is None


def test_a_backoff_that_would_end_past_the_deadline_gives_up() -> None:
    # The first backoff is at least 0.5 * 1000 s: past a one-minute deadline.
    attempts = Attempts(RetryPolicy(attempts=5, initial_backoff_s=1000.0, max_backoff_s=1000.0), 60.0)
    assert 0.0 < attempts.remaining() <= 60.0
    assert attempts.retry_after(aio_error(grpc.StatusCode.UNAVAILABLE)) is None
    roomy = Attempts(RetryPolicy(attempts=5, initial_backoff_s=0.001), 3600.0)
    assert roomy.retry_after(aio_error(grpc.StatusCode.UNAVAILABLE)) <= 0.001


def test_an_attempt_past_the_deadline_is_deadline_exceeded_without_a_call() -> None:
    """A call started past its deadline races gRPC's deadline timer, and a loaded machine once let the server's
    answer win (a 1 us timeout returned OK): past the deadline no attempt is made."""
    for timeout in (0.0, 1e-6, MIN_ATTEMPT_S / 2):
        with pytest.raises(ClassifierError) as raised:
            Attempts(RetryPolicy(), timeout).next_timeout("7")
        assert raised.value == ClassifierError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "7")
    assert 0.0 < Attempts(RetryPolicy(), 60.0).next_timeout() <= 60.0
    assert Attempts(RetryPolicy(), None).next_timeout() is None
