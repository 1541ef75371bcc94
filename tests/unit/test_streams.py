"""streams.answer_each: every item read gets exactly one answer, sent as soon as it is ready, with at most `window`
items held (read and not yet sent). Items are released by events, never by elapsed time; the held count is a real
prometheus Gauge, as the server passes it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Gauge

from resnet_serve.server.streams import answer_each
from tests.unit.serving_parts import run


class Source:
    """A request stream of `n` integers that counts what was read; after `fail_after` items, once `failing` is set,
    the next read fails with `error`."""

    def __init__(self, n: int, fail_after: int | None = None, error: Exception | None = None):
        self.n, self.fail_after, self.error = n, fail_after, error
        self.read = 0
        self.failing = asyncio.Event()  # the failing read waits for it

    async def __aiter__(self) -> AsyncIterator[int]:
        for i in range(self.n):
            if i == self.fail_after:
                await self.failing.wait()
                raise self.error or ConnectionError("transport failed")
            self.read += 1
            yield i


class Gated:
    """A handler whose item i is answered f"answer {i}" once release(i) is called; records the items started and
    cancelled."""

    def __init__(self):
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.one_started = asyncio.Event()

    def gate(self, i: int) -> asyncio.Event:
        return self.gates.setdefault(i, asyncio.Event())

    def release(self, *items: int) -> None:
        for i in items:
            self.gate(i).set()

    async def __call__(self, i: int) -> str:
        self.started.append(i)
        self.one_started.set()
        try:
            await self.gate(i).wait()
        except asyncio.CancelledError:
            self.cancelled.append(i)
            raise
        return f"answer {i}"

    async def until_started(self, count: int) -> None:
        while len(self.started) < count:
            self.one_started.clear()
            await self.one_started.wait()


def held_gauge() -> tuple[Gauge, CollectorRegistry]:
    registry = CollectorRegistry()
    return Gauge("held", "stream items held", registry=registry), registry


def test_every_item_is_answered_exactly_once() -> None:
    async def body() -> None:
        async def double(i: int) -> int:
            await asyncio.sleep(0)
            return 2 * i

        answers = [a async for a in answer_each(Source(50).__aiter__(), double, 4)]
        assert sorted(answers) == [2 * i for i in range(50)]

    run(body())


def test_answers_go_out_as_soon_as_ready_not_in_request_order() -> None:
    async def body() -> None:
        handle = Gated()
        stream = answer_each(Source(3).__aiter__(), handle, 3)
        first = asyncio.ensure_future(anext(stream))
        await handle.until_started(3)
        handle.release(2)
        assert await first == "answer 2"
        handle.release(0, 1)
        assert [a async for a in stream] == ["answer 0", "answer 1"]

    run(body())


def test_the_window_bounds_the_items_held_and_reading_resumes_once_an_answer_is_sent() -> None:
    async def body() -> None:
        source, handle = Source(10), Gated()
        gauge, registry = held_gauge()
        stream = answer_each(source.__aiter__(), handle, 3, gauge)
        first = asyncio.ensure_future(anext(stream))
        await handle.until_started(3)
        # The reader took a slot before each read: with all three held it is waiting for a slot, not reading.
        assert source.read == 3 and registry.get_sample_value("held") == 3
        handle.release(0)
        assert await first == "answer 0"
        # Yielded but not yet sent (the consumer has not come back): still held, nothing more read.
        assert source.read == 3 and registry.get_sample_value("held") == 3
        second = asyncio.ensure_future(anext(stream))  # coming back: answer 0 was sent, its slot frees
        await handle.until_started(4)
        assert source.read == 4 and handle.started == [0, 1, 2, 3]
        handle.release(*range(1, 10))
        rest = [await second] + [a async for a in stream]
        assert sorted(rest) == sorted(f"answer {i}" for i in range(1, 10))
        assert registry.get_sample_value("held") == 0

    run(body())


def test_a_consumer_that_stops_early_cancels_the_items_and_releases_the_held_count() -> None:
    async def body() -> None:
        handle = Gated()
        gauge, registry = held_gauge()
        stream = answer_each(Source(5).__aiter__(), handle, 4, gauge)
        first = asyncio.ensure_future(anext(stream))
        await handle.until_started(4)
        handle.release(1)
        assert await first == "answer 1"
        await stream.aclose()
        assert registry.get_sample_value("held") == 0
        assert sorted(handle.cancelled) == [0, 2, 3]

    run(body())


def test_a_transport_failure_while_reading_ends_the_stream_with_it_and_cancels_the_pending_items() -> None:
    async def body() -> None:
        handle = Gated()
        gauge, registry = held_gauge()
        source = Source(5, fail_after=2, error=ConnectionResetError("peer reset"))
        stream = answer_each(source.__aiter__(), handle, 4, gauge)
        first = asyncio.ensure_future(anext(stream))
        await handle.until_started(2)
        handle.release(0)
        assert await first == "answer 0"  # an answer ready before the failure went out
        source.failing.set()
        with pytest.raises(ConnectionResetError, match="peer reset"):
            await anext(stream)
        assert handle.cancelled == [1] and registry.get_sample_value("held") == 0

    run(body())
