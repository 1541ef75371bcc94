"""Stream backpressure on a real server: a client that sends many items and reads none makes the server hold at
most --max-stream-in-flight of them (unsent answers included), after which the server stops reading and HTTP/2
flow control holds the client back; once the client reads, every item is answered exactly once. Both
classifier.v1 ClassifyStream and OIP ModelStreamInfer. Counted through the server's held-items gauge, no timing."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from resnet_serve.protos import classifier_pb2 as pb
from tests.harness import InProcessServer, wait_for

WINDOW = 4
ITEMS = 800
PAD = "x" * 1000  # 1 KB request ids (within --max-request-id-length), echoed in every answer: the client's
# receive window fills after some 60 answers
# A fixed 64 KB HTTP/2 window on the client (no BDP growth), so "the client's transport is full" comes early.
CLIENT_OPTIONS = [("grpc.http2.bdp_probe", 0)]


class CountingGauge:
    """Stands in for the server's stream_items gauge: the current value, its peak, and items read / sent."""

    def __init__(self, real) -> None:
        self.real, self.lock = real, threading.Lock()
        self.value = self.peak = self.reads = self.sends = 0

    def inc(self, amount: float = 1) -> None:
        with self.lock:
            self.value += int(amount)
            self.reads += int(amount)
            self.peak = max(self.peak, self.value)
        self.real.inc(amount)

    def dec(self, amount: float = 1) -> None:
        with self.lock:
            self.value -= int(amount)
            self.sends += int(amount)
        self.real.dec(amount)


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path):
    s = InProcessServer(model_dir=str(tiny_model_dir), max_batch_size=4, max_queue_delay_us=0,
                        threads_per_instance=1, max_stream_in_flight=WINDOW)
    yield s
    s.close()


def computed(srv: InProcessServer, method: str) -> float:
    return sum(v for (name, labels), v in srv.metrics().items()
               if name == "resnet_serve_requests_total" and dict(labels)["method"] == method)


def v1_items(pulled: list[int]):
    pixels = np.zeros((32, 32, 3), np.uint8).tobytes()
    for i in range(ITEMS):
        pulled[0] += 1
        yield pb.ClassifyRequest(request_id=f"{i}:{PAD}",
                                 tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[32, 32, 3], data=pixels))


def oip_items(pulled: list[int]):
    pixels = np.zeros((1, 32, 32, 3), np.uint8).tobytes()
    for i in range(ITEMS):
        pulled[0] += 1
        yield oip.ModelInferRequest(model_name="tiny", id=f"{i}:{PAD}", raw_input_contents=[pixels],
                                    inputs=[oip.ModelInferRequest.InferInputTensor(
                                        name="uint8_hwc", datatype="UINT8", shape=[1, 32, 32, 3])])


def answer_id(method: str, response) -> str:
    if method == "ClassifyStream":
        assert not response.HasField("error"), response.error
        return response.request_id
    assert not response.error_message, response.error_message
    return response.infer_response.id


@pytest.mark.parametrize("method", ["ClassifyStream", "ModelStreamInfer"])
def test_a_stream_that_never_reads_is_held_to_the_window_then_answered_once(srv: InProcessServer,
                                                                          method: str) -> None:
    gauge = CountingGauge(srv.server.metrics.stream_items)
    srv.server.metrics.stream_items = gauge
    before = computed(srv, method)
    pulled = [0]
    with grpc.insecure_channel(srv.address, options=CLIENT_OPTIONS) as channel:
        if method == "ClassifyStream":
            call = channel.stream_stream("/classifier.v1.Classifier/ClassifyStream",
                                         request_serializer=pb.ClassifyRequest.SerializeToString,
                                         response_deserializer=pb.ClassifyResponse.FromString)(v1_items(pulled))
        else:
            call = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(oip_items(pulled))
        try:
            # The server is held back: WINDOW items read and not sent, every one of them computed, so the only
            # thing it waits for is a send, which flow control withholds while the client reads nothing.
            wait_for(lambda: gauge.value == WINDOW and computed(srv, method) - before == gauge.reads,
                     what="the server to hold a full window of computed, unsent answers")
            assert gauge.peak == WINDOW  # never more held than the window, unsent answers included
            assert gauge.reads < ITEMS // 4  # it stopped reading: most items are still with the client
            assert computed(srv, method) - before == gauge.reads
            ids = [answer_id(method, r) for r in call]  # now read everything
        finally:
            call.cancel()
    assert sorted(ids) == sorted(f"{i}:{PAD}" for i in range(ITEMS))  # each item answered exactly once
    assert gauge.peak == WINDOW and gauge.value == 0 and gauge.reads == gauge.sends == ITEMS
    assert pulled[0] == ITEMS and computed(srv, method) - before == ITEMS
    srv.server.metrics.stream_items = gauge.real
    assert srv.metrics()[("resnet_serve_stream_items_held", ())] == 0
