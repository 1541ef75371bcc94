"""What the sync and async clients share: results, errors carrying the gRPC code, channel options, retries."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from resnet_serve.protos import classifier_pb2 as pb

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class ClassifierError(Exception):
    """A request that failed, with the gRPC status code the server (or the channel) gave."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


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
        raise ClassifierError(_code(response.error.code), response.error.message, response.request_id)
    return Result(response.request_id,
                  [Prediction(p.class_id, p.label, p.score) for p in response.predictions], response.model_version)


def _code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach the server: TLS material, per-call metadata (e.g. a bearer token), load balancing."""

    root_certificates: Path | None = None  # CA bundle: enables TLS
    client_certificate: Path | None = None  # mTLS
    client_key: Path | None = None
    metadata: Sequence[tuple[str, str]] = ()
    max_message_bytes: int = 16 * 1024 * 1024
    load_balancing: str = "round_robin"  # spreads calls over every address a target resolves to
    extra: Sequence[tuple[str, object]] = field(default_factory=tuple)

    def grpc_options(self) -> list[tuple[str, object]]:
        return [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.lb_policy_name", self.load_balancing), *self.extra]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.root_certificates is None:
            return None
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.root_certificates), read(self.client_key),
                                            read(self.client_certificate))


@dataclass(frozen=True)
class RetryPolicy:
    """Unary calls only (a stream may have been half-processed): retry UNAVAILABLE with jittered backoff."""

    attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoffs(self):
        delay = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield random.uniform(0.5, 1.0) * delay
            delay = min(self.max_backoff_s, delay * self.multiplier)


def info_dict(info: pb.ModelInfo) -> dict:
    return {"name": info.name, "version": info.version, "architecture": info.architecture,
            "input_shape": list(info.input_shape), "num_classes": info.num_classes, "precision": info.precision,
            "max_batch_size": info.max_batch_size, "device": info.device, "engine": info.engine,
            "mean": [round(x, 6) for x in info.mean], "std": [round(x, 6) for x in info.std]}
