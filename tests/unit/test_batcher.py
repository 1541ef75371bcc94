"""Batcher tests: ordering is controlled with gates (threading/asyncio events), never with wall-clock sleeps.

Fake runners return item * 2 so each request can check it got its own row back; a gated runner holds a batch
"computing" until the test opens its gate. Large queue delays make accumulation deterministic.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import pytest

from resnet_serve.server.batcher import (
    Batcher,
    BatcherObserver,
    BatchPolicy,
    DeadlineExpired,
    QueueFull,
    ShuttingDown,
)

T = TypeVar("T")
SAFETY_S = 30.0  # safety net only: no test should come anywhere near it
BIG_DELAY_US = 10_000_000


def run(coro: Awaitable[T]) -> T:
    """Run one async test body with a global safety timeout."""

    async def main() -> T:
        return await asyncio.wait_for(coro, SAFETY_S)

    return asyncio.run(main())


def item(v: float) -> np.ndarray:
    return np.full((3, 2, 2), v, dtype=np.float32)


class FakeRunner:
    """Records batch sizes/rows; optionally holds every call until `gate` opens; returns x * 2."""

    def __init__(self, held: bool = False, fail_on_call: int | None = None) -> None:
        self.sizes: list[int] = []
        self.rows: list[float] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not held:
            self.gate.set()
        self.fail_on_call = fail_on_call
        self.error = ValueError("boom")
        self._lock = threading.Lock()

    def __call__(self, items: list[np.ndarray]) -> np.ndarray:
        x = np.stack(items)
        with self._lock:
            call = len(self.sizes)
            self.sizes.append(len(x))
            self.rows.extend(float(r[0, 0, 0]) for r in x)
        self.entered.set()
        if not self.gate.wait(SAFETY_S):
            raise TimeoutError("test gate never opened")
        if call == self.fail_on_call:
            raise self.error
        return x * 2

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, SAFETY_S), "runner never entered"


class Recorder(BatcherObserver):
    """Records every observer call and lets a test await a condition over the batcher's state."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, str, list[float]]] = []
        self.done: list[tuple[int, bool]] = []
        self.dropped: list[str] = []
        self.depths: list[int] = []
        self.in_flights: list[int] = []
        self._changed = asyncio.Event()

    def _poke(self) -> None:
        self._changed.set()

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)
        self._poke()

    def on_dropped(self, reason: str) -> None:
        self.dropped.append(reason)
        self._poke()

    def on_batch(self, size: int, reason: str, queue_waits_s: list[float]) -> None:
        self.batches.append((size, reason, queue_waits_s))
        self._poke()

    def on_batch_done(self, size: int, seconds: float, ok: bool) -> None:
        self.done.append((size, ok))
        self._poke()

    def on_in_flight(self, n: int) -> None:
        self.in_flights.append(n)
        self._poke()

    @property
    def reasons(self) -> list[str]:
        return [r for _, r, _ in self.batches]

    @property
    def sizes(self) -> list[int]:
        return [s for s, _, _ in self.batches]

    async def until(self, pred: Callable[[], bool]) -> None:
        """Wait (without polling) until pred() holds; re-checked after every observer call."""
        while True:
            self._changed.clear()
            if pred():
                return
            await self._changed.wait()


async def make(runners: list[FakeRunner], **policy: int) -> tuple[Batcher, Recorder]:
    rec = Recorder()
    b = Batcher(runners, BatchPolicy(**policy), rec)
    await b.start()
    return b, rec


def submit(b: Batcher, v: float, deadline: float | None = None) -> asyncio.Task[np.ndarray]:
    return asyncio.create_task(b.submit(item(v), deadline))


async def start_held(b: Batcher, rec: Recorder, runner: FakeRunner) -> asyncio.Task[np.ndarray]:
    """Submit request 0 to the idle batcher and wait until the runner is holding it."""
    first = submit(b, 0)
    await runner.wait_entered()
    assert rec.batches == [(1, "idle", rec.batches[0][2])]
    return first


# ---- policy -------------------------------------------------------------------------------------------


def test_policy_default_buckets() -> None:
    assert BatchPolicy(max_batch_size=8).buckets == (1, 2, 4, 8)
    assert BatchPolicy(max_batch_size=6).buckets == (1, 2, 4, 6)
    assert BatchPolicy(max_batch_size=1).buckets == (1,)
    assert BatchPolicy(max_batch_size=8, buckets=(8, 1, 3)).buckets == (1, 3, 8)
    assert BatchPolicy(max_batch_size=8, buckets=(1, 3, 8)).bucket_floor(7) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 8, "buckets": (2, 8)},
        {"max_batch_size": 8, "buckets": (1, 4)},
        {"max_batch_size": 8, "buckets": (1, 8, 16)},
        {"max_batch_size": 0},
        {"max_queue_delay_us": -1},
        {"max_queue_size": 0},
    ],
)
def test_policy_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**kwargs)


