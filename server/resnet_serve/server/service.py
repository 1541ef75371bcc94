"""The gRPC transport: classifier.v1.Classifier. Turns messages into ServingHandle calls and its RequestErrors into
status codes; records per-request metrics through the handle. Knows protobuf, gRPC codes, metadata and deadlines;
nothing of Paddle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from resnet_serve.common.imaging import FORMATS
from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc

from .errors import NOT_LOADED, RequestError, cancel_code, check_request_id
from .handle import ServingHandle, call_deadline
from .pipeline import Answer, ImageInput, ModelDescription
from .preprocess import InvalidInput
from .streams import answer_each
from .wire import Malformed

# resnet_serve.common.imaging.decode/upright/to_rgb/resize_crop, as GetModelInfo states it.
RESIZE_RULE = ("EXIF orientation applied, transparency over white; the centre region with input_size's aspect "
               "ratio (shorter side kept) resized to input_size, bilinear (Pillow resize with box): a centre crop")


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


class ClassifierService(pb_grpc.ClassifierServicer):
    """classifier.v1.Classifier over a ServingHandle (the serving version is read at call time: hot reload works)."""

    def __init__(self, handle: ServingHandle):
        self.handle = handle

    # --- helpers -------------------------------------------------------------------------------------------
    async def _classify_one(self, request: pb.ClassifyRequest, deadline: float | None) -> Answer:
        """One request's answer; raises RequestError."""
        if isinstance(request, Malformed):
            raise RequestError(request.code, request.reason)
        check_request_id(request.request_id, self.handle.config.max_request_id_length)
        self.handle.require_model()  # UNAVAILABLE while loading, before the image is looked at
        try:
            image = image_of(request)
        except InvalidInput as e:
            raise self.handle.to_error(e) from e
        (answer,) = await self.handle.submit([image], request.top_k, deadline)
        return answer

    @staticmethod
    def _response(request_id: str, answer: Answer) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(
            request_id=request_id, model_version=answer.model_version,
            predictions=[pb.Prediction(class_id=p.class_id, label=p.label, score=p.score)
                         for p in answer.predictions])

    # --- RPCs ----------------------------------------------------------------------------------------------
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        t0 = time.perf_counter()
        try:
            answer = await self._classify_one(request, call_deadline(context.time_remaining()))
        except RequestError as e:
            self.handle.record("Classify", e.code, t0)
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            self.handle.record("Classify", cancel_code(context.time_remaining()), t0)
            raise
        self.handle.record("Classify", grpc.StatusCode.OK, t0, answer.model_version)
        return self._response(request.request_id, answer)

    async def ClassifyStream(self, request_iterator: AsyncIterator[pb.ClassifyRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyResponse]:
        """Items run concurrently (at most max_stream_in_flight); each answer goes out as soon as it is ready,
        an item's error as a response carrying it; the stream goes on."""
        deadline = call_deadline(context.time_remaining())
        id_limit = self.handle.config.max_request_id_length

        async def one(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
            t0 = time.perf_counter()
            version = None
            try:
                answer = await self._classify_one(request, deadline)
                response = self._response(request.request_id, answer)
                code, version = grpc.StatusCode.OK, answer.model_version
            except RequestError as e:
                code = e.code
                request_id = request.request_id  # not echoed when over the limit: the answer must fit
                response = pb.ClassifyResponse(request_id=request_id if len(request_id) <= id_limit else "",
                                               error=pb.Error(code=e.code.value[0], message=e.message))
            except asyncio.CancelledError:
                self.handle.record("ClassifyStream", cancel_code(context.time_remaining()), t0)
                raise
            self.handle.record("ClassifyStream", code, t0, version)
            return response

        async for response in answer_each(request_iterator, one, self.handle.config.max_stream_in_flight,
                                          self.handle.stream_items):
            yield response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        model, labels = self.handle.model, self.handle.labels
        if model is None:
            self.handle.record("GetModelInfo", grpc.StatusCode.UNAVAILABLE)
            await context.abort(grpc.StatusCode.UNAVAILABLE, NOT_LOADED)
        m = model
        self.handle.record("GetModelInfo", grpc.StatusCode.OK)
        return pb.ModelInfo(name=m.name, version=m.version, architecture=m.architecture, input_shape=m.input_shape,
                            num_classes=m.num_classes, precision=m.precision, max_batch_size=m.max_batch_size,
                            device=m.device, mean=m.mean, std=m.std, engine=m.engine, labels=labels,
                            preprocessing=preprocessing_of(m))
