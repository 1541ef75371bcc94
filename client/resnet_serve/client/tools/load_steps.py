"""One step of the load generator in one process, whatever the protocol: which requests count (Recorder), the
closed loop (workers or stream items), the open loop (Poisson arrivals), and a failed stream's accounting. The
protocol's calls come from a Transport (classifier_transport, oip_transport); the accounting is in
resnet_serve.client.tools.loadgen's docstring."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from resnet_serve.client.channel import ChannelOptions

MODES = ("unary", "stream")
PROTOCOLS = ("classifier", "oip")  # classifier.v1, or the Open Inference Protocol via tritonclient
INPUTS = ("raw", "jpeg")
MAX_BATCH = 1024  # images per request at most: a sanity cap (the server refuses N above its max_batch_size anyway)


@dataclass(frozen=True)
class LoadConfig:
    """One bench run: a sweep of steps over one mode and one input kind."""

    target: str
    mode: str = "unary"
    input: str = "raw"
    concurrency: Sequence[int] = (1,)
    rates: Sequence[float] = ()  # non-empty: open loop at these images/s instead of the concurrency sweep
    warmup_s: float = 1.0
    duration_s: float = 5.0
    requests: int = 0  # > 0: each step measures exactly this many requests, not a duration
    streams: int = 1  # streams per process in stream mode
    processes: int = 1
    top_k: int = 0
    timeout_s: float = 30.0  # per unary request
    input_hw: tuple[int, int] = (224, 224)
    options: ChannelOptions = field(default_factory=ChannelOptions)
    seed: int = 0
    protocol: str = "classifier"
    model: str = ""  # the model name OIP requests carry (protocol "oip")
    input_data: Sequence[bytes] = ()  # the user's image files (--input-data) instead of generated pictures
    batch: int = 1  # images per request (protocol "oip" only: classifier.v1 carries one image per message)

    def steps(self) -> list[tuple[str, float]]:
        """(kind, load) per step: ("concurrency", N) or ("rate", R)."""
        return [("rate", r) for r in self.rates] if self.rates else [("concurrency", c) for c in self.concurrency]

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {', '.join(INPUTS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        if self.protocol == "oip" and not self.model:
            raise ValueError("protocol oip needs the model name")
        if not self.rates and (not self.concurrency or min(self.concurrency) < 1):
            raise ValueError("concurrency values must be at least 1")
        if self.rates and min(self.rates) <= 0:
            raise ValueError("rates must be positive")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("duration must be positive and warm-up non-negative")
        if self.requests < 0:
            raise ValueError("requests must be positive")
        if self.streams < 1 or self.processes < 1:
            raise ValueError("streams and processes must be at least 1")
        if not 1 <= self.batch <= MAX_BATCH:
            raise ValueError(f"batch must be between 1 and {MAX_BATCH}")
        if self.batch > 1 and self.protocol != "oip":
            raise ValueError("batch > 1 needs protocol oip: classifier.v1 carries one image per message")


@dataclass
class Samples:
    """What one process measured in one step; merge() adds processes together."""

    window_s: float = 0.0
    warmup_requests: int = 0
    requests: int = 0
    ok_in_window: int = 0
    latencies_s: array = field(default_factory=lambda: array("d"))
    errors: Counter = field(default_factory=Counter)

    @staticmethod
    def merge(parts: Sequence[Samples]) -> Samples:
        out = Samples(window_s=max((p.window_s for p in parts), default=0.0))
        for p in parts:
            out.warmup_requests += p.warmup_requests
            out.requests += p.requests
            out.ok_in_window += p.ok_in_window
            out.latencies_s.extend(p.latencies_s)
            out.errors.update(p.errors)
        return out


class Recorder:
    """Sorts each request into warm-up or measured by its send time, and each answer into the window or not.
    With `limit`, the window is `limit` measured requests, however long they take."""

    def __init__(self, start: float, end: float, limit: int = 0):
        self.start, self.end, self.limit = start, end, limit
        self.s = Samples(window_s=0.0 if limit else end - start)
        self.last_done = start

    def open(self, t: float) -> bool:
        """May a request be sent at t? (Closed loop: the caller then calls sent(t) before any await.)"""
        if self.limit:
            return t < self.start or self.s.requests < self.limit
        return t < self.end

    def sent(self, t: float) -> None:
        if t < self.start:
            self.s.warmup_requests += 1
        else:
            self.s.requests += 1

    def done(self, t_sent: float, t_done: float, code: str | None) -> None:
        if self.limit:
            if code is None and t_sent >= self.start:
                self.s.ok_in_window += 1
                self.last_done = max(self.last_done, t_done)
                self.s.window_s = self.last_done - self.start
        elif code is None and self.start <= t_done < self.end:
            self.s.ok_in_window += 1
        if t_sent >= self.start:
            if code is None:
                self.s.latencies_s.append(t_done - t_sent)
            else:
                self.s.errors[code] += 1


class StreamFailed(Exception):
    """A stream ended by an error: every item it had not answered counts as an error of `code`."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