# ---- batching -----------------------------------------------------------------------------------------


def test_results_map_back_to_their_requests() -> None:
    async def body() -> None:
        runner = FakeRunner()
        b, _ = await make([runner], max_batch_size=8, max_queue_delay_us=0)
        try:
            values = [float(i) for i in range(1, 21)]
            outs = await asyncio.gather(*(b.submit(item(v)) for v in values))
            for v, out in zip(values, outs, strict=True):
                np.testing.assert_array_equal(out, item(v) * 2)
            assert sorted(runner.rows) == values
            assert b.in_flight == 0 and b.queue_depth == 0
        finally:
            await b.stop()

    run(body())


def test_32_concurrent_form_full_batches() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US)
        try:
            tasks = [submit(b, v) for v in range(32)]
            await runner.wait_entered()
            runner.gate.set()
            outs = await asyncio.gather(*tasks)
            for v, out in enumerate(outs):
                np.testing.assert_array_equal(out, item(v) * 2)
            assert 4 <= len(runner.sizes) <= 8
            assert runner.sizes == rec.sizes == [8, 8, 8, 8]
            assert rec.reasons == ["full"] * 4
            assert b.batches_dispatched == 4
        finally:
            await b.stop()

    run(body())


def test_idle_first_then_work_conserving_buckets_only() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=0)
        try:
            first = await start_held(b, rec, runner)
            rest = [submit(b, v) for v in range(1, 32)]
            await rec.until(lambda: b.queue_depth == 31)
            assert b.batches_dispatched == 1  # nothing else dispatched while the only runner is busy
            runner.gate.set()
            outs = await asyncio.gather(first, *rest)
            for v, out in enumerate(outs):
                np.testing.assert_array_equal(out, item(v) * 2)
            assert 4 <= len(runner.sizes) <= 8
            assert set(runner.sizes) <= set(b.policy.buckets)
            assert runner.sizes == [1, 8, 8, 8, 4, 2, 1]  # 31 -> 8, 8, 8, then 7 rounded down: 4, 2, 1
            assert rec.reasons == ["idle", "full", "full", "full", "delay", "delay", "delay"]
        finally:
            await b.stop()

    run(body())


def test_custom_buckets_round_down_never_pad() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=0, buckets=(1, 3, 8))
        try:
            first = await start_held(b, rec, runner)
            rest = [submit(b, v) for v in range(1, 8)]
            await rec.until(lambda: b.queue_depth == 7)
            runner.gate.set()
            await asyncio.gather(first, *rest)
            assert runner.sizes == [1, 3, 3, 1]
            assert sorted(runner.rows) == list(range(8))
        finally:
            await b.stop()

    run(body())


def test_lone_request_on_idle_server_is_not_delayed() -> None:
    async def body() -> None:
        runner = FakeRunner()
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=60_000_000)
        try:
            out = await asyncio.wait_for(b.submit(item(5)), SAFETY_S)
            np.testing.assert_array_equal(out, item(5) * 2)
            assert rec.reasons == ["idle"]
        finally:
            await b.stop()

    run(body())


def test_below_max_waits_while_busy_then_goes_out_on_delay() -> None:
    """Delay 0: requests accumulate only while the runner is busy; then the free consumer takes them."""

    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=0)
        try:
            first = await start_held(b, rec, runner)
            rest = [submit(b, v) for v in (1, 2, 3)]
            await rec.until(lambda: b.queue_depth == 3)
            assert b.batches_dispatched == 1
            runner.gate.set()
            await asyncio.gather(first, *rest)
            assert rec.sizes == [1, 2, 1]
            assert rec.reasons == ["idle", "delay", "delay"]
        finally:
            await b.stop()

    run(body())


def test_queued_behind_busy_server_waits_for_delay_not_idle() -> None:
    """Requests that arrive while a batch computes are not "idle": with a huge delay they stay queued."""

    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US)
        try:
            first = await start_held(b, rec, runner)
            rest = [submit(b, v) for v in (1, 2, 3)]
            await rec.until(lambda: b.queue_depth == 3)
            runner.gate.set()
            await first
            await rec.until(lambda: len(rec.done) == 1)
            for _ in range(5):
                await asyncio.sleep(0)  # let the consumer run; it must not dispatch before the 10 s delay
            assert b.queue_depth == 3 and b.batches_dispatched == 1
            await b.drain()
            assert [t.result()[0, 0, 0] for t in rest] == [2.0, 4.0, 6.0]
            assert rec.reasons == ["idle", "drain", "drain"]
            assert rec.sizes == [1, 2, 1]
        finally:
            await b.stop()

    run(body())


