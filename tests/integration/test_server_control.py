"""Batching, overload, deadlines, cancellation, worker death and health, made deterministic by a gate that
holds every batch inside the worker process until the test releases it (no sleeps, no timing)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resnet_serve.protos import classifier_pb2 as pb
from tests.harness import InProcessServer, WorkerGate, gated_workers, wait_for

SIZE = 32
BUCKETS = (1, 2, 4, 8)


def request(i: int = 0) -> pb.ClassifyRequest:
    arr = np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE, 3], data=arr.tobytes()),
                              request_id=str(i))


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory):
    with gated_workers(tmp_path_factory.mktemp("gate") / "fifo") as g:
        yield g


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, gate: WorkerGate):
    """Work-conserving batching (delay 0), batches of up to 8, a queue of 40. Starts NOT_SERVING: warm-up runs
    one batch per bucket through the gate. One batch in the worker at a time: what these tests count is what
    queues behind it."""
    gate.hold()
    s = InProcessServer(wait_ready=False, model_dir=str(tiny_model_dir), max_batch_size=8, max_queue_delay_us=0,
                        max_queue_size=40, threads_per_instance=1, batches_in_flight=1)
    yield s
    gate.open()
    s.close()


@pytest.fixture
def held(srv: InProcessServer, gate: WorkerGate):
    """Each test starts with the gate closed, the server serving and idle; the gate is opened afterwards."""
    srv.wait_ready()
    gate.hold()
    wait_for(lambda: srv.server.batcher.in_flight == 0, what="an idle server")
    yield gate
    gate.open()


def health(srv: InProcessServer) -> int:
    stub = health_pb2_grpc.HealthStub(srv.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="classifier.v1.Classifier"), timeout=10).status


def health_port(srv: InProcessServer, service: str = "") -> int:
    """The status on the dedicated health port (server/resnet_serve/server/health_port.py)."""
    with grpc.insecure_channel(f"127.0.0.1:{srv.server.health_port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


def calls(srv: InProcessServer) -> list[int]:
    return [n for _, n in srv.call_log]


def test_not_serving_until_warm_then_serving(srv: InProcessServer, gate: WorkerGate) -> None:
    # Runs first (file order): the module server is still warming, its worker held at the gate.
    assert not srv.server.ready.is_set()
    assert health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health_port(srv) == health_port(srv, "classifier.v1.Classifier") == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Classify(request(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
    gate.release(len(BUCKETS))  # one warm-up batch per bucket
    srv.wait_ready()
    assert health(srv) == health_pb2.HealthCheckResponse.SERVING
    # the health port mirrors the main port's statuses, per service name too (published in order, off the loop)
    wait_for(lambda: health_port(srv) == health_port(srv, "classifier.v1.Classifier")
             == health_pb2.HealthCheckResponse.SERVING, what="SERVING on the health port")


def test_32_concurrent_requests_form_few_full_batches(srv: InProcessServer, held: WorkerGate) -> None:
    before = len(srv.call_log)
    futures = [srv.stub.Classify.future(request(i), timeout=120) for i in range(32)]
    # The first arrival(s) found the server idle and went at once; that batch is held in the worker while
    # every other request queues behind it.
    wait_for(lambda: len(srv.call_log) == before + 1, what="the first batch in the worker")
    first = srv.call_log[before][1]
    wait_for(lambda: srv.server.batcher.queue_depth == 32 - first, what="the rest queued")
    held.open()
    assert [f.result().request_id for f in futures] == [str(i) for i in range(32)]
    sizes = calls(srv)[before:]
    assert 4 <= len(sizes) <= 8, sizes
    # Then full batches, then what is left in the largest bucket that fits: never padded, never split early.
    expected, left = [first], 32 - first
    while left:
        expected.append(max(b for b in BUCKETS if b <= min(left, 8)))
        left -= expected[-1]
    assert sizes == expected


def test_queue_full_is_resource_exhausted_at_once(srv: InProcessServer, held: WorkerGate) -> None:
    first = srv.stub.Classify.future(request(0), timeout=120)
    wait_for(lambda: srv.server.batcher.in_flight == 1 and srv.server.batcher.queue_depth == 0,
             what="one request computing")
    queued = [srv.stub.Classify.future(request(i), timeout=120) for i in range(1, 41)]
    wait_for(lambda: srv.server.batcher.queue_depth == 40, what="a full queue")
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Classify(request(99), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
    held.open()
    assert first.result().request_id == "0" and len([f.result() for f in queued]) == 40


def test_deadline_expiring_in_queue_never_reaches_the_predictor(srv: InProcessServer, held: WorkerGate) -> None:
    before = len(srv.call_log)
    first = srv.stub.Classify.future(request(0), timeout=120)
    wait_for(lambda: len(srv.call_log) == before + 1, what="the first batch in the worker")
    late = srv.stub.Classify.future(request(1), timeout=0.5)
    with pytest.raises(grpc.RpcError) as err:
        late.result()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: srv.server.batcher.in_flight == 1, what="the expired request to leave the queue")
    held.open()
    assert first.result().request_id == "0"
    assert calls(srv)[before:] == [1]  # only the first request was ever computed


def test_cancelled_request_frees_its_queue_slot(srv: InProcessServer, held: WorkerGate) -> None:
    before = len(srv.call_log)
    first = srv.stub.Classify.future(request(0), timeout=120)
    wait_for(lambda: len(srv.call_log) == before + 1, what="the first batch in the worker")
    second = srv.stub.Classify.future(request(1), timeout=120)
    wait_for(lambda: srv.server.batcher.queue_depth == 1, what="a queued request")
    second.cancel()
    wait_for(lambda: srv.server.batcher.queue_depth == 0, what="the cancelled request to leave the queue")
    held.open()
    assert first.result().request_id == "0" and second.cancelled()
    assert calls(srv)[before:] == [1]


def test_event_loop_answers_health_while_a_batch_computes(srv: InProcessServer, held: WorkerGate) -> None:
    before = len(srv.call_log)
    busy = srv.stub.Classify.future(request(0), timeout=120)
    wait_for(lambda: len(srv.call_log) == before + 1, what="a batch in the worker")
    assert health(srv) == health_pb2.HealthCheckResponse.SERVING
    assert srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).name == "tiny"
    assert not busy.done()  # both answered while the batch was still computing
    held.open()
    assert busy.result().request_id == "0"


def test_killed_worker_fails_its_batch_then_is_replaced(srv: InProcessServer, held: WorkerGate) -> None:
    before = len(srv.call_log)
    old_pid = srv.engine.worker_pids()[0]
    doomed = srv.stub.Classify.future(request(0), timeout=120)
    wait_for(lambda: len(srv.call_log) == before + 1, what="a batch in the worker")
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        doomed.result()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "worker" in err.value.details().lower()
    # No worker can take work until the replacement has warmed through the (held) gate: NOT_SERVING, on the
    # health port too.
    wait_for(lambda: health_port(srv) == health_pb2.HealthCheckResponse.NOT_SERVING,
             what="NOT_SERVING on the health port after the worker loss")
    held.open()  # the replacement warms its buckets through the gate too
    wait_for(lambda: srv.engine.alive_instances() == 1 and srv.engine.worker_pids()[0] != old_pid,
             what="a replacement worker")
    assert srv.stub.Classify(request(1), timeout=60).request_id == "1"
    assert health(srv) == health_pb2.HealthCheckResponse.SERVING
    wait_for(lambda: health_port(srv) == health_pb2.HealthCheckResponse.SERVING, what="SERVING on the health port")