class Transport(Protocol):
    """One protocol's calls as a step needs them. `n` numbers a request: it picks the picture, and on a stream it
    is the item's request id (str(n))."""

    async def unary(self, n: int) -> str | None:
        """One call; None if it succeeded, else its gRPC code name."""
        ...

    def stream(self, items: AsyncIterator[int]) -> AsyncIterator[tuple[str | None, str | None]]:
        """One stream sending an item per number `items` gives (until it ends); yields (request id, code name
        or None) per answer, the id None for an error that names no request. Raises StreamFailed."""
        ...

    async def close(self) -> None: ...


class StepRunner:
    """Runs steps over one transport; `load` is this process's share (concurrency or rate), `requests` its
    share of config.requests."""

    def __init__(self, config: LoadConfig, transport: Transport, seed: int = 0, requests: int = 0):
        self.config = config
        self.transport = transport
        self.requests = requests
        self.rng = random.Random(seed)
        self._n = 0

    async def close(self) -> None:
        await self.transport.close()

    def _next(self) -> int:
        self._n += 1
        return self._n

    async def run(self, kind: str, load: float) -> Samples:
        if load <= 0:
            return Samples(window_s=self.config.duration_s)
        now = time.perf_counter()
        rec = Recorder(now + self.config.warmup_s, now + self.config.warmup_s + self.config.duration_s,
                       self.requests)
        if kind == "rate":  # `load` is images/s: requests of `batch` images arrive batch times less often
            await self._open_loop(rec, load / self.config.batch)
        elif self.config.mode == "unary":
            await asyncio.gather(*(self._unary_worker(rec) for _ in range(int(load))))
        else:
            await self._closed_streams(rec, int(load))
        return rec.s

    async def _one_unary(self, rec: Recorder, t0: float) -> None:
        rec.sent(t0)
        code = await self.transport.unary(self._next())
        rec.done(t0, time.perf_counter(), code)

    async def _unary_worker(self, rec: Recorder) -> None:
        while rec.open(t0 := time.perf_counter()):
            await self._one_unary(rec, t0)

    async def _closed_streams(self, rec: Recorder, concurrency: int) -> None:
        streams = min(self.config.streams, concurrency)
        shares = [concurrency // streams + (i < concurrency % streams) for i in range(streams)]

        async def worker(share: int) -> None:
            slots = asyncio.Semaphore(share)

            async def next_send() -> float | None:
                await slots.acquire()
                t = time.perf_counter()
                return t if rec.open(t) else None

            await self._stream(rec, next_send, slots.release)

        await asyncio.gather(*(worker(s) for s in shares))

    async def _open_loop(self, rec: Recorder, rate: float) -> None:
        """Poisson arrivals; unary: one task per arrival; stream: arrivals dealt round-robin to the streams."""
        queues: list[asyncio.Queue] = []
        tasks: set[asyncio.Task] = set()
        if self.config.mode == "stream":
            queues = [asyncio.Queue() for _ in range(self.config.streams)]
            tasks |= {asyncio.create_task(self._stream(rec, q.get, lambda: None)) for q in queues}
        t = time.perf_counter()
        k = measured = 0
        while True:  # arrivals are counted by their scheduled time, so a slow machine changes none of the counts
            t += self.rng.expovariate(rate)
            if rec.limit and t >= rec.start:
                if measured == rec.limit:
                    break
                measured += 1
            elif not rec.limit and t >= rec.end:
                break
            delay = t - time.perf_counter()
            await asyncio.sleep(max(0.0, delay))  # 0 still yields: answers are read while we are behind
            if queues:
                queues[k % len(queues)].put_nowait(t)
                k += 1
            else:
                task = asyncio.create_task(self._one_unary(rec, t))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        for q in queues:
            q.put_nowait(None)
        await asyncio.gather(*tasks)

    async def _stream(self, rec: Recorder, next_send: Callable[[], Awaitable[float | None]],
                      on_answer: Callable[[], None]) -> None:
        """Items over one stream until next_send() says stop; a stream that fails counts its unanswered items
        as errors of its code and is replaced while the step lasts. An answer naming no request we sent is put
        on the oldest unanswered one, so counts stay exact."""
        more = True
        while more:
            sent_at: dict[str, float] = {}
            try:
                async with contextlib.aclosing(self.transport.stream(self._items(rec, sent_at, next_send))) as answers:
                    async for rid, code in answers:
                        key = rid if rid in sent_at else next(iter(sent_at), None)
                        if key is not None:
                            rec.done(sent_at.pop(key), time.perf_counter(), code)
                            on_answer()
                more = False
            except StreamFailed as e:
                now = time.perf_counter()
                for t0 in sent_at.values():
                    rec.done(t0, now, e.code)
                    on_answer()
                more = rec.open(now)

    async def _items(self, rec: Recorder, sent_at: dict[str, float],
                     next_send: Callable[[], Awaitable[float | None]]) -> AsyncIterator[int]:
        """A stream's items: one number per send time next_send() gives, recorded as sent before it is sent."""
        while (t := await next_send()) is not None:
            n = self._next()
            sent_at[str(n)] = t
            rec.sent(t)
            yield n