def test_short_delay_dispatches_with_reason_delay() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        delay_us = 50_000
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=delay_us)
        try:
            first = await start_held(b, rec, runner)
            rest = [submit(b, v) for v in (1, 2)]
            await rec.until(lambda: b.queue_depth == 2)
            runner.gate.set()
            await asyncio.gather(first, *rest)
            assert rec.reasons == ["idle", "delay"]
            size, _, waits = rec.batches[1]
            assert size == 2 and waits[0] >= delay_us / 1e6 * 0.999  # the oldest waited the full delay
        finally:
            await b.stop()

    run(body())


# ---- admission, deadlines, cancellation ---------------------------------------------------------------


def test_queue_full() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US, max_queue_size=2)
        try:
            first = await start_held(b, rec, runner)  # dispatched: does not count against the queue
            queued = [submit(b, v) for v in (1, 2)]
            await rec.until(lambda: b.queue_depth == 2)
            with pytest.raises(QueueFull):
                await b.submit(item(3))
            assert rec.dropped == ["queue_full"]
            runner.gate.set()
            await b.drain()
            await asyncio.gather(first, *queued)
            assert sorted(runner.rows) == [0, 1, 2]
        finally:
            await b.stop()

    run(body())


def test_deadline_expires_while_queued() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US)
        try:
            first = await start_held(b, rec, runner)
            doomed = submit(b, 1, deadline=time.monotonic() + 0.05)
            keeper = submit(b, 2)
            with pytest.raises(DeadlineExpired):
                await doomed  # answered at its deadline, while the runner is still held
            assert not runner.gate.is_set()
            assert rec.dropped == ["deadline"]
            assert b.queue_depth == 1
            runner.gate.set()
            await b.drain()
            assert (await first)[0, 0, 0] == 0 and (await keeper)[0, 0, 0] == 4
            assert sorted(runner.rows) == [0, 2]  # the expired request never reached the runner
            with pytest.raises(DeadlineExpired):  # already past at submit: refused at once
                await Batcher([runner], BatchPolicy()).submit(item(9), deadline=time.monotonic() - 1)
        finally:
            await b.stop()

    run(body())


def test_cancel_frees_queue_slot() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US, max_queue_size=2)
        try:
            first = await start_held(b, rec, runner)
            gone = submit(b, 1)
            stays = submit(b, 2)
            await rec.until(lambda: b.queue_depth == 2)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert b.queue_depth == 1
            assert rec.dropped == ["cancelled"]
            late = submit(b, 3)  # the freed slot is usable at once
            await rec.until(lambda: b.queue_depth == 2)
            runner.gate.set()
            await b.drain()
            await asyncio.gather(first, stays, late)
            assert sorted(runner.rows) == [0, 2, 3]
            assert b.in_flight == 0
        finally:
            await b.stop()

    run(body())


def test_cancel_after_dispatch_discards_result() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US)
        try:
            first = await start_held(b, rec, runner)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert b.in_flight == 0 and rec.dropped == []
            runner.gate.set()
            await rec.until(lambda: len(rec.done) == 1)
            assert rec.done == [(1, True)]
            out = await b.submit(item(7))
            assert out[0, 0, 0] == 14
        finally:
            await b.stop()

    run(body())


# ---- the images of one message (submit_many) ------------------------------------------------------------


def submit_many(b: Batcher, *values: float, deadline: float | None = None) -> asyncio.Task[list[np.ndarray]]:
    return asyncio.create_task(b.submit_many([item(v) for v in values], deadline))


def test_submit_many_at_an_idle_server_goes_out_at_once_in_order() -> None:
    async def body() -> None:
        runner = FakeRunner()
        b, rec = await make([runner], max_batch_size=4, max_queue_delay_us=BIG_DELAY_US)
        try:
            rows = await b.submit_many([item(v) for v in range(6)])
            assert [r[0, 0, 0] for r in rows] == [2.0 * v for v in range(6)]
            assert rec.sizes == [4, 2] and rec.reasons == ["full", "idle"]  # none waited out the 10 s delay
            assert b.in_flight == 0 and rec.in_flights[-1] == 0
        finally:
            await b.stop()

    run(body())


