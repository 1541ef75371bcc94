"""client readiness: polling grpc.health.v1 until SERVING within a timeout (client/resnet_serve/client/readiness.py),
as both clients use it, against real gRPC servers that run only grpc_health's HealthServicer (no model)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from resnet_serve.client.aio import AsyncClassifierClient
from resnet_serve.client.errors import ClassifierError
from resnet_serve.client.readiness import ReadyWait, health_status
from resnet_serve.client.sync import ClassifierClient
from tests.unit.loopback import started
from tests.unit.serving_parts import run

Status = health_pb2.HealthCheckResponse


# --- ReadyWait ---------------------------------------------------------------------------------------------------
def test_the_poll_interval_doubles_from_fifty_ms_to_one_second() -> None:
    wait = ReadyWait(3600.0)
    assert [wait.next_delay() for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert wait.probe_timeout() == 5.0  # one probe never waits longer than 5 s


def test_a_spent_timeout_ends_the_wait_and_still_probes_briefly() -> None:
    wait = ReadyWait(0.0)
    assert wait.next_delay() is None
    assert wait.probe_timeout() == 0.01


def test_the_timeout_error_says_how_long_and_what_was_seen_last() -> None:
    wait = ReadyWait(2.5)
    wait.last = "NOT_SERVING"
    error = wait.error()
    assert (error.code, error.message) == (grpc.StatusCode.DEADLINE_EXCEEDED,
                                           "server not ready after 2.5 s (NOT_SERVING)")


@pytest.mark.parametrize("status", ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"])
def test_a_health_answer_is_named_by_its_status(status: str) -> None:
    assert health_status(Status(status=Status.ServingStatus.Value(status))) == status


# --- the clients against a real health server -------------------------------------------------------------------
class ServingAfter(health.HealthServicer):
    """grpc_health's servicer, switching to SERVING once it has answered `probes` checks NOT_SERVING: the
    server side of a model that finishes loading while a client waits (counted, not timed)."""

    def __init__(self, probes: int) -> None:
        super().__init__()
        self.probes, self.seen = probes, 0
        self.set("", Status.NOT_SERVING)

    def Check(self, request, context):  # noqa: N802 - the gRPC method's name
        self.seen += 1
        answer = super().Check(request, context)
        if self.seen == self.probes:
            self.set("", Status.SERVING)
        return answer


@contextmanager
def threaded_health(servicer: health.HealthServicer) -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_the_sync_client_polls_until_serving() -> None:
    servicer = ServingAfter(probes=3)
    with threaded_health(servicer) as target, ClassifierClient(target) as client:
        assert client.health() == "NOT_SERVING"
        client.wait_until_ready(timeout=60)
        assert servicer.seen == 4  # the probe above, two more NOT_SERVING, then SERVING
        assert client.health() == "SERVING"


def test_the_sync_client_names_an_unknown_service_as_not_found() -> None:
    with threaded_health(health.HealthServicer()) as target, ClassifierClient(target) as client:
        with pytest.raises(ClassifierError) as raised:
            client.health("no.such.Service")
        assert raised.value.code == grpc.StatusCode.NOT_FOUND


def test_the_sync_client_gives_up_at_its_timeout_with_deadline_exceeded() -> None:
    with threaded_health(ServingAfter(probes=10**9)) as target, ClassifierClient(target) as client:
        with pytest.raises(ClassifierError) as raised:
            client.wait_until_ready(timeout=0.3)
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert raised.value.message.startswith("server not ready after 0.3 s (")


def test_the_async_client_polls_until_serving() -> None:
    class AioServingAfter(health.aio.HealthServicer):
        def __init__(self) -> None:
            super().__init__()
            self.seen = 0

        async def Check(self, request, context):  # noqa: N802
            self.seen += 1
            answer = await super().Check(request, context)
            if self.seen == 2:
                await self.set("", Status.SERVING)
            return answer

    async def body() -> None:
        servicer = AioServingAfter()
        await servicer.set("", Status.NOT_SERVING)
        servicers = [(health_pb2_grpc.add_HealthServicer_to_server, servicer)]
        async with started([], servicers=servicers) as target, AsyncClassifierClient(target) as client:
            assert await client.health() == "NOT_SERVING"
            await client.wait_until_ready(timeout=60)
            assert servicer.seen == 3  # the probe above, one more NOT_SERVING, then SERVING
            assert await client.health() == "SERVING"

    run(body())
