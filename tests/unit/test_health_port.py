"""server/resnet_serve/server/health_port.py: grpc.health.v1 on a port of its own, answered by a synchronous gRPC
server's threads. Real gRPC over loopback; outcomes are asserted by events (statuses, codes), never by timing."""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from resnet_serve.server.health_port import HealthPort, HealthService
from tests.harness import wait_for

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "classifier.v1.Classifier"
WAIT_S = 30.0  # safety net only


@pytest.fixture
def port() -> Iterator[HealthPort]:
    hp = HealthPort("127.0.0.1", 0, max_concurrent_rpcs=4)
    hp.start()
    try:
        yield hp
    finally:
        hp.stop(grace=0).wait(WAIT_S)


@pytest.fixture
def stub(port: HealthPort) -> Iterator[health_pb2_grpc.HealthStub]:
    with grpc.insecure_channel(f"127.0.0.1:{port.port}") as channel:
        yield health_pb2_grpc.HealthStub(channel)


def check(stub: health_pb2_grpc.HealthStub, service: str = "") -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S).status


class Watched:
    """Every status one Health.Watch stream reports, in order, then None; `ended` once the stream is over."""

    def __init__(self, stub: health_pb2_grpc.HealthStub, service: str = ""):
        self.statuses: queue.Queue[int | None] = queue.Queue()
        self.ended = threading.Event()
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for r in self.call:
                self.statuses.put(r.status)
        except grpc.RpcError:
            pass
        finally:
            self.statuses.put(None)
            self.ended.set()

    def next(self) -> int | None:
        """The next status, None once the stream has ended."""
        return self.statuses.get(timeout=WAIT_S)