def test_submit_many_is_admitted_whole_or_not_at_all() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US, max_queue_size=4)
        try:
            first = await start_held(b, rec, runner)
            one = submit(b, 1)
            await rec.until(lambda: b.queue_depth == 1)
            with pytest.raises(QueueFull, match="no room for 4 images in the queue"):
                await b.submit_many([item(v) for v in (2, 3, 4, 5)])
            assert b.queue_depth == 1 and b.in_flight == 2
            assert rec.dropped == ["queue_full"] * 4  # every refused image counted
            three = submit_many(b, 2, 3, 4)  # exactly the room left
            await rec.until(lambda: b.queue_depth == 4)
            runner.gate.set()
            await b.drain()
            assert (await one)[0, 0, 0] == 2 and [r[0, 0, 0] for r in await three] == [4, 6, 8]
            await first
        finally:
            await b.stop()

    run(body())


def test_a_cancelled_message_leaves_the_queue_whole() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US)
        try:
            first = await start_held(b, rec, runner)
            stays = submit(b, 1)
            gone = submit_many(b, 2, 3, 4)
            await rec.until(lambda: b.queue_depth == 4)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert b.queue_depth == 1 and b.in_flight == 2 and rec.dropped == ["cancelled"] * 3
            runner.gate.set()
            await b.drain()
            assert (await stays)[0, 0, 0] == 2
            await first
            assert sorted(runner.rows) == [0, 1]
        finally:
            await b.stop()

    run(body())


def test_a_failed_batch_fails_its_message_and_the_rest_of_it_is_abandoned() -> None:
    """Batch size 2, a message of 4: its first batch fails, so the message fails; its other two images leave the
    queue (dropped as cancelled) or, if the free consumer took them first, their results are discarded. Either way
    nothing of the message stays inside."""

    async def body() -> None:
        runner = FakeRunner(held=True, fail_on_call=0)
        b, rec = await make([runner], max_batch_size=2, max_queue_delay_us=0)
        try:
            message = submit_many(b, 1, 2, 3, 4)
            await runner.wait_entered()
            await rec.until(lambda: b.queue_depth == 2)
            runner.gate.set()
            with pytest.raises(ValueError, match="boom"):
                await message
            assert b.queue_depth == 0 and b.in_flight == 0 and set(rec.dropped) <= {"cancelled"}
            assert runner.rows[:2] == [1, 2]
            assert (await b.submit(item(5)))[0, 0, 0] == 10
        finally:
            await b.stop()

    run(body())


# ---- failures and concurrency -------------------------------------------------------------------------


def test_runner_exception_goes_to_that_batch_only() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True, fail_on_call=1)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=0)
        try:
            first = await start_held(b, rec, runner)
            failing = [submit(b, v) for v in (1, 2)]
            await rec.until(lambda: b.queue_depth == 2)
            runner.gate.set()
            assert (await first)[0, 0, 0] == 0
            results = await asyncio.gather(*failing, return_exceptions=True)
            assert all(r is runner.error for r in results)
            assert (await b.submit(item(3)))[0, 0, 0] == 6
            assert rec.done == [(1, True), (2, False), (1, True)]
        finally:
            await b.stop()

    run(body())


def test_bad_runner_output_shape_fails_batch() -> None:
    async def body() -> None:
        b, _ = await make([lambda items: np.stack(items)[:1]], max_batch_size=8, max_queue_delay_us=0)
        try:
            assert (await b.submit(item(1)))[0, 0, 0] == 1  # batch of one: one row back is fine
            results = await asyncio.gather(*(b.submit(item(v)) for v in range(8)), return_exceptions=True)
            assert all(isinstance(r, RuntimeError) for r in results)
        finally:
            await b.stop()

    run(body())


def test_two_runners_compute_concurrently() -> None:
    async def body() -> None:
        r0, r1 = FakeRunner(held=True), FakeRunner(held=True)
        b, rec = await make([r0, r1], max_batch_size=8, max_queue_delay_us=0)
        try:
            a = submit(b, 1)
            await rec.until(lambda: b.batches_dispatched == 1)
            c = submit(b, 2)  # one batch computing, the other consumer is free: work-conserving
            await r0.wait_entered()
            await r1.wait_entered()  # both held at once: two batches in compute concurrently
            assert not a.done() and not c.done()
            r0.gate.set()
            r1.gate.set()
            assert [(await a)[0, 0, 0], (await c)[0, 0, 0]] == [2, 4]
            assert rec.reasons == ["idle", "delay"]
        finally:
            await b.stop()

    run(body())


# ---- drain and stop -----------------------------------------------------------------------------------


