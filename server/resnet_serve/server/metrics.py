"""Every Prometheus metric the server exports, defined once (docs/metrics.md explains each; the Grafana
dashboard in deploy/ uses exactly these names). One registry per server, so tests can run several."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "resnet_serve"
# Latencies from 0.5 ms to 30 s: loopback unary calls on tiny models through ResNet-50 batches on 2 cores.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Queue waits start near zero (idle dispatch) and sit around max_queue_delay_us (default 2 ms) under load.
QUEUE_WAIT_BUCKETS = (0.0001, 0.00025, *LATENCY_BUCKETS)
PREPROCESS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Label values created at start so rate() and the dashboard have series before the first event of each kind.
METHODS = ("Classify", "ClassifyStream", "GetModelInfo", "ModelInfer", "ModelStreamInfer")
FLUSH_REASONS = ("full", "delay", "idle", "drain")
DROP_REASONS = ("deadline", "cancelled", "queue_full", "preprocess_full")


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """One bucket per possible size up to 16, powers of two beyond: exact batch-size distribution."""
    sizes = list(range(1, min(max_batch_size, 16) + 1))
    b = 32
    while sizes[-1] < max_batch_size:
        sizes.append(min(b, max_batch_size))
        b *= 2
    return tuple(float(s) for s in sizes)


class Metrics:
    """The server's metrics in their own registry (not the global one), so several servers fit in one test process."""

    def __init__(self, max_batch_size: int = 64, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(f"{PREFIX}_requests_total", "Requests answered, by RPC method, gRPC status code and "
                                "the model name and version serving (a stream item counts as one request of "
                                "method ClassifyStream)", ["method", "code", "model", "version"], registry=r)
        self.request_latency = Histogram(f"{PREFIX}_request_duration_seconds",
                                         "End-to-end time of one image request inside the server, by method and "
                                         "the model name and version that answered",
                                         ["method", "model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        # (name, version) of the model serving now: the model/version labels of requests that name no version
        # (errors). Set from what is loaded, never from a request: clients cannot grow the label sets.
        self.serving = ("", "")
        # Labelled children by label values, as record_request and preprocess_of use them (bounded like the
        # labels: methods x codes x versions served; input kinds).
        self._request_series: dict[tuple[str, str, str, str], Counter] = {}
        self._latency_series: dict[tuple[str, str, str], Histogram] = {}
        self._preprocess_series: dict[str, Histogram] = {}
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds",
                                    "Time from entering the batch queue to being dispatched in a batch (requests "
                                    "dropped while queued are counted in dropped_requests_total instead)",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.preprocess = Histogram(f"{PREFIX}_preprocess_duration_seconds",
                                    "Decode/validate/resize/normalise time of one image", ["kind"],
                                    buckets=PREPROCESS_BUCKETS, registry=r)
        self.inference = Histogram(f"{PREFIX}_inference_duration_seconds",
                                   "Wall time of one batch in a worker, shared-memory round trip included (and, with "
                                   "--batches-in-flight 2, any wait behind the batch computing ahead of it)",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Images per batch sent to a predictor",
                                    buckets=batch_size_buckets(max_batch_size), registry=r)
        self.batches = Counter(f"{PREFIX}_batches_total",
                               "Batches dispatched, by why they closed: full, delay (oldest waited the max queue "
                               "delay), idle (lone request on an idle server), drain (shutdown)",
                               ["reason"], registry=r)
        self.batch_failures = Counter(f"{PREFIX}_batch_failures_total", "Batches whose inference failed",
                                      registry=r)
        self.dropped = Counter(f"{PREFIX}_dropped_requests_total",
                               "Requests dropped before compute: deadline, cancelled, queue_full, preprocess_full",
                               ["reason"], registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting in the batch queue", registry=r)
        self.in_flight = Gauge(f"{PREFIX}_in_flight_requests",
                               "Image requests accepted and not yet answered (queued or computing)", registry=r)
        self.stream_items = Gauge(f"{PREFIX}_stream_items_held",
                                  "Stream items read and whose answer is not sent yet, over all streams (at most "
                                  "max_stream_in_flight per stream)", registry=r)
        self.preprocess_queue = Gauge(f"{PREFIX}_preprocess_queue_depth",
                                      "Images waiting for a preprocess (decode) thread or being preprocessed",
                                      registry=r)
        self.preprocess_queue_bytes = Gauge(f"{PREFIX}_preprocess_queue_bytes",
                                            "Payload bytes held by the images in preprocess_queue_depth", registry=r)
        self.model_load = Gauge(f"{PREFIX}_model_load_seconds", "Time to create the predictors of the served model",
                                registry=r)
        self.model_warmup = Gauge(f"{PREFIX}_model_warmup_seconds", "Time to warm every batch-size bucket",
                                  registry=r)
        self.workers_alive = Gauge(f"{PREFIX}_workers_alive", "Engine worker processes ready to compute",
                                   registry=r)
        self.worker_restarts = Counter(f"{PREFIX}_worker_restarts_total", "Engine worker processes restarted",
                                       registry=r)
        self.model_info = Info(f"{PREFIX}_model", "The model being served", registry=r)
        for reason in FLUSH_REASONS:
            self.batches.labels(reason)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)

    def model_published(self, name: str, version: str) -> None:
        """A model version now serves: its OK series exist from now on, at 0, so rate() works at once."""
        self.serving = (name, version)
        for method in METHODS:
            self.requests.labels(method, "OK", name, version)

    def record_request(self, method: str, code: str, seconds: float | None, version: str | None = None) -> None:
        """One answered request; `version` is the one that computed it (a reload may have switched since),
        default the serving one. seconds None: counted, not timed (GetModelInfo)."""
        model, serving = self.serving
        key = (method, code, model, version or serving)
        counter = self._request_series.get(key)
        if counter is None:  # labels() locks and checks every value: once per series, not per request
            counter = self._request_series[key] = self.requests.labels(*key)
        counter.inc()
        if seconds is not None:
            timed = key[0], key[2], key[3]
            latency = self._latency_series.get(timed)
            if latency is None:  # created by the first timed request only: an untimed method has no series
                latency = self._latency_series[timed] = self.request_latency.labels(*timed)
            latency.observe(seconds)

    def preprocess_of(self, kind: str) -> Histogram:
        """The preprocess histogram of one input kind (encoded, uint8, float32), looked up once."""
        child = self._preprocess_series.get(kind)
        if child is None:
            child = self._preprocess_series[kind] = self.preprocess.labels(kind)
        return child

    def watch_workers(self, workers: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        """Export CPU seconds and resident memory of the engine worker processes: `workers` gives (model version,
        worker index, pid) of every live worker at scrape time."""
        self.registry.register(WorkerCollector(workers))

    def serve_http(self, port: int, addr: str, ready: Callable[[], bool],
                   others: Callable[[], Iterable[tuple[int, bytes]]] | None = None) -> MetricsHTTPServer:
        """Serve /metrics, /healthz and /readyz on addr:port from a daemon thread; OSError if it cannot bind.
        ``others`` (--front-processes > 1): the other fronts' expositions at scrape time, merged with ours."""
        return serve_http(self.registry if others is None else FrontsView(self.registry, others), port, addr, ready)

    def exposition(self) -> bytes:
        """This registry in the Prometheus text format (what a secondary front hands the first one)."""
        return generate_latest(self.registry)


class FrontsView:
    """/metrics of several front processes as one exposition: each front's samples with a label front="i" (the
    first front is 0), in one family per name. Always the classic text format: every front's exposition is read
    back through prometheus_client's parser, which speaks it."""

    def __init__(self, own: CollectorRegistry, others: Callable[[], Iterable[tuple[int, bytes]]]):
        self.own, self.others = own, others

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for index, text in [(0, generate_latest(self.own)), *self.others()]:
            for family in text_string_to_metric_families(text.decode()):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
                for s in family.samples:
                    into.add_sample(s.name, {**s.labels, "front": str(index)}, s.value, s.timestamp, s.exemplar)
        yield from merged.values()


class WorkerCollector:
    """Per engine worker: CPU seconds and resident memory, read from /proc when scraped. The workers run the
    predictors (where the CPU goes) but have no metrics port of their own; labels worker (index, bounded by
    --instances) and version (bounded by the versions loaded side by side during a reload)."""

    CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
    PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, workers: Callable[[], Iterable[tuple[str, int, int]]]):
        self.workers = workers

    def _families(self) -> tuple[CounterMetricFamily, GaugeMetricFamily]:
        labels = ["worker", "version"]
        return (CounterMetricFamily(f"{PREFIX}_worker_cpu_seconds", "User and system CPU time of each engine worker "
                                    "process (resets when a worker restarts)", labels=labels),
                GaugeMetricFamily(f"{PREFIX}_worker_resident_memory_bytes",
                                  "Resident memory of each engine worker process", labels=labels))

    def describe(self) -> Iterator[Metric]:  # names only: registering must not read /proc of workers not started
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        cpu, rss = self._families()
        for version, index, pid in self.workers():
            figures = self.read(pid)
            if figures is not None:
                cpu.add_metric([str(index), version], figures[0])
                rss.add_metric([str(index), version], figures[1])
        yield cpu
        yield rss

    @classmethod
    def read(cls, pid: int) -> tuple[float, float] | None:
        """(CPU seconds, resident bytes) of a process, or None if it is gone."""
        if pid <= 0:
            return None
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/statm") as f:
                resident_pages = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            return None
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": fields 3 (state) onwards
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) / cls.CLOCK_TICKS, float(resident_pages * cls.PAGE_SIZE)


HANDLER_TIMEOUT_S = 10.0  # a scrape or probe sends its request at once; a silent connection is closed


class _Handler(BaseHTTPRequestHandler):
    """GET /metrics (the exposition), /healthz (200 while the process answers), /readyz (200 when the gRPC health
    is SERVING, else 503); 404 for any other path, so a mistyped probe fails loudly instead of scraping."""

    registry: CollectorRegistry | FrontsView
    ready: Callable[[], bool]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            accept = "" if isinstance(self.registry, FrontsView) else self.headers.get("Accept", "")
            encoder, content_type = choose_encoder(accept)
            self._reply(200, encoder(self.registry), content_type)
        elif path == "/healthz":
            self._reply(200, b"ok\n")
        elif path == "/readyz":
            ok = self.ready()
            self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (scrapes every few seconds: no access log)
        pass


class MetricsHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS at once (more are closed at once, and counted), each
    closed after HANDLER_TIMEOUT_S of silence: idle or slow clients cannot pile up threads."""

    daemon_threads = True
    MAX_CONNECTIONS = 16

    def __init__(self, *args, **kwargs):
        self.slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        self.refused = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve_http(registry: CollectorRegistry | FrontsView, port: int, addr: str,
               ready: Callable[[], bool]) -> MetricsHTTPServer:
    host = addr.strip("[]")
    handler = type("Handler", (_Handler,), {"registry": registry, "ready": staticmethod(ready),
                                            "timeout": HANDLER_TIMEOUT_S})
    server_cls = type("MetricsHTTPServer", (MetricsHTTPServer,),
                      {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    httpd = server_cls((host, port), handler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd
