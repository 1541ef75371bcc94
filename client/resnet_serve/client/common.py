"""What the sync and async clients share: results, errors carrying the gRPC code, channel options, retries,
stream ordering, readiness polling. The two clients differ only in how they wait (threads vs. asyncio)."""

from __future__ import annotations

import ipaddress
import itertools
import random
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from resnet_serve.protos import classifier_pb2 as pb

from .images import ImageLike, to_request

# Unary Classify is a pure function, so a retry is always safe. CANCELLED reaches a client only when the server
# (not the caller) ended the call, e.g. a connection closed while the server drains (grpc/grpc#41785).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class ClassifierError(Exception):
    """A request that failed, with the gRPC status code the server (or the channel) gave."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.request_id = code, message, request_id

    def __eq__(self, other: object) -> bool:  # so results lists from two clients compare equal
        return (isinstance(other, ClassifierError)
                and (self.code, self.message, self.request_id) == (other.code, other.message, other.request_id))

    def __hash__(self) -> int:
        return hash((self.code, self.message, self.request_id))


def error_of(e: grpc.RpcError, request_id: str = "") -> ClassifierError:
    """A transport error (sync grpc.RpcError or grpc.aio.AioRpcError) as a ClassifierError."""
    return ClassifierError(e.code(), e.details() or "", request_id)


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


def item_of(response: pb.ClassifyResponse) -> Result | ClassifierError:
    """A stream item: its Result, or its error as a value (a bad item does not end the stream)."""
    try:
        return result_of(response)
    except ClassifierError as e:
        return e


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _code(value: int) -> grpc.StatusCode:
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach the server: TLS material, per-call metadata (e.g. a bearer token), load balancing."""

    root_certificates: Path | None = None  # CA bundle: enables TLS
    client_certificate: Path | None = None  # mTLS (with client_key)
    client_key: Path | None = None
    metadata: Sequence[tuple[str, str]] = ()
    max_message_bytes: int = 16 * 1024 * 1024
    load_balancing: str = "round_robin"  # spreads calls over every address a target resolves to
    extra: Sequence[tuple[str, object]] = field(default_factory=tuple)
    tls: bool = False  # TLS with the system's roots even without root_certificates
    server_name: str | None = None  # TLS name to check when the target is an IP address or a list
    # gRPC's own reconnect backoff starts at 1 s and grows to 120 s, which would make our retries fail fast
    # for minutes after a server restart; a client that retries wants it short.
    reconnect_backoff_ms: tuple[int, int] = (100, 2000)

    @property
    def secure(self) -> bool:
        return bool(self.tls or self.root_certificates or self.client_certificate or self.client_key)

    def grpc_options(self) -> list[tuple[str, object]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.lb_policy_name", self.load_balancing),
            ("grpc.initial_reconnect_backoff_ms", self.reconnect_backoff_ms[0]),
            ("grpc.min_reconnect_backoff_ms", self.reconnect_backoff_ms[0]),
            ("grpc.max_reconnect_backoff_ms", self.reconnect_backoff_ms[1])]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return [*opts, *self.extra]

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None for plaintext. A client certificate without its key (or the reverse) is a ValueError, not a
        silent fall-back to plaintext."""
        if not self.secure:
            return None
        if bool(self.client_certificate) != bool(self.client_key):
            raise ValueError("mTLS needs both a client certificate and its key")
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.root_certificates), read(self.client_key),
                                            read(self.client_certificate))


def open_channel(api: Any, target: str, options: ChannelOptions) -> Any:
    """`api` is the grpc module or grpc.aio: both spell channel creation the same way."""
    creds = options.credentials()
    opts = options.grpc_options()
    return api.secure_channel(target, creds, opts) if creds else api.insecure_channel(target, opts)


def target_string(target: str | Sequence[str]) -> str:
    """host:port and dns:///host:port are used as they are; a list of addresses (or a comma-separated string)
    becomes an ipv4:/ipv6: target that gRPC balances over, host names resolved once here."""
    if isinstance(target, str):
        if "," not in target or "://" in target or target.startswith(("ipv4:", "ipv6:")):
            return target
        target = [t.strip() for t in target.split(",") if t.strip()]
    addrs = [_ip_address(a) for a in target]
    if not addrs:
        raise ValueError("no address in target")
    v6 = [a.startswith("[") for a in addrs]
    if any(v6) and not all(v6):
        raise ValueError(f"cannot mix IPv4 and IPv6 addresses in one target: {','.join(addrs)}")
    return f"{'ipv6' if all(v6) else 'ipv4'}:{','.join(addrs)}"


def _ip_address(addr: str) -> str:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {addr!r} must be host:port")
    bare = host.strip("[]")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.getaddrinfo(bare, int(port), proto=socket.IPPROTO_TCP)[0][4][0])
        except (OSError, UnicodeError) as e:
            raise ValueError(f"cannot resolve {bare!r}: {e}") from e
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


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

    def retry_after(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before the next attempt, or None to give up with this error."""
        if error.code() not in RETRYABLE:
            return None
        delay = next(self._backoffs, None)
        if delay is None or (self.deadline is not None and time.monotonic() + delay >= self.deadline):
            return None
        return delay


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


