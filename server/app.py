"""Wires the server together: engine workers -> batcher -> pipeline -> gRPC servicer, plus health, reflection,
/metrics, and the drain sequence. The one module that knows every part."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from resnet_serve.modeldir import resolve_version_dir
from resnet_serve.protos import classifier_pb2, classifier_pb2_grpc

from .batcher import Batcher, BatcherObserver, BatchPolicy
from .engine import Engine, EngineConfig, EngineError, WorkerDied
from .metrics import Metrics
from .pipeline import ModelDescription, Pipeline
from .preprocess import Preprocessor
from .service import ClassifierService
from .settings import Settings

log = logging.getLogger(__name__)
SERVICE_NAME = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class MetricsObserver(BatcherObserver):
    """The batcher's events -> Prometheus."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def on_queue_depth(self, depth: int) -> None:
        self.m.queue_depth.set(depth)

    def on_dropped(self, reason: str) -> None:
        self.m.dropped.labels(reason).inc()

    def on_batch(self, size: int, reason: str, queue_waits_s: list[float]) -> None:
        self.m.batches.labels(reason).inc()
        self.m.batch_size.observe(size)
        for w in queue_waits_s:
            self.m.queue_wait.observe(w)

    def on_batch_done(self, size: int, seconds: float, ok: bool) -> None:
        self.m.inference.observe(seconds)
        if not ok:
            self.m.batch_failures.inc()

    def on_in_flight(self, n: int) -> None:
        self.m.in_flight.set(n)


class Server:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.version_dir = resolve_version_dir(Path(settings.model_dir), settings.version)
        self.metrics = Metrics(settings.max_batch_size)
        self.service = ClassifierService(self.metrics, {EngineError: grpc.StatusCode.INTERNAL,
                                                        WorkerDied: grpc.StatusCode.UNAVAILABLE},
                                         max_stream_in_flight=settings.max_stream_in_flight)
        self.health = health.aio.HealthServicer()
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        self.grpc_server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_http = None
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Listen at once (health NOT_SERVING), then load and warm the model in the background."""
        s = self.settings
        if s.metrics_port >= 0:
            self._metrics_http, _ = self.metrics.serve_http(s.metrics_port)
            self.metrics_port = self._metrics_http.server_port
        options = [("grpc.max_receive_message_length", s.max_message_bytes),
                   ("grpc.max_send_message_length", s.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.grpc_server = grpc.aio.server(options=options)
        classifier_pb2_grpc.add_ClassifierServicer_to_server(self.service, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.grpc_server)
        self.port = self.grpc_server.add_insecure_port(f"{s.host}:{s.port}")
        if not self.port:
            raise OSError(f"cannot listen on {s.host}:{s.port}")
        await self._set_health(NOT_SERVING)
        await self.grpc_server.start()
        log.info("listening on %s:%d (gRPC), metrics on :%s; loading %s", s.host, self.port,
                 self.metrics_port if s.metrics_port >= 0 else "off", self.version_dir)
        print(json.dumps({"event": "listening", "port": self.port, "metrics_port": self.metrics_port}), flush=True)
        self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            engine = Engine(EngineConfig(version_dir=self.version_dir, instances=s.instances,
                                         threads_per_instance=s.threads_per_instance, device=s.device,
                                         precision=s.precision, engine=s.engine, max_batch_size=s.max_batch_size,
                                         buckets=s.bucket_sizes(),
                                         trt_cache_dir=Path(s.trt_cache_dir) if s.trt_cache_dir else None))
            engine.on_worker_event = lambda event, i: loop.call_soon_threadsafe(self._worker_event, event, i)
            self.engine = engine
            await loop.run_in_executor(None, engine.start)
            m = engine.manifest
            self.metrics.model_load.set(engine.load_seconds)
            self.metrics.model_warmup.set(engine.warmup_seconds)
            self.metrics.workers_alive.set(engine.alive_instances())
            self.metrics.model_info.info({"name": m.name, "version": str(m.version), "precision": s.precision
                                          if s.precision != "fp32" else m.precision, "device": s.device,
                                          "engine": s.engine if s.engine != "paddle" else m.engine,
                                          "architecture": m.architecture})
            self.batcher = Batcher(engine.runners(), BatchPolicy(s.max_batch_size, s.max_queue_delay_us,
                                                                 s.max_queue_size, s.bucket_sizes()),
                                   MetricsObserver(self.metrics))
            await self.batcher.start()
            model = ModelDescription(
                name=m.name, version=str(m.version), architecture=m.architecture, input_shape=engine.input_shape,
                num_classes=m.num_classes, precision=s.precision if s.precision != "fp32" else m.precision,
                max_batch_size=s.max_batch_size, device=s.device, engine=s.engine, mean=tuple(m.mean),
                std=tuple(m.std))
            preprocessor = Preprocessor(tuple(m.input_size), tuple(m.mean), tuple(m.std), s.max_pixels)
            self.service.pipeline = Pipeline(self.batcher, preprocessor, engine.labels, model, self.metrics,
                                             self.pool)
            await self._set_health(SERVING)
            self.ready.set()
            log.info("serving %s v%s (%s): load %.2f s, warm-up %.2f s of buckets %s", m.name, m.version,
                     m.architecture, engine.load_seconds, engine.warmup_seconds, list(s.bucket_sizes()))
        except BaseException as e:
            self.failed = e
            log.error("model failed to load: %s", e)
            self.ready.set()

    def _worker_event(self, event: str, index: int) -> None:
        engine = self.engine
        alive = engine.alive_instances() if engine else 0
        self.metrics.workers_alive.set(alive)
        if event == "restarted":
            self.metrics.worker_restarts.inc()
        log.warning("engine worker %d %s; %d alive", index, event, alive)
        if self.ready.is_set() and not self.failed and not getattr(self, "_draining", False):
            asyncio.ensure_future(self._set_health(SERVING if alive else NOT_SERVING))

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, answer everything accepted, then stop workers."""
        grace = self.settings.grace_period_s if grace is None else grace
        self._draining = True
        await self._set_health(NOT_SERVING)
        t0 = time.perf_counter()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace)
        if self.batcher is not None:
            await self.batcher.drain()
            await self.batcher.stop()
        if hasattr(self, "_loader") and not self._loader.done():
            self._loader.cancel()
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        log.info("stopped after a %.2f s drain", time.perf_counter() - t0)


async def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, then drain; 0 on a clean exit."""
    import signal

    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, server._loader}, return_when=asyncio.FIRST_COMPLETED)
    if server.failed:
        await server.stop(0)
        return 1
    await stop.wait()
    log.info("signal received: draining (grace %.0f s)", settings.grace_period_s)
    await server.stop()
    return 0


def main_with(settings: Settings) -> int:
    log.info("effective configuration:\n%s", settings.describe())
    try:
        return asyncio.run(run(settings))
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    finally:
        sys.stdout.flush()
