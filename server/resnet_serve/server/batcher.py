"""Dynamic batching of single requests into engine-sized batches.

Knows nothing of gRPC or Paddle: requests are numpy arrays, engines are blocking callables ("runners") that
are run in worker threads so the event loop stays responsive. See docs/architecture.md, "Dynamic batching".

Rules, in short:
- one consumer task per runner; each handles one batch at a time, the next batch forms while it computes
  (an engine may hand out several runners over one device, e.g. engine.py's one per worker slot: then one
  consumer's batch is written while another's computes);
- a batch closes when ``max_batch_size`` requests are queued ("full"), when its oldest request has waited
  ``max_queue_delay_us`` since *arrival* ("delay"), when the oldest arrived at a completely idle server
  ("idle": waiting could not fill it), or while draining ("drain");
- the size taken is ``min(queued, max_batch_size)`` rounded down to a bucket, never padded;
- expired or abandoned requests are dropped before they take a batch slot.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# A runner gets the batch's items as a list (one array per request, in order; they need not share a dtype) and
# returns outputs whose row i answers item i. It writes them where its engine wants them, with no stacking copy.
Runner = Callable[[list[np.ndarray]], np.ndarray]


def default_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below max_batch_size, plus max_batch_size itself: few shapes to warm, none padded."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch_size)


@dataclass(frozen=True)
class BatchPolicy:
    """Batching knobs; buckets default to powers of two up to max_batch_size plus max_batch_size."""

    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    max_queue_size: int = 256
    buckets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.buckets:
            buckets = tuple(sorted(set(self.buckets)))
            if buckets[0] != 1 or buckets[-1] != self.max_batch_size:
                raise ValueError(
                    f"buckets must contain 1 and max_batch_size={self.max_batch_size} and nothing outside "
                    f"[1, max_batch_size], got {self.buckets}"
                )
        else:
            buckets = default_buckets(self.max_batch_size)
        # Frozen dataclass: normalise the field in place once, so everyone sees the effective buckets.
        object.__setattr__(self, "buckets", buckets)

    def bucket_floor(self, n: int) -> int:
        """Largest bucket <= n (n >= 1); 1 is always a bucket so this never fails."""
        return self.buckets[bisect.bisect_right(self.buckets, n) - 1]


class QueueFull(Exception):
    """max_queue_size requests already queued (-> RESOURCE_EXHAUSTED)."""


class DeadlineExpired(Exception):
    """The request's deadline passed before it was computed (-> DEADLINE_EXCEEDED)."""


class ShuttingDown(Exception):
    """The batcher is draining or stopped and accepts no more work (-> UNAVAILABLE)."""


class BatcherObserver:
    """No-op hooks; the server subclasses this to record metrics. Always called on the event loop thread."""

    def on_queue_depth(self, depth: int) -> None:
        """Queued (not yet dispatched) requests changed."""

    def on_dropped(self, reason: str) -> None:
        """A request was refused or dropped before compute: "deadline" | "cancelled" | "queue_full"."""

    def on_batch(self, size: int, reason: str, queue_waits_s: list[float]) -> None:
        """A batch was dispatched: "full" | "delay" | "idle" | "drain"; waits are per request, in seconds."""

    def on_batch_done(self, size: int, seconds: float, ok: bool) -> None:
        """A runner call finished (wall time of the call)."""

    def on_in_flight(self, n: int) -> None:
        """Requests submitted and not yet answered changed."""


class _Request:
    """One queued request. Compared by identity (never by its numpy payload)."""

    __slots__ = ("item", "deadline", "arrival", "future", "idle", "queued")

    def __init__(self, item: np.ndarray, deadline: float | None, arrival: float, future: asyncio.Future,
                 idle: bool) -> None:
        self.item = item
        self.deadline = deadline
        self.arrival = arrival
        self.future = future
        self.idle = idle        # arrived at a completely idle server: dispatch without waiting
        self.queued = True      # still in the queue (not dispatched, dropped or failed)


