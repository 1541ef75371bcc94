"""Waiting for a server to become ready: polling grpc.health.v1 until SERVING, within a timeout."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2

from .errors import ClassifierError


class ReadyWait:
    """Polling health until SERVING (gRPC cannot push 'model loaded' to a client that is not connected yet)."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.delay = 0.05
        self.last = "UNKNOWN"

    def probe_timeout(self) -> float:
        return max(0.01, min(5.0, self.deadline - time.monotonic()))

    def next_delay(self) -> float | None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        delay, self.delay = min(self.delay, left), min(1.0, self.delay * 2)
        return delay

    def error(self) -> ClassifierError:
        return ClassifierError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"server not ready after {self.timeout} s ({self.last})")


def health_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