def default_id(image: object, index: int) -> str:
    """A stream item's id when the caller gives none: a file's path, else its position in the input."""
    return str(image) if isinstance(image, (str, Path)) else str(index)


class StreamOrder:
    """Stream answers may come out of order. On the wire an item's request_id is its index (short and unique
    whatever the caller's ids are); answers are handed back carrying the caller's id, in request order
    (ordered=True) or as they arrive."""

    def __init__(self, ordered: bool, ids: Iterable[str] | None = None):
        self.ordered = ordered
        self._ids = None if ids is None else iter(ids)
        self.names: dict[int, str] = {}  # index -> caller's id; written by the sender before the item is sent
        self.pending: dict[int, Result | ClassifierError] = {}
        self.next_out = 0

    def request(self, index: int, image: ImageLike, top_k: int) -> pb.ClassifyRequest:
        """The index-th item as a request, noting the id its answer will carry."""
        if self._ids is None:
            name = default_id(image, index)
        else:
            name = next(self._ids, None)
            if name is None:
                raise ValueError(f"fewer request ids than images (none for image {index})")
        request = to_request(image, top_k, str(index))
        self.names[index] = str(name)
        return request

    def add(self, response: pb.ClassifyResponse) -> list[Result | ClassifierError]:
        try:
            index = int(response.request_id)
        except ValueError:  # not an id this client sent (a server that does not echo ids): as it is
            return [item_of(response)]
        item = with_id(item_of(response), self.names.pop(index, response.request_id))
        if not self.ordered:
            return [item]
        self.pending[index] = item
        ready = []
        while self.next_out in self.pending:
            ready.append(self.pending.pop(self.next_out))
            self.next_out += 1
        return ready


def with_id(item: Result | ClassifierError, request_id: str) -> Result | ClassifierError:
    if isinstance(item, Result):
        return replace(item, request_id=request_id)
    item.request_id = request_id
    return item


class ClientBase:
    """Settings and per-call details common to ClassifierClient and AsyncClassifierClient."""

    def __init__(self, target: str | Sequence[str], options: ChannelOptions | None = None,
                 retry: RetryPolicy | None = None, timeout: float | None = 30.0):
        self.options = options or ChannelOptions()
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.target = target_string(target)
        self._ids = itertools.count()

    def _metadata(self, metadata: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
        return [*self.options.metadata, *(metadata or ())]

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _next_id(self) -> str:
        return str(next(self._ids))


def info_dict(info: pb.ModelInfo) -> dict:
    return {"name": info.name, "version": info.version, "architecture": info.architecture,
            "input_shape": list(info.input_shape), "num_classes": info.num_classes, "precision": info.precision,
            "max_batch_size": info.max_batch_size, "device": info.device, "engine": info.engine,
            "mean": [round(x, 6) for x in info.mean], "std": [round(x, 6) for x in info.std],
            "labels": list(info.labels), "preprocessing": preprocessing_dict(info.preprocessing)}


def preprocessing_dict(p: pb.Preprocessing) -> dict:
    return {"resize": p.resize, "input_size": list(p.input_size), "color": p.color, "scale": round(p.scale, 8),
            "mean": [round(x, 6) for x in p.mean], "std": [round(x, 6) for x in p.std], "layout": p.layout,
            "formats": list(p.formats)}


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns for the CLI's tables (first row: the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
