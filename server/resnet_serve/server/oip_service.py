"""The Open Inference Protocol (KServe v2) transport: `inference.GRPCInferenceService`, so Triton and KServe
clients work unchanged. Served from the stubs the `tritonclient` package ships (no copied .proto).

It is a second front door to the same server, through the same ServingHandle as classifier.v1: every image goes
to the serving version (the same batcher queue and workers), errors map through the same table to the same gRPC
codes, and requests are counted in the same metrics under methods ModelInfer and ModelStreamInfer. The messages'
codecs are oip_codec.py; docs/oip.md lists the exact tensor names, dtypes and shapes. Knows protobuf, gRPC codes
and deadlines; nothing of Paddle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from importlib import metadata

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from .errors import RequestError, cancel_code, check_request_id
from .handle import ServingHandle, call_deadline
from .oip_codec import (
    EXTENSIONS,
    InferRequest,
    check_model,
    deadline_of,
    images_of,
    model_config_of,
    model_metadata_of,
    parse_infer_request,
    requested_outputs,
    response_of,
    stream_error_of,
    top_k_of,
    with_id,
)
from .pipeline import ModelDescription
from .streams import answer_each
from .wire import Malformed

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
add_oip_service = pb_grpc.add_GRPCInferenceServiceServicer_to_server  # tritonclient's registration function
# The image methods' requests, parsed with their pixels left in the received bytes (wire.RequestGuard's parsers).
OIP_PARSERS = {f"/{SERVICE_NAME}/{method}": parse_infer_request for method in ("ModelInfer", "ModelStreamInfer")}


class OIPService(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over a ServingHandle (the serving version is read at call time: hot reload
    works). RPCs not implemented here (repository load/unload, shared memory, trace, logging) answer
    UNIMPLEMENTED."""

    SERVICE_NAME = SERVICE_NAME

    def __init__(self, handle: ServingHandle):
        self.handle = handle

    # --- helpers -------------------------------------------------------------------------------------------
    async def _model(self, context: grpc.aio.ServicerContext, name: str, version: str) -> ModelDescription:
        """The served model if the request names it; aborts with UNAVAILABLE or NOT_FOUND otherwise."""
        try:
            model = self.handle.require_model()
            check_model(name, version, model)
        except RequestError as e:
            await context.abort(e.code, e.message)
        return model

    async def _infer(self, request: InferRequest | pb.ModelInferRequest | Malformed,
                     deadline: float | None) -> pb.ModelInferResponse:
        """One ModelInferRequest (as parse_infer_request gives it, behind wire.RequestGuard): its N images go to
        the batcher as N items; raises RequestError."""
        if isinstance(request, Malformed):
            raise RequestError(request.code, request.reason)
        call = InferRequest.of(request)
        message = call.message
        check_request_id(message.id, self.handle.config.max_request_id_length)
        # No await from here to submit(): the request is checked against the version that answers it.
        model = self.handle.require_model()
        try:
            check_model(message.model_name, message.model_version, model)
            images = images_of(call, model.max_batch_size)
            k, outputs = top_k_of(message), requested_outputs(message)
            deadline = deadline_of(message, deadline)
        except RequestError:
            raise
        except Exception as e:
            raise self.handle.to_error(e) from e
        answers = await self.handle.submit(images, k, deadline)
        return response_of(message, model.name, answers, outputs)

    # --- health and metadata -------------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.handle.ready())  # exactly what grpc.health.v1 reports

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        model = self.handle.model
        known = model is not None and request.name == model.name and request.version in ("", model.version)
        return pb.ModelReadyResponse(ready=known and self.handle.ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        try:
            version = metadata.version("resnet-serve")
        except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
            version = "unknown"
        return pb.ServerMetadataResponse(name="resnet-serve", version=version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        return model_metadata_of(await self._model(context, request.name, request.version))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        """The one model this server serves (how tritonclient's get_model_repository_index() discovers models):
        its version and state READY, or LOADING / UNAVAILABLE (with the reason) before it serves."""
        s = await self.handle.state()
        state = "READY" if s.serving else "UNAVAILABLE" if s.failure is not None or s.loaded else "LOADING"
        reason = f"failed to load: {s.failure}" if s.failure is not None else "" if s.serving else \
            "not serving (loading or draining)"
        models = [pb.RepositoryIndexResponse.ModelIndex(name=s.name, version=s.version, state=state, reason=reason)]
        return pb.RepositoryIndexResponse(models=[m for m in models if s.serving or not request.ready])

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        model = await self._model(context, request.name, request.version)
        return pb.ModelConfigResponse(config=model_config_of(model, self.handle.config))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        """The counters that map cleanly, cumulative since the server started (over every version served)."""
        served = self.handle.model
        model = await self._model(context, request.name or (served.name if served else ""), request.version)
        s = self.handle.statistics()
        D = pb.StatisticDuration
        stats = pb.ModelStatistics(
            name=model.name, version=model.version, inference_count=s.images, execution_count=s.batches,
            inference_stats=pb.InferStatistics(
                success=D(count=s.succeeded), fail=D(count=s.failed),
                queue=D(count=s.queued, ns=int(s.queue_seconds * 1e9))))
        return pb.ModelStatisticsResponse(model_stats=[stats])

    # --- inference -----------------------------------------------------------------------------------------
    async def ModelInfer(self, request: InferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        t0 = time.perf_counter()
        try:
            response = await self._infer(request, call_deadline(context.time_remaining()))
        except RequestError as e:
            self.handle.record("ModelInfer", e.code, t0)
            await context.abort(e.code, with_id(request.id, e.message))
        except asyncio.CancelledError:
            self.handle.record("ModelInfer", cancel_code(context.time_remaining()), t0)
            raise
        self.handle.record("ModelInfer", grpc.StatusCode.OK, t0, response.model_version)
        return response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[InferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming extension: one response per request (its `id` echoed), as soon as it is ready; a
        bad request gets `error_message` in-stream and the stream goes on."""
        deadline = call_deadline(context.time_remaining())

        async def one(request: InferRequest) -> pb.ModelStreamInferResponse:
            t0 = time.perf_counter()
            try:
                response = pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))
            except RequestError as e:
                self.handle.record("ModelStreamInfer", e.code, t0)
                return stream_error_of(request, e)
            except asyncio.CancelledError:
                self.handle.record("ModelStreamInfer", cancel_code(context.time_remaining()), t0)
                raise
            self.handle.record("ModelStreamInfer", grpc.StatusCode.OK, t0, response.infer_response.model_version)
            return response

        async for response in answer_each(request_iterator, one, self.handle.config.max_stream_in_flight,
                                          self.handle.stream_items):
            yield response
