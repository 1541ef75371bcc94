"""The floor under a Python gRPC front (issue 17): what grpcio itself costs per image, so the front's figure can be
read against it.

A grpc.aio server with only the two streaming methods the front_cost load uses, classifier.v1 ClassifyStream and
the Open Inference Protocol's ModelStreamInfer. Each request is parsed as resnet-serve parses it
(ClassifyRequest by protobuf; ModelInferRequest by oip_codec.parse_infer_request, raw contents as views) and answered
at once with a response of the right shape (5 classes per image, the request's id echoed): no batching, no engine,
no metrics. Whatever resnet-serve's front spends above this server under the same load is its own serving path.

    python -m bench.grpc_floor     prints {"port": N} on stdout once it listens (loopback, a free port); SIGTERM
                                   stops it. bench/run.py config `grpc_floor` runs it.
    ... --hold-ms A,C              holds each answer of n images for A + C*n ms first, waited out on a thread as
                                   the simulated engine waits (server/resnet_serve/server/simulated_engine.py:
                                   slept, the end spun): the round trip at concurrency 1 of a server that adds
                                   nothing but one hop to a thread and back around the simulated engine's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as oip

from resnet_serve.common.malloc import keep_freed_memory
from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.server.oip_codec import parse_infer_request
from resnet_serve.server.simulated_engine import batch_seconds, parse_cost_ms, tighten_timer_slack, wait_until

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


class Hold:
    """Each answer of n images waits a + c*n ms on a thread of its own (no wait when a = c = 0)."""

    def __init__(self, cost_ms: tuple[float, float] = (0.0, 0.0)):
        self.cost_ms = cost_ms
        self.thread = ThreadPoolExecutor(1, initializer=tighten_timer_slack) if any(cost_ms) else None

    async def __call__(self, n: int) -> None:
        if self.thread is not None:
            deadline = time.perf_counter() + batch_seconds(self.cost_ms, n)
            await asyncio.get_running_loop().run_in_executor(self.thread, wait_until, deadline, time.perf_counter,
                                                             time.sleep)


def handlers(hold: Hold) -> list[grpc.GenericRpcHandler]:
    async def classify_stream(requests: AsyncIterator[pb.ClassifyRequest], context) -> \
            AsyncIterator[pb.ClassifyResponse]:
        async for request in requests:
            await hold(1)
            yield classify_response(request)

    async def model_stream_infer(requests: AsyncIterator[bytes], context) -> \
            AsyncIterator[oip.ModelStreamInferResponse]:
        async for raw in requests:
            response = infer_response(raw)
            await hold(int(response.infer_response.outputs[0].shape[0]))
            yield response

    classifier = grpc.method_handlers_generic_handler("classifier.v1.Classifier", {
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            classify_stream, request_deserializer=pb.ClassifyRequest.FromString,
            response_serializer=pb.ClassifyResponse.SerializeToString)})
    inference = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            model_stream_infer, request_deserializer=None,
            response_serializer=oip.ModelStreamInferResponse.SerializeToString)})
    return [classifier, inference]


async def serve(hold: Hold) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers(handlers(hold))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"port": port}), flush=True)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--hold-ms", type=parse_cost_ms, default=(0.0, 0.0), metavar="A,C",
                        help="hold each answer of n images A + C*n ms (default 0,0: answer at once)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as resnet-serve's front does (common/malloc.py)
    asyncio.run(serve(Hold(args.hold_ms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