class Batcher:
    """Groups concurrent submit() calls into batches and runs them on a pool of runners."""

    def __init__(self, runners: Sequence[Runner], policy: BatchPolicy,
                 observer: BatcherObserver | None = None) -> None:
        if not runners:
            raise ValueError("at least one runner is required")
        self._runners = list(runners)
        self._policy = policy
        self._obs = observer if observer is not None else BatcherObserver()
        self._delay_s = policy.max_queue_delay_us / 1e6
        self._queue: collections.deque[_Request] = collections.deque()
        # Generation event: set and replaced on every relevant change. Waiters grab the current one
        # before checking state; everything runs on one loop thread, so no wake-up can be missed.
        self._changed = asyncio.Event()
        self._consumers: list[asyncio.Task] = []
        self._executor: ThreadPoolExecutor | None = None
        self._computing = 0
        self._in_flight = 0
        self._batches = 0
        self._closing = False
        self._stopped = False

    # ---- public state -------------------------------------------------------------------------------

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @property
    def queue_depth(self) -> int:
        """Queued, not yet dispatched."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Submitted, not yet answered."""
        return self._in_flight

    @property
    def batches_dispatched(self) -> int:
        return self._batches

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start one consumer task per runner (idempotent while running)."""
        if self._stopped:
            raise RuntimeError("batcher was stopped; create a new one")
        if self._consumers:
            return
        self._executor = ThreadPoolExecutor(max_workers=len(self._runners), thread_name_prefix="batcher")
        self._consumers = [
            asyncio.create_task(self._consume(runner), name=f"batcher-consumer-{i}")
            for i, runner in enumerate(self._runners)
        ]

    async def drain(self) -> None:
        """Stop accepting, dispatch everything queued at once, return when every request is answered."""
        self._closing = True
        self._notify()
        if not self._consumers:
            # Nobody would ever dispatch the queue: answer it rather than hang.
            self._fail_queued()
        while self._queue or self._computing or self._in_flight:
            await self._changed.wait()

    async def stop(self) -> None:
        """Cancel consumers and shut the executor down; pending requests get ShuttingDown. Safe twice."""
        self._closing = True
        self._stopped = True
        tasks, self._consumers = self._consumers, []
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_queued()
        if self._executor is not None:
            # Don't wait: a runner stuck in compute must not hang shutdown; its result is discarded.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._notify()

    # ---- submit -------------------------------------------------------------------------------------

    async def submit(self, item: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Queue one request and return its output row; see the module doc for the batching rules."""
        return (await self.submit_many((item,), deadline))[0]

    async def submit_many(self, items: Sequence[np.ndarray], deadline: float | None = None) -> list[np.ndarray]:
        """Queue several requests at once (the images of one message) and return their output rows in order.

        Admitted all or none (a message is answered whole), with one wake-up of the consumers and one wait, so
        the N images of a message pay the per-call costs once. The first failure abandons the rest and is
        raised; a cancellation or the deadline abandons every one still unanswered."""
        n = len(items)
        if self._closing:
            raise ShuttingDown("server is shutting down")
        if len(self._queue) + n > self._policy.max_queue_size:
            for _ in range(n):
                self._obs.on_dropped("queue_full")
            raise QueueFull(f"queue full ({self._policy.max_queue_size} requests waiting)" if n == 1 else
                            f"no room for {n} images in the queue ({len(self._queue)} of "
                            f"{self._policy.max_queue_size} places taken)")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            for _ in range(n):
                self._obs.on_dropped("deadline")
            raise DeadlineExpired("deadline passed before the request was queued")

        loop = asyncio.get_running_loop()
        idle = not self._queue and self._computing == 0  # all of them arrived at an idle server: none waits
        reqs = [_Request(item, deadline, now, loop.create_future(), idle) for item in items]
        self._queue.extend(reqs)
        self._in_flight += n
        self._obs.on_queue_depth(len(self._queue))
        self._obs.on_in_flight(self._in_flight)
        self._notify()
        futures = [req.future for req in reqs]
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                # asyncio.wait neither cancels the futures on timeout nor when this task is cancelled.
                await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
            except asyncio.CancelledError:
                # gRPC cancels the handler when the caller's deadline passes, sometimes just before our own
                # timer fires: a request cancelled at or after its deadline is a deadline drop.
                expired = deadline is not None and time.monotonic() >= deadline
                self._abandon(reqs, "deadline" if expired else "cancelled")
                raise
            failed = next((f for f in futures if f.done() and not f.cancelled() and f.exception()), None)
            if failed is not None:
                self._abandon(reqs, "cancelled")  # its siblings: the message fails whole
                raise failed.exception()
            if all(f.done() for f in futures):
                return [f.result() for f in futures]
            self._abandon(reqs, "deadline")
            raise DeadlineExpired("deadline passed before the request was computed")
        finally:
            self._in_flight -= n
            self._obs.on_in_flight(self._in_flight)
            if self._closing and self._in_flight == 0:
                self._notify()

    def _abandon(self, reqs: list[_Request], reason: str) -> None:
        """The submitter left: free the queue slots of its requests at once (one pass over the queue), or discard
        the results of those already dispatched."""
        leaving = [req for req in reqs if req.queued]
        if leaving:
            ids = {id(req) for req in leaving}
            self._queue = collections.deque(req for req in self._queue if id(req) not in ids)
            for req in leaving:
                req.queued = False
                self._obs.on_dropped(reason)
            self._obs.on_queue_depth(len(self._queue))
            self._notify()
        # Cancelled futures are skipped by the consumer and never log "exception was never retrieved".
        for req in reqs:
            req.future.cancel()

    # ---- consumers ----------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _fail_queued(self) -> None:
        """Answer everything still queued with ShuttingDown."""
        if not self._queue:
            return
        while self._queue:
            req = self._queue.popleft()
            req.queued = False
            if not req.future.done():
                req.future.set_exception(ShuttingDown("server is shutting down"))
        self._obs.on_queue_depth(0)

    def _purge(self) -> None:
        """Drop expired or abandoned requests so they never take a batch slot."""
        now = time.monotonic()
        kept: list[_Request] = []
        dropped = False
        for req in self._queue:
            if req.future.done():  # cancelled (or otherwise answered) by its submitter
                reason = "cancelled"
            elif req.deadline is not None and req.deadline <= now:
                req.future.set_exception(DeadlineExpired("deadline passed while queued"))
                reason = "deadline"
            else:
                kept.append(req)
                continue
            req.queued = False
            dropped = True
            self._obs.on_dropped(reason)
        if dropped:
            self._queue = collections.deque(kept)
            self._obs.on_queue_depth(len(self._queue))

    async def _next_batch(self) -> tuple[list[_Request], str]:
        """Wait until a batch may close; pop it (synchronously with the decision, so consumers never race)."""
        while True:
            changed = self._changed
            self._purge()
            if self._queue:
                n = len(self._queue)
                head = self._queue[0]
                wait_left = 0.0
                if n >= self._policy.max_batch_size:
                    reason = "full"
                elif self._closing:
                    reason = "drain"
                elif head.idle:
                    reason = "idle"
                else:
                    reason = "delay"
                    wait_left = head.arrival + self._delay_s - time.monotonic()
                if wait_left <= 0:
                    size = self._policy.bucket_floor(min(n, self._policy.max_batch_size))
                    batch = [self._queue.popleft() for _ in range(size)]
                    for req in batch:
                        req.queued = False
                    self._computing += 1
                    self._batches += 1
                    return batch, reason
                # Not asyncio.wait_for: on Python 3.11 it returns a wakeup that coincides with a cancellation and
                # drops the cancellation, and stop() then waited for this consumer forever.
                waiter = asyncio.ensure_future(changed.wait())
                try:
                    await asyncio.wait((waiter,), timeout=wait_left)
                finally:
                    waiter.cancel()
            else:
                await changed.wait()

    async def _consume(self, runner: Runner) -> None:
        """One consumer per runner: form a batch, compute it in a worker thread, answer, repeat."""
        loop = asyncio.get_running_loop()
        while True:
            batch, reason = await self._next_batch()
            try:
                await self._run_batch(loop, runner, batch, reason)
            except asyncio.CancelledError:
                raise
            except Exception:  # an observer bug must not kill the consumer and strand the queue
                log.exception("batcher consumer error")
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(RuntimeError("internal batcher error"))

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, runner: Runner, batch: list[_Request],
                         reason: str) -> None:
        size = len(batch)
        ok = False
        t0 = time.monotonic()
        try:
            self._obs.on_queue_depth(len(self._queue))
            self._obs.on_batch(size, reason, [t0 - r.arrival for r in batch])
            items = [r.item for r in batch]
            assert self._executor is not None
            try:
                # Stack in the worker thread too: copying a large batch would otherwise block the loop.
                out = await loop.run_in_executor(self._executor, _run_items, runner, items)
            except asyncio.CancelledError:
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(ShuttingDown("server stopped during compute"))
                raise
            except Exception as exc:  # the runner's failure is this batch's answer, nobody else's
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)
                return
            ok = True
            for i, req in enumerate(batch):
                if not req.future.done():
                    req.future.set_result(out[i])
        finally:
            self._computing -= 1
            self._obs.on_batch_done(size, time.monotonic() - t0, ok)
            if self._closing:
                self._notify()


def _run_items(runner: Runner, items: list[np.ndarray]) -> np.ndarray:
    """Worker-thread body: run, check that row i can answer request i."""
    n = len(items)
    out = np.asarray(runner(items))
    if out.ndim == 0 or out.shape[0] != n:
        raise RuntimeError(f"runner returned shape {out.shape} for a batch of {n}")
    return out
