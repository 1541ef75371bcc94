"""Wires the server together: engine workers -> batcher -> pipeline -> ServingHandle -> gRPC servicers (classifier.v1
and the Open Inference Protocol), plus health (on the main port and the dedicated health port), reflection,
/metrics, and the drain sequence. The one module that knows every part; the servicers know only the handle it
builds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from resnet_serve.common.modeldir import ModelDirError, list_versions, resolve_version_dir
from resnet_serve.protos import classifier_pb2, classifier_pb2_grpc

from . import serving_model
from .admission import PreprocessPool
from .auth import AdminGuard, BearerTokenInterceptor, load_tokens, server_credentials
from .batcher import BatcherObserver
from .engine import Engine, EngineError, WorkerDied
from .errors import ErrorTable
from .fronts import FrontMain, Fronts, FrontSpec, secondary_settings
from .handle import ServingConfig, ServingHandle
from .health_port import HealthPort
from .memory import MemorySweeper
from .metrics import Metrics
from .oip_service import OIP_PARSERS, OIPService, add_oip_service
from .service import ClassifierService
from .serving_model import LoadedModel, Runner
from .settings import Settings
from .wire import RequestGuard

log = logging.getLogger(__name__)
SERVICE_NAME = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
ADMIN_NAME = classifier_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class MetricsObserver(BatcherObserver):
    """The batcher's events -> Prometheus. Queue depth and in-flight are not pushed from here: the Server reads
    them at scrape time across every live batcher (two during a reload)."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

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


class HealthTrackingObserver(MetricsObserver):
    """Metrics, plus health: an engine whose batches keep failing is NOT_SERVING until a batch succeeds."""

    def __init__(self, metrics: Metrics, threshold: int, on_change: Callable[[bool], None]):
        super().__init__(metrics)
        self.threshold, self.on_change = threshold, on_change
        self.consecutive_failures = 0

    def on_batch_done(self, size: int, seconds: float, ok: bool) -> None:
        super().on_batch_done(size, seconds, ok)
        before = self.consecutive_failures >= self.threshold
        self.consecutive_failures = 0 if ok else self.consecutive_failures + 1
        after = self.consecutive_failures >= self.threshold
        if before != after:
            self.on_change(not after)


class AdminService(classifier_pb2_grpc.AdminServicer):
    def __init__(self, server: Server):
        self.server = server

    async def ReloadModel(self, request, context):
        try:
            changed, message = await self.server.reload(request.version or None)
        except ModelDirError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ReloadRefused as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except OSError as e:  # the model folder itself cannot be read
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot read the model folder: {e}")
        return classifier_pb2.ReloadModelResponse(version=self.server.model.version, changed=changed,
                                                  message=message)


class ListenError(OSError):
    """A port the settings name cannot be listened on (in use, not permitted): the user's to fix, one line."""


def _why_not_bindable(host: str, port: int) -> str | None:
    """Why host:port cannot be listened on (e.g. "Address already in use"), or None if it can. Asked before
    gRPC binds, because gRPC says only "Failed to bind" and logs its own multi-line error first."""
    import socket

    bare = host.strip("[]") or "0.0.0.0"
    try:
        with socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            probe.bind((bare, port))
    except OSError as e:
        return e.strerror or str(e)
    return None


class ReloadRefused(Exception):
    """The new version failed to load or warm; the current one keeps serving."""


