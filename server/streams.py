"""Bidirectional streams where every item read gets exactly one answer, sent as soon as it is ready: shared by
classifier.v1 ClassifyStream and the Open Inference Protocol's ModelStreamInfer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

_END = object()


async def answer_each(requests: AsyncIterator, handle: Callable[..., Awaitable], window: int) -> AsyncIterator:
    """Handle every item of a request stream concurrently (at most `window` at once; beyond it, stop reading:
    HTTP/2 flow control pushes back) and yield each answer as soon as it is ready. `handle` returns exactly one
    answer per item (errors as values), so every item read is answered once; a transport failure while reading
    ends the stream with that error after nothing else is pending."""
    out: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    items: set[asyncio.Task] = set()
    read_count = 0

    async def one(request) -> None:
        try:
            answer = await handle(request)
        finally:
            slots.release()
        out.put_nowait(answer)

    async def read() -> None:
        nonlocal read_count
        try:
            async for request in requests:
                await slots.acquire()
                read_count += 1
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
    finally:
        reader.cancel()
        for task in list(items):
            task.cancel()
        await asyncio.gather(reader, *items, return_exceptions=True)
