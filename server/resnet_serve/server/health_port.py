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
from concurrent.futures import ThreadPoolExecutor, wait

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

MAX_CONCURRENT_RPCS = 16  # calls being answered at once; beyond: RESOURCE_EXHAUSTED
MAX_WATCHES = 16  # Watch streams open at once; beyond: RESOURCE_EXHAUSTED
MAX_MESSAGE_BYTES = 64 * 1024  # a HealthCheckRequest is a service name
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthService(health.HealthServicer):
    """gRPC's reference servicer (thread-safe, non-blocking Watch), starting NOT_SERVING (the reference one
    starts the whole server SERVING) and refusing Watches beyond `max_watches` open at once."""

    def __init__(self, max_watches: int = MAX_WATCHES):
        super().__init__()
        self.set("", NOT_SERVING)
        self.max_watches = max_watches
        self._watch_slots = threading.BoundedSemaphore(max_watches)

    def Watch(self, request, context, send_response_callback=None):  # noqa: N802 (gRPC's method name)
        if not self._watch_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_watches} health watches are open on this port; use Check, or close one")
        if not context.add_callback(self._watch_slots.release):  # the call already ended
            self._watch_slots.release()
        return super().Watch(request, context, send_response_callback)


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