def test_drain_answers_everything_then_refuses() -> None:
    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US)
        try:
            first = await start_held(b, rec, runner)
            queued = [submit(b, v) for v in range(1, 6)]
            await rec.until(lambda: b.queue_depth == 5)
            draining = asyncio.create_task(b.drain())
            runner.gate.set()
            await rec.until(lambda: "drain" in rec.reasons)
            with pytest.raises(ShuttingDown):
                await b.submit(item(99))
            await draining
            assert all(t.done() for t in [first, *queued])
            assert [t.result()[0, 0, 0] for t in [first, *queued]] == [0, 2, 4, 6, 8, 10]
            assert rec.sizes == [1, 4, 1] and rec.reasons == ["idle", "drain", "drain"]
            assert b.in_flight == 0 and b.queue_depth == 0
            with pytest.raises(ShuttingDown):
                await b.submit(item(99))
        finally:
            await b.stop()

    run(body())


def test_stop_answers_pending_and_leaves_no_tasks() -> None:
    async def body() -> None:
        before = asyncio.all_tasks()
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US)
        try:
            first = await start_held(b, rec, runner)
            queued = [submit(b, v) for v in (1, 2)]
            await rec.until(lambda: b.queue_depth == 2)
            await b.stop()
            results = await asyncio.gather(first, *queued, return_exceptions=True)
            assert all(isinstance(r, ShuttingDown) for r in results)
            assert b.in_flight == 0 and b.queue_depth == 0
            assert asyncio.all_tasks() == before  # consumers and submitters all finished
            await b.stop()  # idempotent
            with pytest.raises(ShuttingDown):
                await b.submit(item(3))
        finally:
            runner.gate.set()  # release the worker thread so the process can exit
            await b.stop()

    run(body())


def test_stop_right_after_a_wakeup_still_stops_the_consumer() -> None:
    """A consumer waiting out the queue delay is woken and cancelled in the same loop step (a drain and a stop
    together). asyncio.wait_for on Python 3.11 returns the wakeup and drops the cancellation; the consumer
    then waited for work forever and stop() never returned."""

    async def body() -> None:
        runner = FakeRunner(held=True)
        b, rec = await make([runner], max_batch_size=8, max_queue_delay_us=BIG_DELAY_US)
        try:
            first = await start_held(b, rec, runner)
            queued = submit(b, 1)
            await rec.until(lambda: b.queue_depth == 1)
            runner.gate.set()
            await first
            await rec.until(lambda: len(rec.done) == 1)
            for _ in range(5):
                await asyncio.sleep(0)  # the consumer is now waiting out the 10 s delay
            # drain() wakes the consumer and stop() cancels it, both before it runs again.
            await asyncio.gather(b.drain(), b.stop())
            assert isinstance((await asyncio.gather(queued, return_exceptions=True))[0], (ShuttingDown, np.ndarray))
        finally:
            await b.stop()

    run(body())


def test_every_request_gets_exactly_one_outcome_under_churn() -> None:
    """Mixed deadlines and cancellations on two runners: no future left pending, accounting consistent."""

    async def body() -> None:
        rng = np.random.default_rng(0)
        runners = [FakeRunner(), FakeRunner()]
        b, rec = await make(runners, max_batch_size=4, max_queue_delay_us=1000, max_queue_size=64)
        try:
            tasks = []
            for v in range(200):
                deadline = time.monotonic() + float(rng.uniform(0, 0.01)) if v % 3 == 0 else None
                tasks.append(submit(b, v, deadline))
                if v % 7 == 0:
                    tasks[rng.integers(len(tasks))].cancel()
                if v % 10 == 0:
                    await asyncio.sleep(0)  # let consumers interleave with arrivals (not for synchronisation)
            await asyncio.sleep(0)  # one scheduling step: every created task runs up to its first await
            assert b.in_flight + sum(t.done() for t in tasks) == len(tasks)  # none left to reach submit()
            await b.drain()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for v, r in enumerate(results):
                if isinstance(r, np.ndarray):
                    assert r[0, 0, 0] == 2 * v
                else:
                    assert isinstance(r, (DeadlineExpired, asyncio.CancelledError, QueueFull)), r
            assert b.in_flight == 0 and b.queue_depth == 0
            rows = sum(len(r.rows) for r in runners)
            assert rows == sum(rec.sizes) == sum(s for s, _ in rec.done)
            assert set(rec.sizes) <= {1, 2, 4}
            answered = sum(isinstance(r, np.ndarray) for r in results)
            assert answered <= rows  # rows of requests cancelled/expired after dispatch are discarded
        finally:
            await b.stop()

    run(body())