class Server:
    def __init__(self, settings: Settings, wrap_runner: Callable[[Runner], Runner] | None = None,
                 on_dispatch: Callable[[int, int], None] | None = None, front: FrontSpec | None = None,
                 front_main: FrontMain | None = None):
        """``wrap_runner`` and ``on_dispatch`` (Engine's: a batch handed to a worker) let tests observe batches.
        ``front``: this is a secondary front process (front_process.py), attached to the first front's workers.
        ``front_main``: the secondaries' process body, for front_processes > 1 (front_process.front_main)."""
        self.settings = settings
        self.front = front
        self.front_main = front_main
        self.fronts: Fronts | None = None  # the first front's secondaries, once started
        self.model_dir = Path(settings.model_dir)
        self.version_dir = resolve_version_dir(self.model_dir, settings.version)
        self.metrics = Metrics(settings.max_batch_size)
        # What every transport may know of this server: one handle, one error table, read at call time.
        self.handle = ServingHandle(
            self.metrics,
            ServingConfig(max_request_id_length=settings.max_request_id_length,
                          max_stream_in_flight=settings.max_stream_in_flight, instances=settings.instances,
                          preferred_batch_sizes=tuple(settings.bucket_sizes()),
                          max_queue_delay_us=settings.max_queue_delay_us, max_queue_size=settings.max_queue_size),
            ErrorTable({EngineError: grpc.StatusCode.INTERNAL, WorkerDied: grpc.StatusCode.UNAVAILABLE}),
            pipeline=lambda: self.model.pipeline if self.model is not None else None, serving=self.serving,
            failure=lambda: self.failed, loading=lambda: self.version_dir)
        self.service = ClassifierService(self.handle)
        self.health = health.aio.HealthServicer()
        self.observer = HealthTrackingObserver(self.metrics, settings.unhealthy_after_failures,
                                               self._engine_health_changed)
        self.wrap_runner = wrap_runner
        self.on_dispatch = on_dispatch
        self.model: LoadedModel | None = None
        self.pool = PreprocessPool(settings.preprocess_threads, settings.max_preprocess_queue,
                                   settings.max_preprocess_queue_bytes,
                                   on_refused=self.metrics.dropped.labels("preprocess_full").inc)
        self.grpc_server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self.metrics_host = ""  # the address /metrics listens on, once started
        self._metrics_http = None
        self.health_host, self.health_port = "", 0  # where the health port listens, once started (0: off)
        self._health_port: HealthPort | None = None
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        self._draining = False
        self._engine_ok = True
        self._reload_lock = asyncio.Lock()
        self._refused: dict[Path, tuple] = {}  # version dir -> its files' fingerprint when it was refused
        self._tasks: set[asyncio.Task] = set()
        self._live: tuple[LoadedModel, ...] = ()  # serving + retiring versions (both during a reload)
        # Computed at scrape time over every live batcher, so a reload's two batchers never overwrite each other.
        self.metrics.queue_depth.set_function(lambda: sum(m.batcher.queue_depth for m in self._live))
        self.metrics.in_flight.set_function(lambda: sum(m.batcher.in_flight for m in self._live))
        if front is None:  # the workers' CPU and memory are the first front's to export, once
            self.metrics.watch_workers(lambda: [(m.version, i, pid) for m in self._live
                                                for i, pid in enumerate(m.engine.worker_pids())])
        self.sweeper = MemorySweeper()
        self.metrics.preprocess_queue.set_function(lambda: self.pool.images)
        self.metrics.preprocess_queue_bytes.set_function(lambda: self.pool.bytes)

    @property
    def engine(self) -> Engine | None:
        return self.model.engine if self.model else None

    @property
    def batcher(self):
        return self.model.batcher if self.model else None

    # --- health --------------------------------------------------------------------------------------------
    @property
    def refused_versions(self) -> frozenset[Path]:
        """Version folders the poller refused and will retry only once one of their files changes."""
        return frozenset(self._refused)

    def serving(self) -> bool:
        """Ready to answer: loaded and warm, not failed or draining, batches succeeding, a worker alive."""
        engine = self.engine
        return (self.ready.is_set() and not self.failed and not self._draining and self._engine_ok
                and engine is not None and engine.alive_instances() > 0)

    async def _update_health(self) -> None:
        status = SERVING if self.serving() else NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
            if self._health_port is not None:  # the dedicated port mirrors every change, in order
                self._health_port.set(name, status)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _engine_health_changed(self, ok: bool) -> None:
        self._engine_ok = ok
        log.warning("engine %s", "recovered: batches succeed again" if ok else
                    f"unhealthy: {self.settings.unhealthy_after_failures} consecutive batches failed")
        self._spawn(self._update_health())

    def _worker_event(self, event: str, index: int) -> None:
        engine = self.engine
        alive = engine.alive_instances() if engine else 0
        self.metrics.workers_alive.set(alive)
        if event == "restarted":
            self.metrics.worker_restarts.inc()
        log.warning("engine worker %d %s; %d alive", index, event, alive)
        self._spawn(self._update_health())

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen at once (health NOT_SERVING), then load and warm the model in the background."""
        s = self.settings
        if self.front is not None:  # a secondary front listens only once attached: the kernel sends it clients
            await self._load_first()
            if self.failed:
                return
        if s.metrics_port >= 0:
            metrics_host = s.metrics_host or s.host
            others = self._other_fronts_metrics if s.front_processes > 1 else None
            try:
                self._metrics_http = self.metrics.serve_http(s.metrics_port, metrics_host, self.serving, others)
            except OSError as e:
                raise ListenError(f"cannot listen on {metrics_host}:{s.metrics_port} for /metrics "
                                  f"({e.strerror or e}): choose another metrics_port (--metrics-port; -1 turns "
                                  f"it off)") from None
            self.metrics_host, self.metrics_port = self._metrics_http.server_address[:2]
        options = [("grpc.max_receive_message_length", s.max_message_bytes),
                   ("grpc.max_send_message_length", s.max_message_bytes),
                   ("grpc.max_concurrent_streams", s.max_concurrent_streams),
                   ("grpc.so_reuseport", int(s.front_processes > 1))]
        if s.max_connection_age_s > 0:
            options += [("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(s.grace_period_s * 1000))]
        tokens = load_tokens(s.auth_token_file)
        # Auth first: a request without a valid token is refused before its bytes are even parsed.
        interceptors = [BearerTokenInterceptor(tokens, s.auth_exempt_health) if tokens else AdminGuard(),
                        RequestGuard(self.sweeper.note, self.pool.admits, OIP_PARSERS)]
        self.grpc_server = grpc.aio.server(options=options, interceptors=interceptors)
        classifier_pb2_grpc.add_ClassifierServicer_to_server(self.service, self.grpc_server)
        classifier_pb2_grpc.add_AdminServicer_to_server(AdminService(self), self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        add_oip_service(OIPService(self.handle), self.grpc_server)
        reflection.enable_server_reflection((SERVICE_NAME, ADMIN_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME,
                                             OIPService.SERVICE_NAME), self.grpc_server)
        address = f"{s.host}:{s.port}"
        # Port 0 too: the host may be no address of this machine. A secondary front shares the first's port.
        why = _why_not_bindable(s.host, s.port) if self.front is None else None
        if why is None:
            try:
                if s.tls_cert:
                    self.port = self.grpc_server.add_secure_port(
                        address, server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca))
                else:
                    self.port = self.grpc_server.add_insecure_port(address)
            except RuntimeError:  # grpc's "Failed to bind to address"
                self.port = 0
        if not self.port:
            self._close_metrics_http()
            raise ListenError(f"cannot listen on {address} for gRPC ({why or 'gRPC could not bind it'}): "
                              f"choose another port (--port) or host (--host)")
        try:
            self._open_health_port(bool(tokens))
        except ListenError:
            await self.grpc_server.stop(None)
            raise
        if s.host in ("0.0.0.0", "::", "[::]", "") and not tokens and not s.tls_client_ca:
            log.warning("serving on every interface (%s) without authentication: anyone who can reach this "
                        "port can classify and read model info; use --host 127.0.0.1 or --auth-token-file "
                        "(docs/server.md)", s.host or "all")
        await self._update_health()
        await self.grpc_server.start()
        if self._health_port is not None:
            self._health_port.start()
        self._spawn(self.sweeper.run())
        log.info("listening on %s:%d (gRPC%s%s, %s), metrics %s, health port %s; %s %s", s.host,
                 self.port, ", TLS" if s.tls_cert else "", ", mutual TLS" if s.tls_client_ca else "",
                 f"{len(tokens)} bearer token(s)" if tokens else "no auth",
                 f"on {s.metrics_host or s.host}:{self.metrics_port}" if s.metrics_port >= 0 else "off",
                 f"on {self.health_host}:{self.health_port}" if self._health_port else "off",
                 "loading" if self.front is None else "serving, with the first front's workers,", self.version_dir)
        if self.front is None:
            print(json.dumps({"event": "listening", "port": self.port, "metrics_port": self.metrics_port,
                              "health_port": self.health_port}), flush=True)
            self._loader = asyncio.create_task(self._load_first())

    async def _load(self, version_dir: Path) -> LoadedModel:
        loop = asyncio.get_running_loop()
        return await serving_model.load(
            self.settings, version_dir, self.observer, self.pool, self.metrics,
            on_worker_event=lambda event, i: loop.call_soon_threadsafe(self._worker_event, event, i),
            wrap_runner=self.wrap_runner, on_dispatch=self.on_dispatch,
            worker_sockets=self.settings.front_processes > 1 and self.front is None,
            attach_to=self.front.socket_dir if self.front is not None else None)

    def _publish(self, model: LoadedModel) -> None:
        """Switch traffic: one reference assignment on the event loop, so each request sees one version."""
        self.model = model
        self._live = (*self._live, model)
        self.version_dir = model.version_dir
        self.metrics.model_load.set(model.engine.load_seconds)
        self.metrics.model_warmup.set(model.engine.warmup_seconds)
        self.metrics.workers_alive.set(model.engine.alive_instances())
        self.metrics.model_info.info(model.info_labels())
        self.metrics.model_published(model.pipeline.model.name, model.pipeline.model.version)

    async def _load_first(self) -> None:
        try:
            self._publish(await self._load(self.version_dir))
            if self.settings.front_processes > 1 and self.front is None:
                await self._start_fronts()
            self.ready.set()
            await self._update_health()
            if self.settings.poll_interval_s > 0 and self.settings.version is None:
                self._spawn(self._poll())
        except Exception as e:
            self.failed = e
            log.error("model failed to load: %s", e)
            self.ready.set()

    async def _start_fronts(self) -> None:
        """--front-processes N: start the N - 1 secondary fronts on our port, attached to our workers; ready
        (and SERVING) only once every one listens."""
        s, model = self.settings, self.model
        assert model is not None and model.engine.socket_dir is not None
        if self.front_main is None:
            raise RuntimeError("front_processes > 1 needs the secondary fronts' entry point (front_process.py)")
        specs = [FrontSpec(i, secondary_settings(s, self.port, model.version, model.engine.batch_time_limit_s),
                           model.engine.socket_dir)
                 for i in range(1, s.front_processes)]
        self.fronts = Fronts(specs, s.worker_start_timeout_s, self.front_main)
        await asyncio.get_running_loop().run_in_executor(None, self.fronts.start)

    def _other_fronts_metrics(self) -> list[tuple[int, bytes]]:
        """The secondary fronts' expositions (metrics HTTP thread), merged into ours by metrics.FrontsView."""
        return self.fronts.scrape() if self.fronts is not None else []

    # --- reload --------------------------------------------------------------------------------------------
    async def reload(self, version: int | None = None) -> tuple[bool, str]:
        """Load `version` (default: the highest present), warm it, switch to it, retire the old one.

        Raises ModelDirError when there is no such version and ReloadRefused when it fails to load; either
        way the current version keeps serving."""
        async with self._reload_lock:
            if self._draining or self.model is None:
                raise ReloadRefused("the server is not serving a model")
            if self.settings.front_processes > 1:  # SIGHUP and Admin alike: said in the log, not only to a client
                message = ("hot reload is not available with front_processes > 1: restart the server (roll the "
                           "pods) to serve another version")
                log.warning("reload refused: %s", message)
                raise ReloadRefused(message)
            target = resolve_version_dir(self.model_dir, version)
            if target.resolve() == self.model.version_dir.resolve():
                return False, f"already serving version {self.model.version}"
            log.info("reload: loading %s while version %s keeps serving", target, self.model.version)
            seen = fingerprint(target)  # before loading: a copy that completes meanwhile changes it
            try:
                new = await self._load(target)
            except Exception as e:
                self._refused[target] = seen
                log.error("reload: refused %s, version %s keeps serving: %s", target, self.model.version, e)
                raise ReloadRefused(f"version at {target} failed to load: {e}") from e
            old = self.model
            self._publish(new)
            log.info("reload: switched from version %s to %s", old.version, new.version)
            await old.retire()
            self._live = tuple(m for m in self._live if m is not old)
            return True, f"switched from version {old.version} to {new.version}"

    def _newer_version(self) -> int | None:
        versions = list_versions(self.model_dir)
        if not versions or self.model is None or versions[-1] <= int(self.model.version):
            return None
        target = self.model_dir / str(versions[-1])
        refused = self._refused.get(target)
        if refused is not None and refused == fingerprint(target):
            return None  # already refused, and none of its files changed since
        return versions[-1]

    async def _poll(self) -> None:
        """Model-control mode 'poll': switch to a newer version when one appears."""
        while not self._draining:
            await asyncio.sleep(self.settings.poll_interval_s)
            await self.check_for_new_version()

    async def check_for_new_version(self, retry_refused: bool = False) -> None:
        """Load the highest version if it is newer (poller and SIGHUP). Never raises: a failed check is logged
        and the next one runs. `retry_refused` (SIGHUP: the operator asks) also retries an unchanged refusal."""
        try:
            if retry_refused:
                self._refused.clear()
            newer = self._newer_version()
            if newer is not None:
                with contextlib.suppress(ReloadRefused, ModelDirError):  # logged by reload()
                    await self.reload(newer)
        except Exception:
            log.exception("looking for a new model version failed; the current version keeps serving")

    def _open_health_port(self, auth: bool) -> None:
        """The dedicated health port (settings health_port/health_host), NOT_SERVING until _update_health."""
        s = self.settings
        if s.health_port < 0:
            return
        if auth and not s.auth_exempt_health:
            log.warning("health port off: --auth-exempt-health false asks a token of every health check, and the "
                        "health port serves health without one (probes cannot send one); probe the main port")
            return
        host = s.health_host or s.host
        why = _why_not_bindable(host, s.health_port)
        if why is None:
            try:
                self._health_port = HealthPort(host, s.health_port)
            except RuntimeError:  # grpc's "Failed to bind to address"
                why = "gRPC could not bind it"
        if self._health_port is None:
            self._close_metrics_http()
            raise ListenError(f"cannot listen on {host}:{s.health_port} for the health port ({why}): choose "
                              f"another health_port (--health-port; -1 turns it off)")
        self.health_host, self.health_port = host, self._health_port.port

    async def _close_health_port(self) -> None:
        """Stop the health port after its last status (NOT_SERVING for good), off the loop: it may block briefly."""
        hp, self._health_port = self._health_port, None  # on the loop: no status is published to it after this
        if hp is not None:
            stopped = await asyncio.to_thread(hp.stop, 1.0)
            await asyncio.to_thread(stopped.wait, 5.0)

    def _close_metrics_http(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    # --- drain ---------------------------------------------------------------------------------------------
    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, answer everything accepted, then stop workers."""
        grace = self.settings.grace_period_s if grace is None else grace
        self._draining = True
        await self._update_health()
        t0 = time.perf_counter()
        # Every front drains at once; the workers stop only after the last has answered what it accepted.
        fronts = self.fronts
        await asyncio.gather(*([self.grpc_server.stop(grace)] if self.grpc_server is not None else []),
                             *([asyncio.to_thread(fronts.drain, grace)] if fronts is not None else []))
        async with self._reload_lock:
            if self.model is not None:  # bounded: a hung worker is killed after the grace (plus a second)
                await self.model.retire(timeout=max(0.0, t0 + grace - time.perf_counter()) + 1.0)
        if hasattr(self, "_loader") and not self._loader.done():
            self._loader.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.pool.shutdown()
        self._close_metrics_http()
        await self._close_health_port()  # last: probes saw NOT_SERVING there for the whole drain
        log.info("stopped after a %.2f s drain", time.perf_counter() - t0)


def fingerprint(version_dir: Path) -> tuple:
    """(name, size, mtime) of every entry of a version folder: a refused version is retried once any changes."""
    try:
        with os.scandir(version_dir) as entries:
            return tuple(sorted((e.name, st.st_size, st.st_mtime_ns) for e in entries
                                for st in [e.stat(follow_symlinks=False)]))
    except OSError:
        return ()


async def run(settings: Settings, front_main: FrontMain | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain; SIGHUP loads a newer model version. 0 on a clean exit."""
    import signal

    server = Server(settings, front_main=front_main)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: server._spawn(server.check_for_new_version(retry_refused=True)))
    await server.start()
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, server._loader}, return_when=asyncio.FIRST_COMPLETED)
    if server.failed:
        await server.stop(0)
        return 1
    MemorySweeper.freeze_startup()  # the process's own start-up state: not in an embedding process (tests)
    await stop.wait()
    log.info("signal received: draining (grace %.0f s)", settings.grace_period_s)
    await server.stop()
    return 0


def main_with(settings: Settings, front_main: FrontMain | None = None) -> int:
    log.info("effective configuration:\n%s", settings.describe())
    try:
        return asyncio.run(run(settings, front_main))
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    finally:
        sys.stdout.flush()
