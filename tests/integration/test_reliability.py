"""The worst day: failing batches, clients that vanish mid-stream, a soak of mixed bad traffic above capacity,
and a model swap under load. Real gRPC on loopback; a worker gate makes 'mid-flight' deterministic."""

from __future__ import annotations

import asyncio
import io
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc
from resnet_serve.server.engine import EngineError
from tests.harness import InProcessServer, WorkerGate, gated_workers, make_tiny_model_dir, wait_for

SIZE = 32


def tagged(i: int) -> pb.ClassifyRequest:
    """A float32 input whose first value carries the request number, so a runner can see who is in a batch."""
    x = np.zeros((3, SIZE, SIZE), np.float32)
    x[0, 0, 0] = i
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=[3, SIZE, SIZE], data=x.tobytes()),
                              request_id=str(i))


class FaultInjector:
    """Wraps the engine's runner: fails every third batch (or every batch when told), records who was in each."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batches: list[tuple[list[int], bool]] = []  # (request numbers, failed)
        self.fail_all = False

    def wrap(self, runner):
        def run(batch: list[np.ndarray]) -> np.ndarray:
            with self.lock:
                fail = self.fail_all or (len(self.batches) + 1) % 3 == 0
                self.batches.append(([int(x[0, 0, 0]) for x in batch], fail))
            if fail:
                raise EngineError("injected fault")
            return runner(batch)

        return run


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def faults():
    return FaultInjector()


@pytest.fixture(scope="module")
def faulty(tiny_model_dir: Path, faults: FaultInjector):
    s = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1, max_batch_size=8,
                        max_queue_delay_us=2000, unhealthy_after_failures=4, wrap_runner=faults.wrap)
    yield s
    s.close()


def test_every_third_batch_fails_exactly_its_requests(faulty: InProcessServer, faults: FaultInjector) -> None:
    start = len(faults.batches)
    futures = {i: faulty.stub.Classify.future(tagged(i), timeout=120) for i in range(1, 121)}
    outcome = {}
    for i, f in futures.items():
        try:
            outcome[i] = f.result().request_id == str(i)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INTERNAL and "injected fault" in e.details()
            outcome[i] = False
    batches = faults.batches[start:]
    failed_ids = {i for ids, failed in batches if failed for i in ids}
    assert sorted(i for ids, _ in batches for i in ids) == list(range(1, 121))  # each computed once
    assert {i for i, ok in outcome.items() if not ok} == failed_ids
    assert failed_ids and len(failed_ids) < 120
    stub = faulty.stub
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).name == "tiny"


def test_engine_that_keeps_failing_turns_health_not_serving(faulty: InProcessServer,
                                                            faults: FaultInjector) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(faulty.channel)

    def status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(), timeout=10).status

    assert status() == health_pb2.HealthCheckResponse.SERVING
    faults.fail_all = True
    try:
        for i in range(4):  # sequential: four failed batches in a row
            with pytest.raises(grpc.RpcError):
                faulty.stub.Classify(tagged(i), timeout=30)
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")
    finally:
        faults.fail_all = False
    # The injector still fails every third batch, so of three sequential requests (one batch each) at most one
    # fails: a success comes within three tries, and only the injected fault may come before it.
    outcomes = []
    for _ in range(3):
        try:
            faulty.stub.Classify(tagged(0), timeout=30)
            outcomes.append("OK")
            break
        except grpc.RpcError as e:
            outcomes.append(f"{e.code().name}: {e.details()}")
    assert outcomes[-1] == "OK" and all("injected fault" in o for o in outcomes[:-1]), outcomes
    wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, what="SERVING again")


@pytest.fixture
def gated(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[InProcessServer, WorkerGate]]:
    """A server whose worker runs a batch only when the gate lets it (tests/harness.py). Function-scoped: the gate's
    variable is set while the fixture lives, and workers spawned by later tests' servers must not inherit it."""
    with gated_workers(tmp_path / "gate") as gate:
        gate.open()  # warm-up passes
        s = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1, max_batch_size=8,
                            max_queue_delay_us=0, max_queue_size=512, max_stream_in_flight=8, batches_in_flight=1)
        try:
            yield s, gate
        finally:
            gate.open()  # whatever a failed test left held must not block shutdown
            s.close()


