"""server/resnet_serve/server/metrics.py without a model: what MetricsObserver records from the real batcher, and
the bound on the metrics port's connections. (The metrics of a serving server: tests/integration/test_metrics.py.)"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from urllib.error import HTTPError
from urllib.request import urlopen

import numpy as np
import pytest

from resnet_serve.server.app import MetricsObserver
from resnet_serve.server.batcher import Batcher, BatchPolicy, DeadlineExpired, QueueFull
from resnet_serve.server.metrics import Metrics, MetricsHTTPServer
from tests.harness import wait_for

P = "resnet_serve_"


def test_observer_counts_drain_batches_and_refusals() -> None:
    """MetricsObserver under the real batcher with a runner the test blocks: the "drain" flush reason and the
    refusals at submit ("deadline" already past, "queue_full"), which no gRPC timing can make exact."""
    metrics = Metrics(max_batch_size=4)
    go = threading.Event()
    running = threading.Event()

    def runner(x: np.ndarray) -> np.ndarray:
        running.set()
        go.wait(30)
        return np.zeros((len(x), 2), np.float32)

    async def scenario() -> None:
        b = Batcher([runner], BatchPolicy(max_batch_size=4, max_queue_delay_us=0, max_queue_size=3),
                    MetricsObserver(metrics))
        await b.start()
        item = np.zeros((3, 2, 2), np.float32)
        first = asyncio.create_task(b.submit(item))
        await asyncio.get_running_loop().run_in_executor(None, running.wait, 30)
        with pytest.raises(DeadlineExpired):
            await b.submit(item, deadline=time.monotonic() - 1)
        queued = [asyncio.create_task(b.submit(item)) for _ in range(3)]
        deadline = time.monotonic() + 30
        while b.queue_depth < 3:
            assert time.monotonic() < deadline, "requests never queued"
            await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit(item)
        # What the server's queue_depth and in_flight_requests gauges read at scrape time (Server wires them to
        # the live batchers; this observer never writes them): 3 queued, 4 accepted and unanswered.
        assert (b.queue_depth, b.in_flight) == (3, 4)
        drain = asyncio.create_task(b.drain())
        await asyncio.sleep(0)
        go.set()
        await asyncio.gather(first, *queued, drain)
        assert (b.queue_depth, b.in_flight) == (0, 0)
        await b.stop()

    try:
        asyncio.run(scenario())
    finally:
        go.set()

    def v(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(P + name, labels) or 0.0

    assert [v("batches_total", reason=r) for r in ("idle", "full", "delay", "drain")] == [1, 0, 0, 2]
    assert (v("batch_size_sum"), v("batch_size_count"), v("queue_wait_seconds_count")) == (4, 3, 4)
    assert [v("dropped_requests_total", reason=r) for r in ("deadline", "cancelled", "queue_full")] == [1, 0, 1]
    assert v("inference_duration_seconds_count") == 3 and not math.isnan(v("inference_duration_seconds_sum"))


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_port_bounds_its_connections() -> None:
    """Idle connections beyond the bound are closed at once, so they cannot pile up threads; once they go,
    /healthz answers again."""
    httpd = Metrics().serve_http(0, "127.0.0.1", lambda: True)
    port, bound = httpd.server_port, MetricsHTTPServer.MAX_CONNECTIONS
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(bound + 10)]
    try:
        wait_for(lambda: httpd.refused == 10, timeout=30, what="the connections over the bound to be refused")
        assert all(s.recv(1) == b"" for s in idle[bound:])  # closed by the server
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: http_get_or_none(port) == 200, timeout=30, what="/healthz after the idle connections left")
    httpd.shutdown()
    httpd.server_close()


def http_get_or_none(port: int) -> int | None:
    try:
        return http_get(port, "/healthz")[0]
    except OSError:
        return None
