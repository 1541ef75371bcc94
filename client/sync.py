"""ClassifierClient: the blocking Python client for classifier.v1."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc

from .common import RETRYABLE, ChannelOptions, ClassifierError, Result, RetryPolicy, result_of
from .images import ImageLike, to_request


class ClassifierClient:
    """`target` is host:port, dns:///host:port, or a list of addresses (round-robin across them)."""

    def __init__(self, target: str | Sequence[str], options: ChannelOptions | None = None,
                 retry: RetryPolicy | None = None, timeout: float | None = 30.0):
        self.options = options or ChannelOptions()
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.target = target_string(target)
        creds = self.options.credentials()
        opts = self.options.grpc_options()
        self.channel = (grpc.secure_channel(self.target, creds, opts) if creds
                        else grpc.insecure_channel(self.target, opts))
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self._ids = itertools.count()

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _metadata(self, metadata: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
        return [*self.options.metadata, *(metadata or ())]

    def classify(self, image: ImageLike, top_k: int = 0, timeout: float | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None) -> Result:
        """One image; retried with backoff while the server answers UNAVAILABLE."""
        request = to_request(image, top_k, str(next(self._ids)))
        backoffs = self.retry.backoffs()
        while True:
            try:
                return result_of(self.stub.Classify(request, timeout=timeout or self.timeout,
                                                    metadata=self._metadata(metadata)))
            except grpc.RpcError as e:
                if e.code() in RETRYABLE:
                    delay = next(backoffs, None)
                    if delay is not None:
                        time.sleep(delay)
                        continue
                raise ClassifierError(e.code(), e.details() or "", request.request_id) from e

    def classify_many(self, images: Iterable[ImageLike], top_k: int = 0, window: int = 32,
                      timeout: float | None = None, metadata: Sequence[tuple[str, str]] | None = None,
                      ) -> list[Result | ClassifierError]:
        """Many images over one stream, at most `window` unanswered at a time; results in input order, a failed
        item as a ClassifierError in its place."""
        return list(self.stream(images, top_k, window, timeout, metadata, ordered=True))

    def stream(self, images: Iterable[ImageLike], top_k: int = 0, window: int = 32, timeout: float | None = None,
               metadata: Sequence[tuple[str, str]] | None = None, ordered: bool = False,
               ) -> Iterator[Result | ClassifierError]:
        """Like classify_many, but yields each answer as it arrives (ordered=False: arrival order)."""
        slots = threading.Semaphore(window)
        stop = threading.Event()
        sent: list[str] = []

        def requests() -> Iterator[pb.ClassifyRequest]:
            for i, image in enumerate(images):
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                sent.append(str(i))
                yield to_request(image, top_k, str(i))

        call = self.stub.ClassifyStream(requests(), timeout=timeout, metadata=self._metadata(metadata))
        pending: dict[int, Result | ClassifierError] = {}
        next_out = 0
        try:
            for response in call:
                slots.release()
                try:
                    item: Result | ClassifierError = result_of(response)
                except ClassifierError as e:
                    item = e
                if not ordered:
                    yield item
                    continue
                pending[int(response.request_id)] = item
                while next_out in pending:
                    yield pending.pop(next_out)
                    next_out += 1
        except grpc.RpcError as e:
            raise ClassifierError(e.code(), e.details() or "") from e
        finally:
            stop.set()
            call.cancel()

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        try:
            return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout or self.timeout,
                                          metadata=self._metadata(None))
        except grpc.RpcError as e:
            raise ClassifierError(e.code(), e.details() or "") from e

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING / NOT_SERVING / UNKNOWN / SERVICE_UNKNOWN, or raises ClassifierError (e.g. UNAVAILABLE)."""
        try:
            r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                       metadata=self._metadata(None))
        except grpc.RpcError as e:
            raise ClassifierError(e.code(), e.details() or "") from e
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Block until health says SERVING (the model is loaded and warm); ClassifierError on timeout."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        last = "UNKNOWN"
        while time.monotonic() < deadline:
            try:
                last = self.health()
                if last == "SERVING":
                    return
            except ClassifierError as e:
                last = e.code.name
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(1.0, delay * 2)
        raise ClassifierError(grpc.StatusCode.DEADLINE_EXCEEDED, f"server not ready after {timeout} s ({last})")


def target_string(target: str | Sequence[str]) -> str:
    """A list of addresses becomes an ipv4:/ipv6: target that gRPC balances over; a string is used as is."""
    if isinstance(target, str):
        return target
    addrs = list(target)
    scheme = "ipv6" if all(a.startswith("[") for a in addrs) else "ipv4"
    return f"{scheme}:{','.join(a.replace('localhost', '127.0.0.1') for a in addrs)}"
