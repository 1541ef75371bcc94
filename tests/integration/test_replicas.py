"""Many replicas without a proxy: one client, round_robin over three `resnet-serve` processes on loopback.

What a client does against a headless Service (docs/deploy.md), with the addresses given directly: calls spread
evenly over every replica, and when one replica dies mid-run (SIGKILL: a crash, an OOM kill, a lost node) the
calls it held fail with UNAVAILABLE and the client's retries carry them to the others, so no request is lost.

SIGKILL rather than SIGTERM: a graceful drain answers what the server accepted, but a call that reaches the server
in the instant grpc's shutdown starts, before a handler picks it up, is answered CANCELLED (grpc/grpc#41785), which
the client does not retry; see docs/deploy.md.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from resnet_serve.client.sync import ClassifierClient, RetryPolicy
from tests.harness import scrape, start_subprocess_server

REPLICAS = 3
REQUESTS = 300
IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def classify_ok(metrics_port: int) -> int:
    """This replica's resnet_serve_requests_total{method="Classify",code="OK"}."""
    return int(scrape(metrics_port).get(("resnet_serve_requests_total", (("code", "OK"), ("method", "Classify"),
                                                                          ("model", "tiny"), ("version", "1"))), 0))


@pytest.fixture
def replicas(tiny_model_dir: Path):
    """Three `resnet-serve` subprocesses on free loopback ports, each SERVING; stopped (and reaped) at the end."""
    procs: list[tuple[subprocess.Popen, dict]] = []
    try:
        for _ in range(REPLICAS):  # all start loading before we wait for any
            procs.append(start_subprocess_server("--model-dir", str(tiny_model_dir), "--threads-per-instance", "1",
                                                 "--max-batch-size", "4", "--grace-period-s", "20"))
        for _, ports in procs:
            with ClassifierClient(f"127.0.0.1:{ports['port']}") as c:
                c.wait_until_ready(timeout=120)
        yield procs
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def connect_every_replica(client: ClassifierClient, ports: list[int], limit: int = 200) -> None:
    """Classify until each replica has answered at least once: round_robin only picks subchannels that are READY,
    so from then on it cycles over all of them. Bounded by `limit` calls."""
    for _ in range(limit):
        client.classify(IMAGE)
        if all(classify_ok(p) > 0 for p in ports):
            return
    raise AssertionError(f"not every replica was reached in {limit} calls: {[classify_ok(p) for p in ports]}")


def test_round_robin_spreads_calls_and_survives_a_replica_stopping(replicas) -> None:
    metrics_ports = [ports["metrics_port"] for _, ports in replicas]
    addresses = [f"127.0.0.1:{ports['port']}" for _, ports in replicas]
    # Retries generous enough to outlast a replica's drain; all inside each call's 30 s deadline.
    with ClassifierClient(addresses, retry=RetryPolicy(attempts=8, initial_backoff_s=0.05, max_backoff_s=0.5),
                          timeout=30) as client:
        assert client.target.startswith("ipv4:") and client.options.load_balancing == "round_robin"
        connect_every_replica(client, metrics_ports)

        # 1. Even spread: 300 sequential calls, counted by each replica's own request metric.
        before = [classify_ok(p) for p in metrics_ports]
        for _ in range(REQUESTS):
            assert client.classify(IMAGE).predictions
        served = [classify_ok(p) - b for p, b in zip(metrics_ports, before, strict=True)]
        assert sum(served) == REQUESTS
        assert min(served) >= 60, served

        # 2. Kill one replica while 4 threads have calls to make: no call may fail. The callers pause (no call in
        # flight) just while the victim's count is read and it is killed, so the accounting below is exact.
        before = [classify_ok(p) for p in metrics_ports]
        third = threading.Event()
        counter = iter(range(1, REQUESTS + 1))
        cond = threading.Condition()
        state = {"paused": False, "in_flight": 0}

        def call(_: int) -> int:
            with cond:
                cond.wait_for(lambda: not state["paused"])
                state["in_flight"] += 1
            try:
                result = client.classify(IMAGE)
            finally:
                with cond:
                    state["in_flight"] -= 1
                    if next(counter) == REQUESTS // 3:
                        third.set()
                    cond.notify_all()
            return len(result.predictions)

        victim, _ = replicas[-1]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(call, i) for i in range(REQUESTS)]
            assert third.wait(60), "a third of the calls did not complete"
            with cond:
                state["paused"] = True
                assert cond.wait_for(lambda: state["in_flight"] == 0, timeout=60)
            victim_served = classify_ok(metrics_ports[-1]) - before[-1]
            victim.kill()
            victim.wait(60)
            with cond:
                state["paused"] = False
                cond.notify_all()
            errors = [f.exception(timeout=60) for f in futures]
        _, victim_log = victim.communicate(timeout=60)
        assert [e for e in errors if e is not None] == [], victim_log[-3000:]
        assert all(f.result() > 0 for f in futures)
        assert victim.returncode == -signal.SIGKILL
        assert victim_served > 0  # it really was serving when it was killed
        survivors = [classify_ok(p) - b for p, b in zip(metrics_ports[:-1], before[:-1], strict=True)]
        # The survivors took every call the victim had not answered before it was killed.
        assert sum(survivors) == REQUESTS - victim_served, survivors
        assert min(survivors) > 0, survivors
        assert all(classify_ok(p) > 0 for p in metrics_ports[:-1])  # survivors still serve
