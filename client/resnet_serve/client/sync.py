"""ClassifierClient: the blocking Python client for classifier.v1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc

from .base import ClientBase
from .channel import ChannelOptions, open_channel, target_string
from .errors import ClassifierError, error_of
from .images import ImageLike, to_request
from .readiness import ReadyWait, health_status
from .results import Result, result_of
from .retry import Attempts, RetryPolicy
from .streams import StreamOrder

__all__ = ["ClassifierClient", "ClassifierError", "ChannelOptions", "RetryPolicy", "Result", "target_string"]


class ClassifierClient(ClientBase):
    """`target` is host:port, dns:///host:port, or a list of addresses (round-robin across them)."""

    def __init__(self, target: str | Sequence[str], options: ChannelOptions | None = None,
                 retry: RetryPolicy | None = None, timeout: float | None = 30.0):
        super().__init__(target, options, retry, timeout)
        self.channel = open_channel(grpc, self.target, self.options)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method, request, timeout: float | None, metadata: Sequence[tuple[str, str]] | None,
               request_id: str = ""):
        """One unary call, retried with backoff while the server answers UNAVAILABLE, within one deadline."""
        attempts = Attempts(self.retry, self.call_timeout(timeout))
        while True:
            try:
                return method(request, timeout=attempts.next_timeout(request_id),
                                metadata=self.call_metadata(metadata))
            except grpc.RpcError as e:
                delay = attempts.retry_after(e)
                if delay is None:
                    raise error_of(e, request_id) from e
                time.sleep(delay)

    def classify(self, image: ImageLike, top_k: int = 0, timeout: float | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None) -> Result:
        """One image; retried with backoff while the server answers UNAVAILABLE."""
        request = to_request(image, top_k, self.next_request_id())
        return result_of(self._unary(self.stub.Classify, request, timeout, metadata, request.request_id))

    def classify_many(self, images: Iterable[ImageLike], top_k: int = 0, window: int = 32,
                      timeout: float | None = None, metadata: Sequence[tuple[str, str]] | None = None,
                      ids: Iterable[str] | None = None) -> list[Result | ClassifierError]:
        """Many images over one stream, at most `window` unanswered at a time; results in input order, a failed
        item as a ClassifierError in its place."""
        return list(self.stream(images, top_k, window, timeout, metadata, ordered=True, ids=ids))

    def stream(self, images: Iterable[ImageLike], top_k: int = 0, window: int = 32, timeout: float | None = None,
               metadata: Sequence[tuple[str, str]] | None = None, ordered: bool = False,
               ids: Iterable[str] | None = None) -> Iterator[Result | ClassifierError]:
        """Like classify_many, but yields each answer as it arrives (ordered=False: arrival order). Each answer's
        request_id is the caller's id from `ids` (one per image), by default the path of a file or the index of
        anything else. Streams are not retried. An image that cannot be turned into a request raises its
        ValueError/TypeError/OSError here."""
        if window < 1:
            raise ValueError("window must be at least 1")
        slots = threading.Semaphore(window)
        stop = threading.Event()
        failure: list[BaseException] = []
        calls: list[grpc.Future] = []  # the sending thread may start before `call` is bound below
        order = StreamOrder(ordered, ids)

        def requests() -> Iterator[pb.ClassifyRequest]:
            """Runs in gRPC's sending thread: one request per free window slot."""
            try:
                for i, image in enumerate(images):
                    slots.acquire()
                    if stop.is_set():
                        return
                    yield order.request(i, image, top_k)
            except Exception as e:  # bad input: end the call and raise it in the caller's thread
                failure.append(e)
                if calls:
                    calls[0].cancel()

        call = self.stub.ClassifyStream(requests(), timeout=timeout, metadata=self.call_metadata(metadata))
        calls.append(call)
        try:
            for response in call:
                slots.release()
                yield from order.add(response)
        except grpc.RpcError as e:
            if failure:
                raise failure[0] from None
            raise error_of(e) from e
        finally:
            stop.set()
            slots.release(window + 1)  # wakes the sending thread if it waits for a slot
            call.cancel()
        if failure:
            raise failure[0]

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout, None)

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING / NOT_SERVING / UNKNOWN / SERVICE_UNKNOWN, or raises ClassifierError (e.g. UNAVAILABLE).
        Not retried: a probe reports what it sees."""
        try:
            return health_status(self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout, metadata=self.call_metadata(None)))
        except grpc.RpcError as e:
            raise error_of(e) from e

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Block until health says SERVING (the model is loaded and warm); ClassifierError on timeout."""
        wait = ReadyWait(timeout)
        while True:
            try:
                wait.last = self.health(timeout=wait.probe_timeout())
                if wait.last == "SERVING":
                    return
            except ClassifierError as e:
                wait.last = e.code.name
            delay = wait.next_delay()
            if delay is None:
                raise wait.error()
            time.sleep(delay)
