"""The gRPC transport: classifier.v1.Classifier. Turns messages into pipeline calls and exceptions into precise
status codes; records per-request metrics. Knows protobuf, gRPC codes, metadata and deadlines; nothing of Paddle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import grpc

from resnet_serve.common.imaging import FORMATS
from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc

from .admission import PreprocessQueueFull
from .batcher import DeadlineExpired, QueueFull, ShuttingDown
from .metrics import Metrics
from .pipeline import Answer, ImageInput, ModelDescription, Pipeline
from .preprocess import InvalidInput
from .streams import answer_each
from .wire import Malformed

log = logging.getLogger(__name__)

BASE_ERROR_CODES: dict[type[BaseException], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}
# resnet_serve.common.imaging.decode/upright/to_rgb/resize_crop, as GetModelInfo states it.
RESIZE_RULE = ("EXIF orientation applied, transparency over white; the centre region with input_size's aspect "
               "ratio (shorter side kept) resized to input_size, bilinear (Pillow resize with box): a centre crop")
MESSAGES = {QueueFull: "server queue is full, retry later", DeadlineExpired: "deadline expired while queued",
            ShuttingDown: "server is shutting down",
            PreprocessQueueFull: "server is busy preprocessing images, retry later"}
# Error texts travel in the grpc-message header, which clients accept up to 8 KiB by default (percent-encoded):
# a client's own text is echoed at most ECHO_CHARS characters long, ASCII-escaped, and no message is longer
# than MESSAGE_CHARS.
ECHO_CHARS, MESSAGE_CHARS = 64, 1024
DEFAULT_MAX_REQUEST_ID_LENGTH = 1024


def echo(text: str) -> str:
    """A client's string quoted for an error message: ASCII only, at most ECHO_CHARS characters of it."""
    if len(text) <= ECHO_CHARS:
        return ascii(text)
    return f"{ascii(text[:ECHO_CHARS])}... ({len(text)} characters)"


def clip(message: str) -> str:
    return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS - 15] + "... (truncated)"


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The handler was cancelled: because the caller's deadline passed, or because the caller went away."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else \
        grpc.StatusCode.CANCELLED


