"""The preprocess threads behind admission control: the part of a request's path before the batcher's queue.

Decoding is the expensive step and runs on a few threads; without a bound, requests waiting for them would hold
their payloads outside every limit and metric. At most `max_images` images, holding at most `max_bytes` of
payload, are inside (waiting for a thread or being decoded); beyond either, a request is refused at once
(RESOURCE_EXHAUSTED) instead of queueing. One request is always admitted when nothing is inside, so every
message the server accepts can be decoded. Knows asyncio and threads; nothing of gRPC or Paddle.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .batcher import QueueFull

T = TypeVar("T")


class PreprocessQueueFull(QueueFull):
    """The preprocess stage holds its maximum of images or bytes (-> RESOURCE_EXHAUSTED, like a full queue)."""


class PreprocessPool:
    """Runs preprocessing on its threads; counts what is inside so it can refuse and report it."""

    def __init__(self, threads: int, max_images: int, max_bytes: int,
                 on_refused: Callable[[], None] = lambda: None):
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="preprocess")
        self.max_images, self.max_bytes, self.on_refused = max_images, max_bytes, on_refused
        self.images = 0  # waiting for a thread or running on one
        self.bytes = 0  # their payload sizes

    def admits(self, size: int) -> bool:
        """Whether an image of `size` bytes would be admitted now; a refusal is counted (for callers that refuse
        before doing anything else with the request)."""
        if self._full(size):
            self.on_refused()
            return False
        return True

    def _full(self, size: int) -> bool:
        return bool(self.images) and (self.images >= self.max_images or self.bytes + size > self.max_bytes)

    async def run(self, fn: Callable[..., T], *args, size: int) -> T:
        """fn(*args) on a preprocess thread; raises PreprocessQueueFull at once when the stage is full.

        An image leaves the count when its thread work ends (or is cancelled before it started), not when its
        caller stops waiting: a cancelled call whose decode already runs still occupies a thread."""
        if self._full(size):
            self.on_refused()
            raise PreprocessQueueFull(f"preprocessing is full ({self.images} images, {self.bytes} bytes waiting)")
        loop = asyncio.get_running_loop()
        self.images += 1
        self.bytes += size
        try:
            future = self.executor.submit(fn, *args)
        except BaseException:
            self._release(size)
            raise

        def done(_) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown: nothing left to count
                loop.call_soon_threadsafe(self._release, size)

        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def _release(self, size: int) -> None:
        self.images -= 1
        self.bytes -= size

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
