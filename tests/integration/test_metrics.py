"""/metrics of a real server, read with prometheus_client's parser: every counter and histogram count moves by
exactly what the test caused, and nothing else moves. A worker gate holds batches inside the worker, so batch
shapes, flush reasons, queue depths and drops are decided by the test, never by timing."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.server.metrics import batch_size_buckets
from tests.harness import InProcessServer, WorkerGate, gated_workers, wait_for

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32
MAX_BATCH = 8
MAX_QUEUE = 16
WARMUP_BATCHES = 4  # one per bucket 1, 2, 4, 8
P = "resnet_serve_"
Key = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[Key, float]
TIME_HISTOGRAMS = ("request_duration_seconds", "queue_wait_seconds", "preprocess_duration_seconds",
                   "inference_duration_seconds")


# ---- requests ------------------------------------------------------------------------------------------------

def uint8(i: int = 0) -> pb.ClassifyRequest:
    arr = np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE, 3], data=arr.tobytes()),
                              request_id=str(i))


def float32(i: int = 0) -> pb.ClassifyRequest:
    x = np.random.default_rng(i).standard_normal((3, SIZE, SIZE)).astype(np.float32)
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=[3, SIZE, SIZE], data=x.tobytes()))


def png(i: int = 0) -> pb.ClassifyRequest:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return pb.ClassifyRequest(encoded=buf.getvalue())


INVALID = [pb.ClassifyRequest(), pb.ClassifyRequest(encoded=b"not an image"),
           pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE, 3], data=b"x")),
           pb.ClassifyRequest(encoded=b"\x89PNG", top_k=11)]


# ---- reading the metrics --------------------------------------------------------------------------------------

def key(metric: str, /, **labels: str) -> Key:
    if metric == "requests_total" or metric.startswith("request_duration_seconds"):
        labels = {"model": "tiny", "version": "1", **labels}  # the model serving (tests/conftest.py)
    return (P + metric, tuple(sorted(labels.items())))


def moved(before: Samples, after: Samples) -> Samples:
    """Non-zero changes of every resnet_serve counter and histogram count (time sums and time buckets other than
    +Inf are timing, not events, so they are left out; batch-size sums and buckets are events and stay in)."""
    out: Samples = {}
    for k, v in after.items():
        name, labels = k
        if not name.startswith(P) or name.endswith("_created") or name.startswith(P + "worker_cpu_seconds"):
            continue  # (worker CPU seconds are time spent, not events)
        timing = any(name.startswith(P + h) for h in TIME_HISTOGRAMS)
        if name.endswith("_total") or name.endswith("_count") or (
                name.endswith("_bucket") and (not timing or dict(labels)["le"] == "+Inf")) or (
                name.endswith("_sum") and not timing):
            d = v - before.get(k, 0.0)
            if d:
                out[k] = d
    return out


def histogram(name: str, n: int, /, **labels: str) -> Samples:
    """Expected movement of a time histogram observed n times."""
    return {key(f"{name}_count", **labels): n, key(f"{name}_bucket", **labels, le="+Inf"): n}


def batches(*sizes: int) -> Samples:
    """Expected movement of the batch-size histogram (sum, count and every bucket) for these batches."""
    out: Samples = {key("batch_size_count"): len(sizes), key("batch_size_sum"): sum(sizes),
                    key("batch_size_bucket", le="+Inf"): len(sizes)}
    for b in batch_size_buckets(MAX_BATCH):
        out[key("batch_size_bucket", le=str(b))] = sum(s <= b for s in sizes)
    return {k: v for k, v in out.items() if v}


def merge(*parts: Samples) -> Samples:
    out: Samples = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return {k: v for k, v in out.items() if v}


def wait_metrics(srv: InProcessServer, predicate: Callable[[Samples], bool], what: str) -> Samples:
    """Poll /metrics until predicate holds (the server records some events after the client has its answer)."""
    box: list[Samples] = []

    def check() -> bool:
        box[:] = [srv.metrics()]
        return predicate(box[0])

    wait_for(check, timeout=30, what=what)
    return box[0]


# ---- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerGate]:
    with gated_workers(tmp_path_factory.mktemp("gate") / "fifo") as g:
        yield g


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, gate: WorkerGate) -> Iterator[InProcessServer]:
    """Delay 0 (work-conserving), batches up to 8, a queue of 16, one worker whose every batch waits for a token;
    one batch in it at a time, so the batches these tests count queue behind it."""
    gate.release(WARMUP_BATCHES)
    s = InProcessServer(model_dir=str(tiny_model_dir), max_batch_size=MAX_BATCH, max_queue_delay_us=0,
                        max_queue_size=MAX_QUEUE, threads_per_instance=1, batches_in_flight=1)
    yield s
    gate.release(64)  # whatever a failed test left held must not block shutdown
    s.close()


@pytest.fixture(autouse=True)
def idle(request: pytest.FixtureRequest) -> None:
    """Tests on the module server start with nothing queued or computing (each uses exactly its own tokens)."""
    if "srv" in request.fixturenames:
        srv: InProcessServer = request.getfixturevalue("srv")
        wait_for(lambda: srv.server.batcher.in_flight == 0, timeout=30, what="an idle server")


def computing_one(srv: InProcessServer) -> grpc.Future:
    """One request held inside the worker (it found the server idle and went alone)."""
    before = len(srv.call_log)
    first = srv.stub.Classify.future(uint8(0), timeout=120)
    wait_for(lambda: len(srv.call_log) == before + 1, what="a batch in the worker")
    return first


# ---- tests ----------------------------------------------------------------------------------------------------

def test_request_counters_equal_what_was_sent(srv: InProcessServer, gate: WorkerGate) -> None:
    """One request at a time: each valid one is its own batch of 1 (idle dispatch), each invalid one never
    reaches the batcher. Every counter moves by exactly the number of requests of its kind."""
    before = srv.metrics()
    calls_before = len(srv.call_log)
    unary_valid = [uint8(1), uint8(2), png(3), float32(4), float32(5)]
    for r in unary_valid:
        gate.release(1)
        assert len(srv.stub.Classify(r, timeout=30).predictions) == 5
    for r in INVALID:
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Classify(r, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).name == "tiny"

    # A stream fed one item at a time, so its items are sequential too: 3 valid, 1 invalid.
    outbox: list[pb.ClassifyRequest | None] = []
    ready = threading.Condition()

    def items() -> Iterator[pb.ClassifyRequest]:
        while True:
            with ready:
                ready.wait_for(lambda: outbox)
                item = outbox.pop(0)
            if item is None:
                return
            yield item

    def send(item: pb.ClassifyRequest | None) -> None:
        with ready:
            outbox.append(item)
            ready.notify()

    stream = srv.stub.ClassifyStream(items(), timeout=60)
    codes = []
    for item, valid in [(uint8(6), True), (INVALID[1], False), (png(7), True), (uint8(8), True)]:
        if valid:
            gate.release(1)
        send(item)
        codes.append(next(stream).error.code)
    send(None)
    assert list(stream) == []
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, 0]

    computed = len(unary_valid) + 3
    after = srv.metrics()
    assert moved(before, after) == merge(
        {key("requests_total", method="Classify", code="OK"): len(unary_valid),
         key("requests_total", method="Classify", code="INVALID_ARGUMENT"): len(INVALID),
         key("requests_total", method="ClassifyStream", code="OK"): 3,
         key("requests_total", method="ClassifyStream", code="INVALID_ARGUMENT"): 1,
         key("requests_total", method="GetModelInfo", code="OK"): 1,
         key("batches_total", reason="idle"): computed},
        histogram("request_duration_seconds", len(unary_valid) + len(INVALID), method="Classify"),
        histogram("request_duration_seconds", 4, method="ClassifyStream"),
        histogram("preprocess_duration_seconds", 4, kind="uint8"),
        histogram("preprocess_duration_seconds", 2, kind="encoded"),
        histogram("preprocess_duration_seconds", 2, kind="float32"),
        histogram("queue_wait_seconds", computed),  # every accepted request waited in the queue once
        histogram("inference_duration_seconds", computed),
        batches(*[1] * computed))
    # The batch-size histogram's sum is the number of images the engine computed.
    assert sum(n for _, n in srv.call_log[calls_before:]) == computed == after[key("batch_size_sum")] - \
        before[key("batch_size_sum")]
    assert after[key("queue_depth")] == 0 and after[key("in_flight_requests")] == 0


def test_flush_reasons_batch_sizes_and_gauges(srv: InProcessServer, gate: WorkerGate) -> None:
    """1 computing + 3 queued -> batches [1] idle, then [2] and [1] by delay (delay 0, bucket floor of 3 is 2);
    the gauges show the held state exactly."""
    before = srv.metrics()
    first = computing_one(srv)
    rest = [srv.stub.Classify.future(uint8(i), timeout=120) for i in range(1, 4)]
    held = wait_metrics(srv, lambda m: m[key("queue_depth")] == 3 and m[key("in_flight_requests")] == 4,
                        "3 queued, 4 in flight")
    assert held[key("queue_depth")] == 3
    gate.release(3)
    assert [f.result().request_id for f in [first, *rest]] == ["0", "1", "2", "3"]
    after = srv.metrics()
    assert moved(before, after) == merge(
        {key("requests_total", method="Classify", code="OK"): 4,
         key("batches_total", reason="idle"): 1, key("batches_total", reason="delay"): 2},
        histogram("request_duration_seconds", 4, method="Classify"),
        histogram("preprocess_duration_seconds", 4, kind="uint8"),
        histogram("queue_wait_seconds", 4),
        histogram("inference_duration_seconds", 3),
        batches(1, 2, 1))
    assert after[key("queue_depth")] == 0 and after[key("in_flight_requests")] == 0


def test_dropped_requests_by_reason(srv: InProcessServer, gate: WorkerGate) -> None:
    """With one batch held in the worker: a queued request cancelled by its client, one whose deadline expires in
    the queue, and one refused by a full queue. None reaches the predictor or the queue-wait histogram."""
    before = srv.metrics()
    first = computing_one(srv)

    cancelled = srv.stub.Classify.future(uint8(1), timeout=120)
    wait_for(lambda: srv.server.batcher.queue_depth == 1, what="a queued request")
    cancelled.cancel()
    wait_metrics(srv, lambda m: moved(before, m).get(key("dropped_requests_total", reason="cancelled")) == 1
                 and moved(before, m).get(key("requests_total", method="Classify", code="CANCELLED")) == 1,
                 "the cancelled request to be counted")

    late = srv.stub.Classify.future(uint8(2), timeout=1.0)
    with pytest.raises(grpc.RpcError) as err:
        late.result()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def counted_late(m: Samples) -> bool:
        d = moved(before, m)
        return (d.get(key("requests_total", method="Classify", code="DEADLINE_EXCEEDED"), 0)
                + d.get(key("requests_total", method="Classify", code="CANCELLED"), 0)) == 2
    wait_metrics(srv, counted_late, "the expired request to be counted")

    wait_for(lambda: srv.server.batcher.queue_depth == 0, what="an empty queue")
    queued = [srv.stub.Classify.future(uint8(10 + i), timeout=120) for i in range(MAX_QUEUE)]
    wait_for(lambda: srv.server.batcher.queue_depth == MAX_QUEUE, what="a full queue")
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Classify(uint8(99), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    gate.release(3)  # [1] idle, then the 16 queued as two full batches of 8
    assert first.result().request_id == "0" and len([f.result() for f in queued]) == MAX_QUEUE
    after = srv.metrics()
    d = moved(before, after)
    # gRPC's own deadline timer may cancel the handler a moment before the batcher's timer fires: the expired
    # request is then counted as cancelled, consistently in both counters. Exactly one of the two happened.
    late_as_cancelled = d.get(key("dropped_requests_total", reason="cancelled"), 0) - 1
    assert late_as_cancelled in (0, 1)
    computed = 1 + MAX_QUEUE
    assert d == merge(
        {key("requests_total", method="Classify", code="OK"): computed,
         key("requests_total", method="Classify", code="CANCELLED"): 1 + late_as_cancelled,
         key("requests_total", method="Classify", code="DEADLINE_EXCEEDED"): 1 - late_as_cancelled,
         key("requests_total", method="Classify", code="RESOURCE_EXHAUSTED"): 1,
         key("dropped_requests_total", reason="cancelled"): 1 + late_as_cancelled,
         key("dropped_requests_total", reason="deadline"): 1 - late_as_cancelled,
         key("dropped_requests_total", reason="queue_full"): 1,
         key("batches_total", reason="idle"): 1, key("batches_total", reason="full"): 2},
        histogram("request_duration_seconds", computed + 3, method="Classify"),
        histogram("preprocess_duration_seconds", computed + 3, kind="uint8"),
        histogram("queue_wait_seconds", computed),
        histogram("inference_duration_seconds", 3),
        batches(1, MAX_BATCH, MAX_BATCH))


def test_model_info_load_times_and_process_metrics(srv: InProcessServer) -> None:
    m = srv.metrics()
    assert m[key("model_info", architecture="resnet18", device="cpu", engine="paddle", name="tiny",
                 precision="fp32", version="1")] == 1
    assert m[key("model_load_seconds")] > 0 and m[key("model_warmup_seconds")] > 0
    assert m[key("workers_alive")] == 1
    assert m[("process_cpu_seconds_total", ())] > 0 and m[("process_resident_memory_bytes", ())] > 0
    assert any(name == "python_info" for name, _ in m)
    assert any(name == "python_gc_collections_total" for name, _ in m)


def test_docs_describe_exactly_the_exported_metrics(srv: InProcessServer) -> None:
    """docs/metrics.md and the server agree on the metric names (the dashboard test checks the dashboard)."""
    from urllib.request import urlopen

    text = urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10).read().decode()
    exported = {n for n in re.findall(r"^# TYPE (resnet_serve_\w+) ", text, re.M) if not n.endswith("_created")}
    documented = set(re.findall(r"^\| `(resnet_serve_\w+)`", (ROOT / "docs/metrics.md").read_text(), re.M))
    assert documented == exported