class RequestError(Exception):
    """An answer that is an error: a status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        message = clip(message)
        super().__init__(message)
        self.code, self.message = code, message


def image_of(request: pb.ClassifyRequest) -> ImageInput:
    which = request.WhichOneof("image")
    if which == "encoded":
        return ImageInput("encoded", request.encoded)
    if which == "tensor":
        t = request.tensor
        kinds = {pb.Tensor.UINT8: "uint8", pb.Tensor.FLOAT32: "float32"}
        if t.dtype not in kinds:
            raise InvalidInput("tensor dtype must be UINT8 (HWC) or FLOAT32 (CHW)")
        if len(t.shape) != 3:  # checked before the shape is copied: a client can send millions of dimensions
            layout = "[H, W, 3]" if t.dtype == pb.Tensor.UINT8 else "[3, H, W]"
            raise InvalidInput(f"{kinds[t.dtype]} tensor shape must be {layout}, got {len(t.shape)} dimensions")
        return ImageInput(kinds[t.dtype], t.data, tuple(t.shape))
    raise InvalidInput("request carries no image (set `encoded` or `tensor`)")


def preprocessing_of(model: ModelDescription) -> pb.Preprocessing:
    """What preprocess.py and common/imaging.py do to an image, stated for clients (GetModelInfo)."""
    return pb.Preprocessing(resize=RESIZE_RULE, input_size=model.input_shape[1:], color="RGB", scale=1 / 255,
                            mean=model.mean, std=model.std, layout="NCHW", formats=FORMATS)


def check_request_id(request_id: str, limit: int) -> None:
    """Every answer echoes the id: bounding it keeps every answer within the message size clients accept."""
    if len(request_id) > limit:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request id is {len(request_id)} characters, over the limit of {limit}")


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, metrics: Metrics, error_codes: Mapping[type[BaseException], grpc.StatusCode] | None = None,
                 max_stream_in_flight: int = 128, max_request_id_length: int = DEFAULT_MAX_REQUEST_ID_LENGTH):
        self.metrics = metrics
        self.max_request_id_length = max_request_id_length
        self.pipeline: Pipeline | None = None  # set once the model is loaded and warm
        self.error_codes = {**BASE_ERROR_CODES, **(error_codes or {})}
        self.max_stream_in_flight = max_stream_in_flight
        self.on_info: Callable[[], pb.ModelInfo] | None = None

    # --- helpers -------------------------------------------------------------------------------------------
    def _to_error(self, exc: BaseException) -> RequestError:
        for cls in type(exc).__mro__:
            if cls in self.error_codes:
                msg = MESSAGES.get(type(exc)) or MESSAGES.get(cls) or str(exc) or cls.__name__
                return RequestError(self.error_codes[cls], msg)
        log.exception("unexpected error while classifying", exc_info=exc)
        return RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    async def _classify_one(self, request: pb.ClassifyRequest, deadline: float | None) -> Answer:
        pipeline = self.pipeline
        if isinstance(request, Malformed):
            raise RequestError(request.code, request.reason)
        check_request_id(request.request_id, self.max_request_id_length)
        if pipeline is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "model is loading, not serving yet")
        try:
            return await pipeline.classify(image_of(request), request.top_k, deadline)
        except (RequestError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise self._to_error(e) from e

    @staticmethod
    def _response(request_id: str, answer: Answer) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(
            request_id=request_id, model_version=answer.model_version,
            predictions=[pb.Prediction(class_id=p.class_id, label=p.label, score=p.score)
                         for p in answer.predictions])

    def _record(self, method: str, code: grpc.StatusCode, t0: float, version: str | None = None) -> None:
        self.metrics.record_request(method, code.name, time.perf_counter() - t0, version)

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    # --- RPCs ----------------------------------------------------------------------------------------------
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        t0 = time.perf_counter()
        try:
            answer = await self._classify_one(request, self._deadline(context))
        except RequestError as e:
            self._record("Classify", e.code, t0)
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            self._record("Classify", _cancel_code(context), t0)
            raise
        self._record("Classify", grpc.StatusCode.OK, t0, answer.model_version)
        return self._response(request.request_id, answer)

    async def ClassifyStream(self, request_iterator: AsyncIterator[pb.ClassifyRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyResponse]:
        """Items run concurrently (at most max_stream_in_flight); each answer goes out as soon as it is ready,
        an item's error as a response carrying it; the stream goes on."""
        deadline = self._deadline(context)

        async def handle(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
            t0 = time.perf_counter()
            version = None
            try:
                answer = await self._classify_one(request, deadline)
                response = self._response(request.request_id, answer)
                code, version = grpc.StatusCode.OK, answer.model_version
            except RequestError as e:
                code = e.code
                request_id = request.request_id  # not echoed when over the limit: the answer must fit
                response = pb.ClassifyResponse(
                    request_id=request_id if len(request_id) <= self.max_request_id_length else "",
                    error=pb.Error(code=e.code.value[0], message=e.message))
            except asyncio.CancelledError:
                self._record("ClassifyStream", _cancel_code(context), t0)
                raise
            self._record("ClassifyStream", code, t0, version)
            return response

        async for response in answer_each(request_iterator, handle, self.max_stream_in_flight,
                                             self.metrics.stream_items):
            yield response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        pipeline = self.pipeline
        if pipeline is None:
            self.metrics.record_request("GetModelInfo", "UNAVAILABLE", None)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is loading, not serving yet")
        m = pipeline.model
        self.metrics.record_request("GetModelInfo", "OK", None)
        return pb.ModelInfo(name=m.name, version=m.version, architecture=m.architecture, input_shape=m.input_shape,
                            num_classes=m.num_classes, precision=m.precision, max_batch_size=m.max_batch_size,
                            device=m.device, mean=m.mean, std=m.std, engine=m.engine, labels=pipeline.labels,
                            preprocessing=preprocessing_of(m))
