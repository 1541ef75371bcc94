"""Requests as bytes, before protobuf, for every method (a grpc.aio server interceptor).

grpc.aio parses each request on the event loop, and a parse costs per element: a 15 MB `Tensor.shape` of 15M
dimensions takes ~0.2 s and 120 MB before any handler could check its rank. So the image methods' messages are
first walked at the top of their structure (a few fields, each skipped by its length, never element by element)
and refused unparsed when a repeated field is far beyond what any valid request holds. Bytes that are not the
method's protobuf at all answer INVALID_ARGUMENT (instead of grpc's UNKNOWN with a traceback in the log per
request), with at most one log line per LOG_EVERY_S seconds.

The four image methods get a `Malformed` in place of the request and answer it themselves (counted, and
in-stream for a stream item: the stream goes on); every other method's call is aborted here.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0
# Packed numeric typed contents (OIP InferTensorContents) above this are refused unparsed: a parse costs per
# element on the event loop. Large tensors go in raw_input_contents (what tritonclient sends), parsed as one blob.
MAX_TYPED_CONTENTS_BYTES = 4 * 1024 * 1024
INFER_REQUEST_FIELDS = 64  # top-level fields of a ModelInferRequest: parameters, inputs and outputs
MAX_CONTENTS_ELEMENTS = 1024  # bytes_contents: one encoded image per element, at most max_batch_size of them
# An image request this large needs the preprocess threads (it is an encoded image or a tensor to resize): when
# they are full it is refused before its parse and copies (~10 ms of event loop for 8 MB).
EARLY_REFUSAL_BYTES = 1024 * 1024


class Malformed:
    """Stands in for a request that cannot be used; `reason` says why. Carries the fields the services echo in
    an answer, empty (the client's own values are unknown)."""

    request_id = id = model_name = model_version = ""

    def __init__(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        self.reason, self.code = reason, code


class _OverLimit(Exception):
    pass


# --- the wire format, just enough to count -----------------------------------------------------------------
def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


def _fields(buf: memoryview, limit: int, what: str) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field of one message level; a length-delimited field's
    start..end is its payload. Raises _OverLimit past `limit` fields, ValueError when the bytes are malformed."""
    out, i = [], 0
    while i < len(buf):
        if len(out) == limit:
            raise _OverLimit(f"{what} has more than {limit} fields")
        key, i = _varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, end = _varint(buf, i)
        elif wire_type == 1:
            end = i + 8
        elif wire_type == 5:
            end = i + 4
        elif wire_type == 2:
            n, i = _varint(buf, i)
            end = i + n
        else:
            raise ValueError("unsupported wire type")
        if end > len(buf):
            raise ValueError("field runs past the end")
        out.append((number, wire_type, i, end))
        i = end
    return out


def split_field(raw: bytes, number: int, limit: int) -> tuple[bytes, list[memoryview]]:
    """The top-level length-delimited fields ``number`` of a message, as views of ``raw`` (no copy), and the
    message without them (the other fields' bytes, in order; ``raw`` itself when it has none). ValueError when the
    bytes are not a protobuf message, _OverLimit past ``limit`` top-level fields. Why: a parser copies a bytes
    field when it parses it, and Python copies it again when it reads it; taken from the view, an image is
    copied once, into the engine's memory."""
    buf = memoryview(raw)
    payloads: list[memoryview] = []
    kept: list[memoryview] = []
    key_start = 0  # the fields tile the message: each one's key starts where the previous one ends
    for field, wire_type, start, end in _fields(buf, limit, "message"):
        if field == number and wire_type == 2:
            payloads.append(buf[start:end])
        else:
            kept.append(buf[key_start:end])
        key_start = end
    return (raw if not payloads else b"".join(kept)), payloads


def check_classify_request(buf: memoryview) -> None:
    """classifier.v1.ClassifyRequest: field 2 is the Tensor, whose field 2 is the packed shape."""
    for number, wire_type, start, end in _fields(buf, 16, "request"):
        if number == 2 and wire_type == 2:
            for n, w, s, e in _fields(buf[start:end], 16, "tensor"):
                if n == 2 and w == 2 and e - s > 30:  # 3 dimensions take at most 30 bytes
                    raise _OverLimit("tensor shape must have 3 dimensions ([H, W, 3] UINT8 or [3, H, W] FLOAT32), "
                                     f"got about {e - s} or more")


def check_infer_request(buf: memoryview) -> None:
    """inference.ModelInferRequest: field 5 is an input tensor (3: packed shape, 5: contents)."""
    for number, wire_type, start, end in _fields(buf, INFER_REQUEST_FIELDS, "request (parameters, inputs, outputs)"):
        if number != 5 or wire_type != 2:
            continue
        tensor = buf[start:end]
        for n, w, s, e in _fields(tensor, 64, "input tensor"):
            if n == 3 and w == 2 and e - s > 40:  # 4 dimensions take at most 40 bytes
                raise _OverLimit(f"input shape must have 4 dimensions ([N, ...]), got about {e - s} or more")
            if n == 5 and w == 2:
                for cn, _, cs, ce in _fields(tensor[s:e], MAX_CONTENTS_ELEMENTS, "typed contents"):
                    if cn != 8 and ce - cs > MAX_TYPED_CONTENTS_BYTES:
                        raise _OverLimit(f"typed contents of {ce - cs} bytes exceed {MAX_TYPED_CONTENTS_BYTES}; "
                                         "send large tensors in raw_input_contents")


CHECKS: dict[str, Callable[[memoryview], None]] = {
    "/classifier.v1.Classifier/Classify": check_classify_request,
    "/classifier.v1.Classifier/ClassifyStream": check_classify_request,
    "/inference.GRPCInferenceService/ModelInfer": check_infer_request,
    "/inference.GRPCInferenceService/ModelStreamInfer": check_infer_request,
}


# --- the interceptor -----------------------------------------------------------------------------------------
class _RateLimitedLog:
    """At most one warning per LOG_EVERY_S; the next one says how many were left out."""

    def __init__(self):
        self.last, self.suppressed = -LOG_EVERY_S, 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < LOG_EVERY_S:
            self.suppressed += 1
            return
        extra = f" ({self.suppressed} more like it not logged)" if self.suppressed else ""
        self.last, self.suppressed = now, 0
        log.warning("%s%s", message, extra)


def _safe(deserialize: Callable[[bytes], object], method: str, limits: _RateLimitedLog,
          on_received: Callable[[int], None], admits: Callable[[int], bool]) -> Callable[[bytes], object]:
    check = CHECKS.get(method)
    name = method.rsplit("/", 1)[-1]

    def parse(raw: bytes) -> object:
        on_received(len(raw))
        if check is not None and len(raw) >= EARLY_REFUSAL_BYTES and not admits(len(raw)):
            return Malformed("server is busy preprocessing images, retry later", grpc.StatusCode.RESOURCE_EXHAUSTED)
        if check is not None:
            try:
                check(memoryview(raw))
            except _OverLimit as e:
                return Malformed(str(e))
            except ValueError:
                pass  # not protobuf: the parser below says so
        try:
            return deserialize(raw)
        except Exception as e:  # DecodeError, or anything a deserializer raises on garbage
            limits.warning(f"{method}: a request of {len(raw)} bytes is not a valid protobuf message ({e})")
            return Malformed(f"request to {name} is not a valid protobuf message of the method's type")

    return parse


def _guarded(handler: grpc.RpcMethodHandler, deserialize: Callable[[bytes], object]) -> grpc.RpcMethodHandler:
    """The same handler, aborting with INVALID_ARGUMENT when a request is Malformed."""
    kw = {"request_deserializer": deserialize, "response_serializer": handler.response_serializer}

    async def reject(request, context) -> None:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)

    async def checked(requests: AsyncIterator, context) -> AsyncIterator:
        async for request in requests:
            await reject(request, context)
            yield request

    if handler.unary_unary:
        async def unary_unary(request, context):
            await reject(request, context)
            return await handler.unary_unary(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream:
        async def unary_stream(request, context):
            await reject(request, context)
            result = handler.unary_stream(request, context)  # an async generator, or a coroutine that writes
            if inspect.isasyncgen(result):
                async for response in result:
                    await context.write(response)
            else:
                await result
        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary:
        async def stream_unary(requests, context):
            return await handler.stream_unary(checked(requests, context), context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)

    async def stream_stream(requests, context):
        result = handler.stream_stream(checked(requests, context), context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:
            await result
    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


class RequestGuard(grpc.aio.ServerInterceptor):
    """Puts `_safe` in front of every method's deserializer; see the module docstring. `on_received` is told
    the size of every request; `admits(size)` says whether the preprocess stage has room for a large one."""

    def __init__(self, on_received: Callable[[int], None] = lambda n: None,
                 admits: Callable[[int], bool] = lambda n: True,
                 parsers: Mapping[str, Callable[[bytes], object]] | None = None):
        """`parsers`: a method's own request parser, in place of its protobuf deserializer."""
        self._log = _RateLimitedLog()
        self._on_received, self._admits = on_received, admits
        self._parsers = dict(parsers or {})

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        deserialize = _safe(self._parsers.get(method, handler.request_deserializer), method, self._log,
                            self._on_received, self._admits)
        if method in CHECKS:  # the image methods answer a Malformed themselves
            return handler._replace(request_deserializer=deserialize)
        return _guarded(handler, deserialize)
