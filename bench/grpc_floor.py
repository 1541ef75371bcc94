"""The floor under a Python gRPC front (issue 17): what grpcio itself costs per image, so the front's figure can be
read against it.

A grpc.aio server with only the two streaming methods the front_cost load uses, classifier.v1 ClassifyStream and
the Open Inference Protocol's ModelStreamInfer. Each request is parsed as resnet-serve parses it
(ClassifyRequest by protobuf; ModelInferRequest by oip_codec.parse_infer_request, raw contents as views) and answered
at once with a response of the right shape (5 classes per image, the request's id echoed): no batching, no engine,
no metrics. Whatever resnet-serve's front spends above this server under the same load is its own serving path.

    python -m bench.grpc_floor     prints {"port": N} on stdout once it listens (loopback, a free port); SIGTERM
                                   stops it. bench/run.py config `grpc_floor` runs it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as oip

from resnet_serve.common.malloc import keep_freed_memory
from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.server.oip_codec import parse_infer_request

K = 5
MAX_MESSAGE_BYTES = 64 << 20


def classify_response(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(request_id=request.request_id, model_version="1",
                               predictions=[pb.Prediction(class_id=i, label=f"c{i}", score=0.2) for i in range(K)])


def infer_response(raw: bytes) -> oip.ModelStreamInferResponse:
    """N images (the first input's first dimension) answered with [N, K] class ids and scores."""
    request = parse_infer_request(raw).message
    n = int(request.inputs[0].shape[0]) if request.inputs and request.inputs[0].shape else 1
    response = oip.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
    response.outputs.add(name="class_ids", datatype="INT64", shape=[n, K])
    response.raw_output_contents.append(np.tile(np.arange(K, dtype="<i8"), n).tobytes())
    response.outputs.add(name="scores", datatype="FP32", shape=[n, K])
    response.raw_output_contents.append(np.full(n * K, 0.2, "<f4").tobytes())
    return oip.ModelStreamInferResponse(infer_response=response)


async def classify_stream(requests: AsyncIterator[pb.ClassifyRequest], context) -> AsyncIterator[pb.ClassifyResponse]:
    async for request in requests:
        yield classify_response(request)


async def model_stream_infer(requests: AsyncIterator[bytes], context) -> AsyncIterator[oip.ModelStreamInferResponse]:
    async for raw in requests:
        yield infer_response(raw)


def handlers() -> list[grpc.GenericRpcHandler]:
    classifier = grpc.method_handlers_generic_handler("classifier.v1.Classifier", {
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            classify_stream, request_deserializer=pb.ClassifyRequest.FromString,
            response_serializer=pb.ClassifyResponse.SerializeToString)})
    inference = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            model_stream_infer, request_deserializer=None,
            response_serializer=oip.ModelStreamInferResponse.SerializeToString)})
    return [classifier, inference]


async def serve() -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers(handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"port": port}), flush=True)
    await stop.wait()
    await server.stop(1)


def main() -> int:
    keep_freed_memory()  # as resnet-serve's front does (common/malloc.py)
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
