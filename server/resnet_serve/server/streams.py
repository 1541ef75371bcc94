"""Bidirectional streams where every item read gets exactly one answer, sent as soon as it is ready: shared by
classifier.v1 ClassifyStream and the Open Inference Protocol's ModelStreamInfer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

_END = object()


class HeldGauge(Protocol):
    """Counts the items held over all streams (a Prometheus Gauge fits)."""

    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...


async def answer_each(requests: AsyncIterator, handle: Callable[..., Awaitable], window: int,
                      held: HeldGauge | None = None) -> AsyncIterator:
    """Handle every item of a request stream concurrently and yield each answer as soon as it is ready.

    An item is held from the moment it is read until its answer has been *sent* (the consumer came back for
    the next one after the yield: grpc.aio resumes us only once the write went out, which HTTP/2 flow control
    delays while the client reads nothing). At most `window` items are held; beyond that the stream is not
    read, so a client that sends without reading is held back by flow control and the server keeps at most
    `window` requests and answers of it. `handle` returns exactly one answer per item (errors as values), so
    every item read is answered once; a transport failure while reading ends the stream with that error after
    nothing else is pending. `held` (optional) counts the held items."""
    out: asyncio.Queue = asyncio.Queue()  # at most `window` answers: each one holds a slot until sent
    slots = asyncio.Semaphore(window)
    items: set[asyncio.Task] = set()
    read_count = 0
    holding = 0  # read and not yet sent (what `held` counts for this stream)

    async def one(request) -> None:
        out.put_nowait(await handle(request))

    async def read() -> None:
        nonlocal read_count, holding
        try:
            while True:
                await slots.acquire()  # before reading: an item waiting for a slot would be one more held
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    break
                read_count += 1
                holding += 1
                if held is not None:
                    held.inc()
                task = asyncio.create_task(one(request))
                items.add(task)
                task.add_done_callback(items.discard)
            out.put_nowait(_END)
        except Exception as e:
            out.put_nowait(e)

    reader = asyncio.create_task(read())
    answered, reading_ended = 0, False
    try:
        while not (reading_ended and answered == read_count):
            answer = await out.get()
            if answer is _END:
                reading_ended = True
            elif isinstance(answer, Exception):
                raise answer
            else:
                answered += 1
                yield answer
                holding -= 1  # sent: its slot may take the next item
                if held is not None:
                    held.dec()
                slots.release()
    finally:
        reader.cancel()
        for task in list(items):
            task.cancel()
        await asyncio.gather(reader, *items, return_exceptions=True)
        if held is not None and holding:
            held.dec(holding)
