"""A hung worker (a real worker process, SIGSTOPped) is noticed: its batch is answered UNAVAILABLE once the batch
time limit passes, the worker is killed and replaced, and health says NOT_SERVING while no worker can take work.
SIGTERM ends the server within its grace period plus a few seconds even while the worker is stopped. Outcomes are
asserted by events (status codes, health transitions, worker pids), not by how long anything took."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc
from resnet_serve.server.worker_pool import BATCH_LIMIT_FLOOR_S
from tests.harness import InProcessServer, scrape, start_subprocess_server, wait_for

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
LIMIT_S = 5.0  # short enough for a test, long enough for any tiny-model batch on a loaded machine


def request(i: int) -> pb.ClassifyRequest:
    arr = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[32, 32, 3], data=arr.tobytes()),
                              request_id=str(i))


def watch_health(channel: grpc.Channel) -> tuple[queue.Queue, grpc.Future]:
    """Every status the server's Health.Watch stream reports, in order."""
    statuses: queue.Queue = queue.Queue()
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

    def pump() -> None:
        try:
            for r in call:
                statuses.put(r.status)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()
    return statuses, call


def next_status(statuses: queue.Queue, want: int) -> None:
    """Read health updates until `want` arrives (every update before it is skipped)."""
    while statuses.get(timeout=120) != want:
        pass


def test_a_stopped_worker_is_killed_after_the_batch_time_limit_and_replaced(tiny_model_dir: Path) -> None:
    srv = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1, max_batch_size=1,
                          batch_time_limit_s=LIMIT_S)
    statuses, watch = watch_health(srv.channel)
    try:
        next_status(statuses, SERVING)
        assert srv.engine.batch_time_limit_s == LIMIT_S
        old_pid = srv.engine.worker_pids()[0]
        os.kill(old_pid, signal.SIGSTOP)
        calls = len(srv.call_log)
        doomed = srv.stub.Classify.future(request(0))  # no deadline: it must still get an answer
        wait_for(lambda: len(srv.call_log) == calls + 1, what="the batch sent to the stopped worker")
        with pytest.raises(grpc.RpcError) as err:
            doomed.result(timeout=300)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "batch time limit" in err.value.details() and str(old_pid) in err.value.details()
        next_status(statuses, NOT_SERVING)  # no worker can take work until the replacement is warm
        next_status(statuses, SERVING)
        new_pid = srv.engine.worker_pids()[0]
        assert new_pid != old_pid and srv.engine.alive_instances() == 1
        with pytest.raises(ProcessLookupError):
            os.kill(old_pid, 0)  # killed (SIGKILL ends a stopped process too) and reaped
        assert srv.stub.Classify(request(1), timeout=120).request_id == "1"
        m = srv.metrics()
        assert m[("resnet_serve_worker_restarts_total", ())] == 1 and m[("resnet_serve_workers_alive", ())] == 1
    finally:
        watch.cancel()
        srv.close()


def test_the_default_batch_time_limit_comes_from_the_warm_up(tiny_model_dir: Path) -> None:
    srv = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1, max_batch_size=2)
    try:
        engine = srv.engine
        assert engine.batch_time_limit_s == max(BATCH_LIMIT_FLOOR_S, 10 * engine.warmup_seconds)
    finally:
        srv.close()


def worker_pids_of(pid: int) -> list[int]:
    """The engine worker processes among a server's children (multiprocessing spawn children, not its
    resource tracker)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                out.append(int(child))
    return out


def test_sigterm_exits_within_the_grace_period_while_the_worker_is_stopped(tiny_model_dir: Path) -> None:
    """The issue's case: a worker SIGSTOPped while it holds a batch, then SIGTERM. The exit must not wait for
    SIGCONT (nor for the batch time limit, set far away here)."""
    grace = 2.0
    proc, ports = start_subprocess_server("--model-dir", str(tiny_model_dir), "--max-batch-size", "1",
                                          "--threads-per-instance", "1", "--grace-period-s", str(grace),
                                          "--batch-time-limit-s", "3600")
    workers: list[int] = []
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['port']}")
        statuses, watch = watch_health(channel)
        next_status(statuses, SERVING)
        health_channel = grpc.insecure_channel(f"127.0.0.1:{ports['health_port']}")
        health_port, health_watch = watch_health(health_channel)  # the dedicated health port
        next_status(health_port, SERVING)
        workers = worker_pids_of(proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGSTOP)
        held = pb_grpc.ClassifierStub(channel).Classify.future(request(0))  # no deadline
        wait_for(lambda: scrape(ports["metrics_port"])[("resnet_serve_in_flight_requests", ())] == 1,
                 what="the request inside the server")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=grace + 60)  # the bound below is the behaviour; this only stops a hang
        elapsed = time.monotonic() - t0
        assert code == 0
        assert elapsed < grace + 10, f"exit took {elapsed:.1f} s with a {grace} s grace period"
        next_status(health_port, NOT_SERVING)  # the drain was published on the health port before it closed
        with pytest.raises(grpc.RpcError):  # answered (cancelled by the shutdown), never left hanging
            held.result(timeout=60)
        assert not Path(f"/proc/{workers[0]}").exists()  # the stopped worker was killed, not orphaned
        watch.cancel()
        health_watch.cancel()
        channel.close()
        health_channel.close()
    finally:
        for pid in workers:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
