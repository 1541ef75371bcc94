"""admission: the preprocess stage's bound (server/resnet_serve/server/admission.py). At most `max_images` images
holding at most `max_bytes` are inside; one request is always admitted when nothing is inside; a refusal is
PreprocessQueueFull (a QueueFull: RESOURCE_EXHAUSTED) at once, counted. Real threads, gated by events."""

from __future__ import annotations

import asyncio
import threading

import pytest

from resnet_serve.server.admission import PreprocessPool, PreprocessQueueFull
from resnet_serve.server.batcher import QueueFull
from tests.unit.serving_parts import run


class Gated:
    """A thread job that reports it started and then waits for its gate (so the stage stays occupied)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()

    def __call__(self, value: str) -> str:
        self.started.set()
        assert self.gate.wait(30)
        return value


class Refusals:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_an_empty_stage_admits_one_request_of_any_size() -> None:
    refusals = Refusals()
    pool = PreprocessPool(1, max_images=1, max_bytes=10, on_refused=refusals)
    try:
        assert pool.admits(10_000)
        assert run(pool.run(str.upper, "big", size=10_000)) == "BIG"
        assert (pool.images, pool.bytes, refusals.count) == (0, 0, 0)
    finally:
        pool.shutdown()


@pytest.mark.parametrize(("max_images", "max_bytes", "second", "admitted"), [
    (2, 100, 60, True),    # 2 images, 100 bytes: exactly at both bounds
    (2, 100, 61, False),   # one byte past max_bytes
    (1, 1000, 1, False),   # one image past max_images
])
def test_a_second_image_is_admitted_up_to_the_bounds_and_refused_one_past(max_images: int, max_bytes: int,
                                                                           second: int, admitted: bool) -> None:
    async def body() -> None:
        refusals = Refusals()
        pool = PreprocessPool(2, max_images=max_images, max_bytes=max_bytes, on_refused=refusals)
        job = Gated()
        try:
            first = asyncio.create_task(pool.run(job, "first", size=40))
            await asyncio.to_thread(job.started.wait, 30)
            assert (pool.images, pool.bytes) == (1, 40)
            assert pool.admits(second) is admitted
            if admitted:
                second_job = asyncio.create_task(pool.run(str.upper, "second", size=second))
            else:
                with pytest.raises(PreprocessQueueFull) as raised:
                    await pool.run(str.upper, "second", size=second)
                assert str(raised.value) == "preprocessing is full (1 images, 40 bytes waiting)"
                assert isinstance(raised.value, QueueFull)  # the error table's RESOURCE_EXHAUSTED
            # admits() and run() both count a refusal
            assert refusals.count == (0 if admitted else 2)
            job.gate.set()
            assert await first == "first"
            if admitted:
                assert await second_job == "SECOND"
            assert (pool.images, pool.bytes) == (0, 0)
        finally:
            job.gate.set()
            pool.shutdown()

    run(body())


def test_a_failing_job_leaves_the_count_and_raises_its_error() -> None:
    pool = PreprocessPool(1, max_images=1, max_bytes=10)
    try:
        with pytest.raises(ValueError, match="invalid literal"):
            run(pool.run(int, "not a number", size=5))
        assert (pool.images, pool.bytes) == (0, 0)
    finally:
        pool.shutdown()


def test_a_cancelled_caller_whose_job_runs_still_occupies_the_stage_until_the_job_ends() -> None:
    async def body() -> None:
        pool = PreprocessPool(1, max_images=2, max_bytes=30)
        job = Gated()
        try:
            task = asyncio.create_task(pool.run(job, "x", size=30))
            await asyncio.to_thread(job.started.wait, 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (pool.images, pool.bytes) == (1, 30)  # the decode still holds its thread
            assert not pool.admits(1)
            job.gate.set()
            # The one thread runs a later job only once this one ended: its answer proves both were counted back.
            assert await pool.run(str.upper, "after", size=0) == "AFTER"
            assert (pool.images, pool.bytes) == (0, 0)
        finally:
            job.gate.set()
            pool.shutdown()

    run(body())


def test_a_job_cancelled_before_its_thread_started_leaves_the_count() -> None:
    async def body() -> None:
        pool = PreprocessPool(1, max_images=2, max_bytes=100)
        job = Gated()
        try:
            running = asyncio.create_task(pool.run(job, "a", size=10))
            await asyncio.to_thread(job.started.wait, 30)
            waiting = asyncio.create_task(pool.run(str.upper, "b", size=20))
            await asyncio.to_thread(lambda: None)  # lets `waiting` submit its job behind the running one
            assert (pool.images, pool.bytes) == (2, 30)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            job.gate.set()
            assert await running == "a"
            assert (pool.images, pool.bytes) == (0, 0)
        finally:
            job.gate.set()
            pool.shutdown()

    run(body())
