"""A dedicated grpc.health.v1 endpoint answered off the event loop.

The main port's health servicer runs on the front's asyncio loop, so a health check there waits behind whatever
the loop is doing: grpc.aio turns every received message into Python bytes on that loop (~10 ms per 8 MB), and a
burst of large requests delays a check by hundreds of milliseconds. Orchestrator probes must not see that as an
outage. This endpoint is a synchronous `grpc.server` with its own small thread pool: its checks are answered by
gRPC's threads, never by the loop, and only the GIL is shared.

Bounded: at most `max_concurrent_rpcs` calls are being answered at once, each on a thread of its own; past that a
call gets RESOURCE_EXHAUSTED at once, never a wait. An open Watch holds no thread (gRPC's non-blocking streaming)
and is not such a call once set up, so Watches are bounded on their own (`max_watches`, then RESOURCE_EXHAUSTED):
however many a client opens, Checks are still answered. Plaintext and without tokens, like the /healthz of the
metrics port: Kubernetes gRPC probes can do neither TLS nor metadata. It serves health only, so it reveals nothing
but SERVING / NOT_SERVING.

It knows nothing of the server: the owner sets each status as its main-port servicer changes (`set`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

MAX_CONCURRENT_RPCS = 16  # calls being answered at once; beyond: RESOURCE_EXHAUSTED
MAX_WATCHES = 16  # Watch streams open at once; beyond: RESOURCE_EXHAUSTED
MAX_MESSAGE_BYTES = 64 * 1024  # a HealthCheckRequest is a service name
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class _Watch:
    """One open Watch: sends the service's current status whenever it differs from what this stream last got.
    Its own lock keeps its messages in order; a send that blocks (a client that never reads) holds only it."""

    def __init__(self, send: Callable[[health_pb2.HealthCheckResponse | None], None]):
        self.send, self.lock, self.sent = send, threading.Lock(), None

    def update(self, current: Callable[[], int]) -> None:
        with self.lock:
            status = current()  # read under this stream's lock: whatever the order of updates, the last one wins
            if status != self.sent:
                self.sent = status
                self.send(health_pb2.HealthCheckResponse(status=status))


class HealthService(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 with the reference servicer's behaviour (Check, non-blocking Watch, a graceful shutdown that
    sets everything NOT_SERVING for good), starting NOT_SERVING, refusing Watches beyond `max_watches` open at
    once, and never sending while holding a lock that gRPC's own thread needs.

    Why not grpc_health's HealthServicer: its `set` sends every Watch update while holding the servicer's lock, and
    a send waits for gRPC's serving thread to complete it; that thread, ending another Watch at the same moment,
    runs the servicer's close callback, which waits for the same lock. Both wait for good: the port answers
    nothing more and the process cannot exit (seen once in a loaded test run, at shutdown)."""

    def __init__(self, max_watches: int = MAX_WATCHES):
        self._lock = threading.Lock()  # guards the two dicts and _final; never held while sending
        self._status: dict[str, int] = {"": NOT_SERVING}
        self._watches: dict[str, set[_Watch]] = {}
        self._final = False
        self.max_watches = max_watches
        self._watch_slots = threading.BoundedSemaphore(max_watches)

    def _current(self, service: str) -> int:
        with self._lock:
            return self._status.get(service, SERVICE_UNKNOWN)

    def Check(self, request, context):  # noqa: N802 (gRPC's method name)
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request, context, send_response_callback=None):  # noqa: N802
        if not self._watch_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_watches} health watches are open on this port; use Check, or close one")
        service, watch = request.service, _Watch(send_response_callback)

        def closed() -> None:  # on gRPC's serving thread when the call ends: must not wait for a send
            with self._lock:
                self._watches.get(service, set()).discard(watch)
            self._watch_slots.release()
            send_response_callback(None)

        with self._lock:
            self._watches.setdefault(service, set()).add(watch)
        if not context.add_callback(closed):  # the call already ended
            closed()
            return
        watch.update(lambda: self._current(service))

    # gRPC calls Watch with a send_response_callback and holds no thread for the stream (non-blocking streaming).
    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]
    Watch.experimental_thread_pool = None  # type: ignore[attr-defined]

    def set(self, service: str, status: int) -> None:
        """Set a service's status and send it to its open Watches (outside the lock; blocking sends included)."""
        with self._lock:
            if self._final:
                return
            self._status[service] = status
            watches = list(self._watches.get(service, ()))
        for watch in watches:
            watch.update(lambda: self._current(service))

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good: later `set`s are ignored."""
        with self._lock:
            if self._final:
                return
            self._final = True
            for service in self._status:
                self._status[service] = NOT_SERVING
            watches = [(service, w) for service, ws in self._watches.items() for w in ws]
        for service, watch in watches:
            watch.update(lambda s=service: self._current(s))


class HealthPort:
    """grpc.health.v1 (Check and Watch) on its own port, on a synchronous gRPC server's threads."""

    def __init__(self, host: str, port: int, max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
                 servicer: HealthService | None = None):
        """Binds host:port (0: a free one, see `port`); raises RuntimeError if gRPC cannot bind it. Every status
        starts NOT_SERVING. `servicer`: a HealthService (subclass) to serve instead of a default one (tests)."""
        self.servicer = servicer if servicer is not None else HealthService()
        # One thread per admitted call: an admitted Check never queues behind others.
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent_rpcs, thread_name_prefix="health-port")
        self._server = grpc.server(self._pool, maximum_concurrent_rpcs=max_concurrent_rpcs,
                                   options=[("grpc.so_reuseport", 0),
                                            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        # Statuses are published from one thread of their own, in order: sending a Watch update blocks until
        # gRPC has taken it, which must never be the caller's (the event loop's) wait.
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-port-publish")

    def start(self) -> None:
        self._server.start()

    def set(self, service: str, status: int) -> None:
        """Publish `status` for `service` ("" = the whole server); returns at once, applied in call order."""
        with contextlib.suppress(RuntimeError):  # stopped: every status is NOT_SERVING for good
            self._publisher.submit(self.servicer.set, service, status)

    def stop(self, grace: float = 1.0) -> threading.Event:
        """Every service NOT_SERVING for good, then stop listening; open Watches end after `grace`. Blocks up to
        `grace` for the statuses queued before it; the returned event is set once the server has stopped."""
        wait([self._publisher.submit(self.servicer.enter_graceful_shutdown)], timeout=grace)
        done = self._server.stop(grace)  # also ends a publish blocked on a Watch client that never reads
        self._publisher.shutdown(wait=False)
        self._pool.shutdown(wait=False)
        return done
