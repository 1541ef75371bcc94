"""AsyncClassifierClient: the asyncio (grpc.aio) client for classifier.v1, with the sync client's API."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc

from .base import ClientBase
from .channel import ChannelOptions, open_channel
from .errors import ClassifierError, error_of
from .images import ImageLike, to_request
from .readiness import ReadyWait, health_status
from .results import Result, result_of
from .retry import Attempts, RetryPolicy
from .streams import StreamOrder

__all__ = ["AsyncClassifierClient", "ClassifierError", "ChannelOptions", "RetryPolicy", "Result"]


async def _aiter(images: Iterable[ImageLike] | AsyncIterable[ImageLike]) -> AsyncIterator[ImageLike]:
    if isinstance(images, AsyncIterable):
        async for image in images:
            yield image
    else:
        for image in images:
            yield image


class AsyncClassifierClient(ClientBase):
    """`target` is host:port, dns:///host:port, or a list of addresses (round-robin across them). Create it
    inside the event loop that will use it (grpc.aio channels belong to one loop)."""

    def __init__(self, target: str | Sequence[str], options: ChannelOptions | None = None,
                 retry: RetryPolicy | None = None, timeout: float | None = 30.0):
        super().__init__(target, options, retry, timeout)
        self.channel: grpc.aio.Channel = open_channel(grpc.aio, self.target, self.options)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncClassifierClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, method, request, timeout: float | None, metadata: Sequence[tuple[str, str]] | None,
                     request_id: str = ""):
        """One unary call, retried with backoff while the server answers UNAVAILABLE, within one deadline."""
        attempts = Attempts(self.retry, self.call_timeout(timeout))
        while True:
            try:
                return await method(request, timeout=attempts.next_timeout(request_id),
                                      metadata=self.call_metadata(metadata))
            except grpc.aio.AioRpcError as e:
                delay = attempts.retry_after(e)
                if delay is None:
                    raise error_of(e, request_id) from e
                await asyncio.sleep(delay)

    async def classify(self, image: ImageLike, top_k: int = 0, timeout: float | None = None,
                       metadata: Sequence[tuple[str, str]] | None = None) -> Result:
        """One image; retried with backoff while the server answers UNAVAILABLE."""
        request = to_request(image, top_k, self.next_request_id())
        return result_of(await self._unary(self.stub.Classify, request, timeout, metadata, request.request_id))

    async def classify_many(self, images: Iterable[ImageLike] | AsyncIterable[ImageLike], top_k: int = 0,
                            window: int = 32, timeout: float | None = None,
                            metadata: Sequence[tuple[str, str]] | None = None,
                            ids: Iterable[str] | None = None) -> list[Result | ClassifierError]:
        """Many images over one stream, at most `window` unanswered at a time; results in input order, a failed
        item as a ClassifierError in its place."""
        return [item async for item in self.stream(images, top_k, window, timeout, metadata, ordered=True, ids=ids)]

    async def stream(self, images: Iterable[ImageLike] | AsyncIterable[ImageLike], top_k: int = 0,
                     window: int = 32, timeout: float | None = None,
                     metadata: Sequence[tuple[str, str]] | None = None, ordered: bool = False,
                     ids: Iterable[str] | None = None) -> AsyncIterator[Result | ClassifierError]:
        """Like classify_many, but yields each answer as it arrives (ordered=False: arrival order). Each answer's
        request_id is the caller's id from `ids` (one per image), by default the path of a file or the index of
        anything else. Streams are not retried. An image that cannot be turned into a request raises its
        ValueError/TypeError/OSError here."""
        if window < 1:
            raise ValueError("window must be at least 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        call = self.stub.ClassifyStream(timeout=timeout, metadata=self.call_metadata(metadata))
        slots = asyncio.Semaphore(window)
        order = StreamOrder(ordered, ids)

        async def write() -> None:
            i = 0
            async for image in _aiter(images):
                await slots.acquire()
                await call.write(order.request(i, image, top_k))
                i += 1
            await call.done_writing()

        def on_written(task: asyncio.Task) -> None:
            if not task.cancelled() and _input_error(task):
                call.cancel()  # bad input: end the call; the reader raises the input's exception

        writer = asyncio.create_task(write())
        writer.add_done_callback(on_written)
        try:
            while True:
                try:
                    response = await call.read()
                except asyncio.CancelledError:
                    if writer.done() and (error := _input_error(writer)):
                        raise error from None
                    raise
                except grpc.aio.AioRpcError as e:
                    raise stream_error(e, deadline) from e
                if response is grpc.aio.EOF:
                    break
                slots.release()
                for item in order.add(response):
                    yield item
            if writer.done() and (error := _input_error(writer)):
                raise error
        finally:
            writer.cancel()
            call.cancel()
            with contextlib.suppress(BaseException):
                await writer

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout, None)

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING / NOT_SERVING / UNKNOWN / SERVICE_UNKNOWN, or raises ClassifierError (e.g. UNAVAILABLE).
        Not retried: a probe reports what it sees."""
        try:
            return health_status(await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout, metadata=self.call_metadata(None)))
        except grpc.aio.AioRpcError as e:
            raise error_of(e) from e

    async def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Wait until health says SERVING (the model is loaded and warm); ClassifierError on timeout."""
        wait = ReadyWait(timeout)
        while True:
            try:
                wait.last = await self.health(timeout=wait.probe_timeout())
                if wait.last == "SERVING":
                    return
            except ClassifierError as e:
                wait.last = e.code.name
            delay = wait.next_delay()
            if delay is None:
                raise wait.error()
            await asyncio.sleep(delay)


def stream_error(e: grpc.aio.AioRpcError, deadline: float | None) -> ClassifierError:
    """grpc.aio's client ends a few percent of streams whose deadline passes while the call is being set up with
    INTERNAL "Internal error from Core" (its own batch failed; nothing came from the server; seen with a 1 us
    timeout, tests/integration/test_client.py): past the caller's deadline, that is the deadline."""
    if (e.code() == grpc.StatusCode.INTERNAL and e.details() == "Internal error from Core" and deadline is not None
            and time.monotonic() >= deadline):
        return ClassifierError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    return error_of(e)


def _input_error(writer: asyncio.Task) -> BaseException | None:
    """The writer's own failure (bad input), not a transport one (which the reader reports with its code)."""
    if writer.cancelled():
        return None
    error = writer.exception()
    if error is None or isinstance(error, (grpc.RpcError, asyncio.InvalidStateError)):
        return None
    return error