def test_dropped_streams_leave_nothing_behind(gated) -> None:
    srv, gate = gated
    batcher = srv.server.batcher
    wait_for(lambda: batcher.in_flight == 0, what="an idle server")
    baseline_tasks = srv.task_count()
    gate.hold()
    hold_open = threading.Event()

    def requests(k: int):
        for j in range(4):
            yield tagged(k * 10 + j)
        hold_open.wait(120)  # the client keeps its side of the stream open until it is dropped

    calls = [srv.stub.ClassifyStream(requests(k), timeout=120) for k in range(50)]
    wait_for(lambda: batcher.in_flight == 200, what="200 stream items inside the server")
    for call in calls:
        call.cancel()
    hold_open.set()
    # Only the batch held in the worker (at most 8 items) may still count as in flight.
    wait_for(lambda: batcher.queue_depth == 0 and batcher.in_flight <= 8, what="queue emptied by the cancels")
    gate.open()
    wait_for(lambda: batcher.in_flight == 0 and batcher.queue_depth == 0, what="nothing in flight")
    wait_for(lambda: srv.task_count() == baseline_tasks, what="no leftover asyncio tasks")
    m = srv.metrics()
    assert m[("resnet_serve_queue_depth", ())] == 0 and m[("resnet_serve_in_flight_requests", ())] == 0
    assert srv.stub.Classify(tagged(1), timeout=30).request_id == "1"


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_soak_mixed_traffic_above_capacity(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """10,000 requests: valid, malformed, oversized, cancelled and deadline-expired, 96 at a time against a
    queue of 32: every request gets exactly one answer with a code its kind allows; nothing is left inside.
    The worker is held until the first RESOURCE_EXHAUSTED, so the run is above capacity on any machine (a fast
    one drained a queue of 32 faster than 96 clients filled it: no refusal, nothing proven)."""
    with gated_workers(tmp_path / "gate") as gate:
        gate.open()  # warm-up passes
        srv = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1, max_batch_size=8,
                              max_queue_delay_us=1000, max_queue_size=32, max_pixels=1_000_000)
        try:
            gate.hold()
            valid = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8).tobytes()
            oversized = _png(1200, 1000)
            tensor = pb.Tensor(dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE, 3], data=valid)
            kinds = {
                "valid": ({"OK", "RESOURCE_EXHAUSTED"}, pb.ClassifyRequest(tensor=tensor)),
                "malformed": ({"INVALID_ARGUMENT"}, pb.ClassifyRequest(encoded=b"\xff\xd8\xff broken jpeg")),
                "oversized": ({"INVALID_ARGUMENT"}, pb.ClassifyRequest(encoded=oversized)),
                "deadline": ({"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "OK"}, None),
                "cancelled": ({"CANCELLED", "OK", "RESOURCE_EXHAUSTED"}, None),
            }
            kinds["deadline"] = (kinds["deadline"][0], kinds["valid"][1])
            kinds["cancelled"] = (kinds["cancelled"][0], kinds["valid"][1])
            order = ["valid"] * 6 + ["malformed", "oversized", "deadline", "cancelled"]
            n = 10_000
            rss_start = rss_mb()
            worker_start = rss_mb(srv.engine.worker_pids()[0])

            async def soak() -> list[tuple[str, str]]:
                sem = asyncio.Semaphore(96)
                refused = asyncio.Event()

                async def release_when_full() -> None:
                    await refused.wait()
                    gate.open()
                async with grpc.aio.insecure_channel(srv.address) as channel:
                    stub = pb_grpc.ClassifierStub(channel)

                    async def one(i: int) -> tuple[str, str]:
                        kind = order[i % len(order)]
                        async with sem:
                            timeout = 0.001 if kind == "deadline" else 120
                            call = stub.Classify(kinds[kind][1], timeout=timeout)
                            if kind == "cancelled":
                                await asyncio.sleep(0)  # let the call start, then hang up
                                call.cancel()
                            try:
                                await call
                                return kind, "OK"
                            except asyncio.CancelledError:
                                return kind, "CANCELLED"
                            except grpc.RpcError as e:
                                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                                    refused.set()
                                return kind, e.code().name

                    releaser = asyncio.create_task(release_when_full())
                    try:
                        return await asyncio.gather(*(one(i) for i in range(n)))
                    finally:
                        releaser.cancel()
                        gate.open()

            results = asyncio.run(soak())
            assert len(results) == n
            wrong = [(k, code) for k, code in results if code not in kinds[k][0]]
            assert not wrong, Counter(wrong).most_common(5)
            wait_for(lambda: srv.server.batcher.in_flight == 0 and srv.server.batcher.queue_depth == 0,
                     what="an empty server")
            m = srv.metrics()
            invalid = sum(1 for k, _ in results if k in ("malformed", "oversized"))
            assert m[("resnet_serve_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Classify"),
                                                      ("model", "tiny"), ("version", "1")))] == invalid
            assert m[("resnet_serve_queue_depth", ())] == 0 and m[("resnet_serve_in_flight_requests", ())] == 0
            codes = Counter(code for _, code in results)
            rss_end, worker_end = rss_mb(), rss_mb(srv.engine.worker_pids()[0])
            with capsys.disabled():
                print(f"\nsoak: {dict(codes)}; front+client RSS {rss_start:.0f} -> {rss_end:.0f} MB, "
                      f"worker RSS {worker_start:.0f} -> {worker_end:.0f} MB")
            assert codes["OK"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0  # it really was above capacity
            assert rss_end - rss_start < 50 and worker_end - worker_start < 50
            assert srv.stub.Classify(kinds["valid"][1], timeout=30).predictions
        finally:
            gate.open()
            srv.close()


def test_hot_reload_under_load(tmp_path: Path) -> None:
    models = tmp_path / "tiny"
    make_tiny_model_dir(models, version=1, seed=0)
    srv = InProcessServer(model_dir=str(models), threads_per_instance=1, max_batch_size=4)
    try:
        seen: list[list[str]] = [[] for _ in range(3)]
        failures: list[str] = []
        stop = threading.Event()

        def client(k: int) -> None:
            with grpc.insecure_channel(srv.address) as ch:
                stub = pb_grpc.ClassifierStub(ch)
                while not stop.is_set():
                    try:
                        seen[k].append(stub.Classify(tagged(k), timeout=60).model_version)
                    except grpc.RpcError as e:
                        failures.append(f"{e.code().name}: {e.details()}")

        def count(version: str) -> int:
            return sum(s.count(version) for s in seen)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: count("1") >= 30, what="traffic on version 1")
            make_tiny_model_dir(models, version=2, seed=1)
            changed, message = srv.call(srv.server.reload(), timeout=300)
            assert changed and "to 2" in message
            wait_for(lambda: count("2") >= 30, what="traffic on version 2")
            shutil.copytree(models / "2", models / "3")
            (models / "3" / "inference.pdiparams").write_bytes(b"corrupt")
            from resnet_serve.server.app import ReloadRefused

            with pytest.raises(ReloadRefused, match="failed to load"):
                srv.call(srv.server.reload(), timeout=300)
            before = count("2")
            wait_for(lambda: count("2") >= before + 30, what="traffic still on version 2")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not failures, failures[:5]
        for versions in seen:
            changes = sum(1 for a, b in zip(versions, versions[1:], strict=False) if a != b)
            assert versions[0] == "1" and versions[-1] == "2" and changes == 1
        assert srv.engine.manifest.version == 2 and srv.engine.alive_instances() == 1
    finally:
        srv.close()