def test_starts_not_serving_and_mirrors_every_status_to_check_and_watch(port: HealthPort, stub) -> None:
    assert check(stub) == NOT_SERVING  # not the stock servicer's SERVING: the server is not ready yet
    watch = Watched(stub)
    assert watch.next() == NOT_SERVING
    port.set("", SERVING)
    port.set(SERVICE, SERVING)
    assert watch.next() == SERVING
    assert (check(stub), check(stub, SERVICE)) == (SERVING, SERVING)
    port.set("", NOT_SERVING)  # e.g. no engine worker alive
    assert watch.next() == NOT_SERVING
    assert check(stub) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        check(stub, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    watch.call.cancel()


def test_stop_publishes_not_serving_to_every_watch_then_closes_the_port() -> None:
    hp = HealthPort("127.0.0.1", 0)
    hp.start()
    with grpc.insecure_channel(f"127.0.0.1:{hp.port}") as channel:
        s = health_pb2_grpc.HealthStub(channel)
        hp.set("", SERVING)
        hp.set(SERVICE, SERVING)
        whole, service = Watched(s), Watched(s, SERVICE)
        while whole.next() != SERVING:
            pass
        while service.next() != SERVING:
            pass
        assert hp.stop(grace=0.5).wait(WAIT_S)
        assert (whole.next(), service.next()) == (NOT_SERVING, NOT_SERVING)
        assert whole.ended.wait(WAIT_S) and service.ended.wait(WAIT_S)
        hp.set("", SERVING)  # a late status after stop is dropped, not an error
        with pytest.raises(grpc.RpcError) as err:
            check(s)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


class HeldChecks(HealthService):
    """Each Check waits for `release` once it has been counted in `entered`: calls held inside the port."""

    def __init__(self) -> None:
        super().__init__(max_watches=2)
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def Check(self, request, context):  # noqa: N802
        self.entered.release()
        self.release.wait(WAIT_S)
        return super().Check(request, context)


def outcome(call) -> grpc.StatusCode:
    try:
        call.result()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_calls_beyond_the_bound_get_resource_exhausted_at_once_never_a_wait() -> None:
    servicer = HeldChecks()
    hp = HealthPort("127.0.0.1", 0, max_concurrent_rpcs=4, servicer=servicer)
    hp.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{hp.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            held = [stub.Check.future(health_pb2.HealthCheckRequest(), timeout=WAIT_S) for _ in range(4)]
            for _ in held:  # all four are being answered: the bound is reached
                assert servicer.entered.acquire(timeout=WAIT_S)
            flood = [stub.Check.future(health_pb2.HealthCheckRequest(), timeout=WAIT_S) for _ in range(50)]
            assert [outcome(f) for f in flood] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 50  # while still held
            assert not any(f.done() for f in held)
            servicer.release.set()
            assert [outcome(f) for f in held] == [grpc.StatusCode.OK] * 4
            # the slots are free again (gRPC counts a call out once its thread is done: polled, bounded)
            wait_for(lambda: outcome(stub.Check.future(health_pb2.HealthCheckRequest(), timeout=WAIT_S))
                     == grpc.StatusCode.OK, timeout=WAIT_S, what="a check answered again")
    finally:
        servicer.release.set()
        hp.stop(grace=0).wait(WAIT_S)


def open_watch(stub: health_pb2_grpc.HealthStub) -> Watched:
    """A Watch that reported its first status. With max_concurrent_rpcs=2 a Watch still counts against the bound
    until gRPC's handler thread returns, which may be just after its first status arrives: a third opened at that
    moment is refused by the call bound (not the watch bound), so it is opened again (polled, bounded)."""
    opened: list[Watched] = []

    def attempt() -> bool:
        w = Watched(stub)
        if w.next() in (NOT_SERVING, SERVING):
            opened.append(w)
            return True
        assert "health watches are open" not in (w.call.details() or ""), "refused by the watch bound"
        return False

    wait_for(attempt, timeout=WAIT_S, what="a Watch to open")
    return opened[0]


def test_watches_are_bounded_on_their_own_and_never_starve_checks() -> None:
    hp = HealthPort("127.0.0.1", 0, max_concurrent_rpcs=2, servicer=HealthService(max_watches=3))
    hp.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{hp.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            hp.set("", SERVING)
            watches = [open_watch(stub) for _ in range(3)]  # all three open at once
            extra = Watched(stub)
            assert extra.next() is None and extra.call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # no status
            assert [check(stub) for _ in range(10)] == [SERVING] * 10  # more Watches than calls: Checks still pass
            watches[0].call.cancel()  # a Watch closes: another may open (its slot frees on gRPC's callback)

            def reopened() -> bool:
                w = Watched(stub)
                accepted = w.next() is not None  # a first status: accepted; the end at once: refused
                w.call.cancel()
                return accepted

            wait_for(reopened, timeout=WAIT_S, what="a Watch accepted once another closed")
            for w in watches[1:]:
                w.call.cancel()
    finally:
        hp.stop(grace=0).wait(WAIT_S)


def test_a_flood_of_checks_is_answered_or_refused_never_left_waiting(port: HealthPort, stub) -> None:
    port.set("", SERVING)
    flood = [stub.Check.future(health_pb2.HealthCheckRequest(), timeout=WAIT_S) for _ in range(200)]
    codes = set()
    for f in flood:
        try:
            codes.add(grpc.StatusCode.OK if f.result().status == SERVING else None)
        except grpc.RpcError as e:
            codes.add(e.code())
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes


def test_a_port_in_use_fails_to_bind() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(RuntimeError):
            HealthPort("127.0.0.1", busy.getsockname()[1])


def test_answers_while_the_event_loop_of_a_grpc_aio_server_in_this_process_is_blocked() -> None:
    """Why the port exists: with a grpc.aio server in the same process and its loop blocked, the aio server's own
    health check cannot be answered, the health port's is."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    release = threading.Event()
    hp = HealthPort("127.0.0.1", 0)

    async def start_aio() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        aio_health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(aio_health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, aio_port = asyncio.run_coroutine_threadsafe(start_aio(), loop).result(WAIT_S)
    try:
        hp.start()
        hp.set("", SERVING)
        with grpc.insecure_channel(f"127.0.0.1:{aio_port}") as aio_channel, \
                grpc.insecure_channel(f"127.0.0.1:{hp.port}") as hp_channel:
            aio_stub, hp_stub = health_pb2_grpc.HealthStub(aio_channel), health_pb2_grpc.HealthStub(hp_channel)
            assert check(aio_stub) == SERVING and check(hp_stub) == SERVING  # both up
            loop.call_soon_threadsafe(release.wait, WAIT_S)  # the loop is stuck until released
            with pytest.raises(grpc.RpcError) as err:
                aio_stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert [check(hp_stub) for _ in range(20)] == [SERVING] * 20  # while the loop is still blocked
            assert not release.is_set()
    finally:
        release.set()
        hp.stop(grace=0).wait(WAIT_S)
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)


WATCHES = 1000


def test_watches_ending_while_statuses_are_published_never_stall_the_port() -> None:
    """Watch streams opened and cancelled over and over while another thread publishes statuses: grpc_health's own
    servicer sent updates under the lock its close callback needs, and once a close met a send the port answered
    nothing more and stop() never finished. Counted: WATCHES watches, every one ended; then Check answers and stop()
    completes."""
    hp = HealthPort("127.0.0.1", 0, max_concurrent_rpcs=8, servicer=HealthService(max_watches=8))
    hp.start()
    publishing = threading.Event()
    publishing.set()

    def publish() -> None:
        flip = 0
        while publishing.is_set():
            flip ^= 1
            hp.servicer.set("", SERVING if flip else NOT_SERVING)  # directly: the sends happen on this thread

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{hp.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            open_calls: list = []
            for _ in range(WATCHES):
                call = stub.Watch(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
                next(call)  # its first status: the stream is open and registered
                open_calls.append(call)
                if len(open_calls) > 4:  # several open at once, the oldest ending while updates go out
                    open_calls.pop(0).cancel()
            for call in open_calls:
                call.cancel()
            assert check(stub) in (SERVING, NOT_SERVING)
    finally:
        publishing.clear()
        publisher.join(WAIT_S)
        stopped = hp.stop(grace=0)
    assert not publisher.is_alive(), "a status publish never returned"
    assert stopped.wait(WAIT_S), "the health port never stopped"
