"""Retrying unary calls: RetryPolicy (jittered exponential backoff) and Attempts, one call's retry budget inside
one overall deadline."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from .errors import ClassifierError

# Unary Classify is a pure function, so a retry is always safe. CANCELLED reaches a client only when the server
# (not the caller) ended the call, e.g. a connection closed while the server drains (grpc/grpc#41785).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
MIN_ATTEMPT_S = 1e-5  # no call is answered within 10 us, loopback included: with less left, none is started


@dataclass(frozen=True)
class RetryPolicy:
    """Unary calls only (a stream may have been half-processed): retry UNAVAILABLE with jittered backoff."""

    attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoffs(self) -> Iterator[float]:
        delay = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield random.uniform(0.5, 1.0) * delay
            delay = min(self.max_backoff_s, delay * self.multiplier)


class Attempts:
    """One unary call's retry budget: the policy's backoffs, all attempts inside one overall deadline (a
    caller's timeout means 'answer within this', not 'per attempt')."""

    def __init__(self, policy: RetryPolicy, timeout: float | None):
        self._backoffs = policy.backoffs()
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def next_timeout(self, request_id: str = "") -> float | None:
        """The timeout of the next attempt; DEADLINE_EXCEEDED, without a call, once less than MIN_ATTEMPT_S is left.
        Why: a call started past its deadline races gRPC's own deadline timer, and on a loaded machine the
        server's answer can win (a 1 us timeout returned OK once in a loaded test run)."""
        left = self.remaining()
        if left is not None and left < MIN_ATTEMPT_S:
            raise ClassifierError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", request_id)
        return left

    def retry_after(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before the next attempt, or None to give up with this error."""
        if error.code() not in RETRYABLE:
            return None
        delay = next(self._backoffs, None)
        if delay is None or (self.deadline is not None and time.monotonic() + delay >= self.deadline):
            return None
        return delay
