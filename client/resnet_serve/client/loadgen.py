"""A load generator for classifier.v1 in the spirit of Triton's perf_analyzer, on grpc.aio in one process.

Closed loop: N workers, each with one request outstanding (unary), or N items in flight over streams.
Open loop: Poisson arrivals at R images/s, each latency measured from its *scheduled* send time (so a slow server
cannot hide its queueing by slowing the generator down: no coordinated omission).

Each step warms up, then measures a window [start, end). Accounting, so totals match the server's counters:
- every request sent is counted once: `warmup_requests` if sent before `start`, `requests` if sent in the
  window (nothing is sent at or after `end`; the step then waits for every outstanding answer);
- `images_per_s`: successful answers *received* inside the window / the window's length;
- latency percentiles and `errors` (by gRPC code): over the requests sent inside the window.
With `requests` set (closed loop only), a step measures exactly that many requests instead of a duration: the
window runs from `start` to the last answer, and every successful answer to a measured request counts, so
nothing depends on how much work fits in a time window (what tests use).

Requests are serialised once up front (a request id is appended as an extra protobuf field), and responses of
unary calls are not even parsed, so the generator stays cheap; `processes` > 1 splits the load over several
client processes (each with its own event loop and channel) and merges their samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing as mp
import queue
import random
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import grpc.aio
import numpy as np

from resnet_serve.protos import classifier_pb2 as pb

from .common import ChannelOptions, _code, open_channel, target_string

CLASSIFY = "/classifier.v1.Classifier/Classify"
CLASSIFY_STREAM = "/classifier.v1.Classifier/ClassifyStream"
MODES = ("unary", "stream")
PROTOCOLS = ("classifier", "oip")  # classifier.v1, or the Open Inference Protocol via tritonclient
INPUTS = ("raw", "jpeg")


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
    requests: int = 0  # > 0: each step measures exactly this many requests (closed loop), not a duration
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
        if self.requests < 0 or (self.requests and self.rates):
            raise ValueError("requests must be positive and needs the closed loop (concurrency), not rates")
        if self.streams < 1 or self.processes < 1:
            raise ValueError("streams and processes must be at least 1")


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


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    if not len(latencies_s):
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3),
            "max": round(float(ms.max()), 3)}


def summarize(config: LoadConfig, kind: str, load: float, s: Samples) -> dict[str, Any]:
    """One step as the JSON document reports it."""
    return {"concurrency": int(load) if kind == "concurrency" else None,
            "rate": float(load) if kind == "rate" else None,
            "mode": config.mode, "input": config.input, "protocol": config.protocol, "processes": config.processes,
            "streams": config.streams if config.mode == "stream" else None,
            "warmup_s": config.warmup_s, "duration_s": round(s.window_s, 6),
            "warmup_requests": s.warmup_requests, "requests": s.requests,
            "images_per_s": round(s.ok_in_window / s.window_s, 3) if s.window_s else 0.0,
            "latency_ms": percentiles_ms(s.latencies_s), "errors": dict(sorted(s.errors.items()))}


# --- payloads --------------------------------------------------------------------------------------------------
def payloads(kind: str, hw: tuple[int, int], top_k: int = 0, count: int = 8, seed: int = 0,
             data: Sequence[bytes] = ()) -> list[bytes]:
    """Serialised ClassifyRequests without request ids: raw uint8 HWC tensors at the model's input size, or JPEG
    files of the same pictures (smooth gradients plus noise, so they compress like photographs). With `data`
    (image files' bytes), those instead: sent as they are (jpeg), or decoded and resized to the input size (raw)."""
    if data:
        return [_file_payload(kind, blob, hw, top_k) for blob in data]
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(count):
        base = (rng.uniform(0, 255, 3)[None, None] + rng.uniform(-1, 1, 3)[None, None] * (xx + yy)[..., None]
                * 255 / (h + w))
        arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        if kind == "raw":
            req = pb.ClassifyRequest(top_k=top_k, tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[h, w, 3],
                                                                   data=arr.tobytes()))
        else:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            req = pb.ClassifyRequest(top_k=top_k, encoded=buf.getvalue())
        out.append(req.SerializeToString())
    return out


def _file_payload(kind: str, blob: bytes, hw: tuple[int, int], top_k: int) -> bytes:
    if kind != "raw":
        return pb.ClassifyRequest(top_k=top_k, encoded=blob).SerializeToString()
    from PIL import Image

    from resnet_serve.common.imaging import resize_crop

    with Image.open(io.BytesIO(blob)) as img:
        arr = resize_crop(img, *hw)
    return pb.ClassifyRequest(top_k=top_k, tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=list(arr.shape),
                                                            data=arr.tobytes())).SerializeToString()


def with_id(payload: bytes, request_id: str) -> bytes:
    """Protobuf merges concatenated messages: appending a serialised {request_id} sets the id without
    re-serialising the image."""
    return payload + pb.ClassifyRequest(request_id=request_id).SerializeToString()


# --- one step in one process -----------------------------------------------------------------------------------
class StepRunner:
    """Runs steps on one grpc.aio channel; `load` is this process's share (concurrency or rate)."""

    def __init__(self, config: LoadConfig, seed: int = 0, requests: int = 0):
        self.config = config
        self.requests = requests  # this process's share of config.requests
        self.payloads = payloads(config.input, config.input_hw, config.top_k, seed=seed, data=config.input_data)
        self.rng = random.Random(seed)
        self.channel: grpc.aio.Channel = open_channel(grpc.aio, target_string(config.target), config.options)
        self.unary = self.channel.unary_unary(CLASSIFY)  # bytes in, bytes out: nothing parsed
        self.bidi = self.channel.stream_stream(CLASSIFY_STREAM, response_deserializer=pb.ClassifyResponse.FromString)
        self.metadata = tuple(config.options.metadata)
        self._n = 0

    async def close(self) -> None:
        await self.channel.close()

    def _payload(self) -> bytes:
        self._n += 1
        return self.payloads[self._n % len(self.payloads)]

    async def run(self, kind: str, load: float) -> Samples:
        if load <= 0:
            return Samples(window_s=self.config.duration_s)
        now = time.perf_counter()
        rec = Recorder(now + self.config.warmup_s, now + self.config.warmup_s + self.config.duration_s,
                       self.requests if kind == "concurrency" else 0)
        if kind == "rate":
            await self._open_loop(rec, load)
        elif self.config.mode == "unary":
            await asyncio.gather(*(self._unary_worker(rec) for _ in range(int(load))))
        else:
            await self._closed_streams(rec, int(load))
        return rec.s

    async def _one_unary(self, rec: Recorder, t0: float) -> None:
        rec.sent(t0)
        code = None
        try:
            await self.unary(self._payload(), timeout=self.config.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            code = e.code().name
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
        k = 0
        while (t := t + self.rng.expovariate(rate)) < rec.end:
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
        as errors of its code and is replaced while the step lasts."""
        more = True
        while more:
            call = self.bidi(metadata=self.metadata)
            sent_at: dict[str, float] = {}
            writer = asyncio.create_task(self._write(call, rec, sent_at, next_send))
            try:
                while (response := await call.read()) is not grpc.aio.EOF:
                    code = _code(response.error.code).name if response.HasField("error") else None
                    rec.done(sent_at.pop(response.request_id), time.perf_counter(), code)
                    on_answer()
                more = await writer
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                writer.cancel()
                with contextlib.suppress(BaseException):
                    await writer
                code = e.code().name if isinstance(e, grpc.aio.AioRpcError) else "CANCELLED"
                now = time.perf_counter()
                for t0 in sent_at.values():
                    rec.done(t0, now, code)
                    on_answer()
                more = rec.open(now)

    async def _write(self, call: Any, rec: Recorder, sent_at: dict[str, float],
                     next_send: Callable[[], Awaitable[float | None]]) -> bool:
        """Sends while next_send() gives a send time; False: the step is over (not a failed stream)."""
        while (t := await next_send()) is not None:
            self._n += 1
            rid = str(self._n)
            sent_at[rid] = t
            rec.sent(t)
            await call.write(with_id(self.payloads[self._n % len(self.payloads)], rid))
        await call.done_writing()
        return False


# --- whole runs ------------------------------------------------------------------------------------------------
async def _run_steps(config: LoadConfig, share: Callable[[str, float], float], seed: int,
                     before_step: Callable[[], Awaitable[None]] | None = None,
                     after_step: Callable[[Samples], None] = lambda s: None) -> list[Samples]:
    requests = int(share("concurrency", config.requests))  # this process's part of a request-bounded step
    if config.protocol == "oip":
        from .oip_bench import OIPStepRunner

        runner: StepRunner = OIPStepRunner(config, seed, requests)
    else:
        runner = StepRunner(config, seed, requests)
    try:
        out = []
        for kind, load in config.steps():
            if before_step is not None:
                await before_step()
            out.append(await runner.run(kind, share(kind, load)))
            after_step(out[-1])
        return out
    finally:
        await runner.close()


def _share(total: float, index: int, parts: int, kind: str) -> float:
    """This process's part of a step's load: rates split evenly (a sum of Poisson processes is Poisson),
    concurrency as whole workers."""
    if kind == "rate":
        return total / parts
    return int(total) // parts + (index < int(total) % parts)


def _child(config: LoadConfig, index: int, barrier: Any, results: Any) -> None:
    """One client process: its share of every step, starting each step together with the others; each step's
    samples are sent as soon as it ends, then (index, None, None) says this process is done."""
    async def sync_start() -> None:
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)

    def share(kind: str, load: float) -> float:
        return _share(load, index, config.processes, kind)

    def report(s: Samples) -> None:
        results.put((index, asdict(s) | {"latencies_s": s.latencies_s.tolist()}, None))

    try:
        asyncio.run(_run_steps(config, share, config.seed + index, sync_start, report))
        results.put((index, None, None))
    except BaseException as e:  # reported by the parent, never lost
        barrier.abort()
        results.put((index, None, f"{type(e).__name__}: {e}"))


def run(config: LoadConfig, on_step: Callable[[dict[str, Any]], None] = lambda step: None) -> list[dict[str, Any]]:
    """Every step of the sweep, each also handed to on_step as soon as it ends (so a report can print it); with
    processes > 1 the load is split over that many client processes."""
    config.validate()
    steps = config.steps()
    out: list[dict[str, Any]] = []

    def done(s: Samples) -> None:
        kind, load = steps[len(out)]
        out.append(summarize(config, kind, load, s))
        on_step(out[-1])

    if config.processes == 1:
        asyncio.run(_run_steps(config, lambda kind, load: load, config.seed, after_step=done))
    else:
        _run_processes(config, done)
    return out


def _run_processes(config: LoadConfig, on_step: Callable[[Samples], None]) -> None:
    ctx = mp.get_context("spawn")  # no forked grpc state
    barrier = ctx.Barrier(config.processes)
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(config, i, barrier, results), daemon=True)
             for i in range(config.processes)]
    for p in procs:
        p.start()
    per_step: list[list[Samples]] = []  # step -> the processes' samples so far
    received: Counter = Counter()  # process -> steps reported
    failures: list[str] = []
    finished: set[int] = set()
    while len(finished) < len(procs):
        try:
            index, part, error = results.get(timeout=1.0)
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if i not in finished and p.exitcode not in (None, 0)]
            if dead:  # died without a word (e.g. killed): do not wait for it forever
                barrier.abort()
                failures.append(f"process {dead[0]} exited with code {procs[dead[0]].exitcode}")
                finished.update(dead)
            continue
        if part is None:
            finished.add(index)
            if error:
                failures.append(error)
            continue
        step = received[index]
        received[index] += 1
        if step == len(per_step):
            per_step.append([])
        per_step[step].append(Samples(window_s=part["window_s"], warmup_requests=part["warmup_requests"],
                                      requests=part["requests"], ok_in_window=part["ok_in_window"],
                                      latencies_s=array("d", part["latencies_s"]), errors=Counter(part["errors"])))
        if len(per_step[step]) == len(procs) and not failures:
            on_step(Samples.merge(per_step[step]))
    for p in procs:
        p.join()
    if failures:
        raise RuntimeError(f"load-generator process failed: {failures[0]}")


TABLE_HEAD = ("mode", "input", "load", "images/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "requests", "errors")
TABLE_WIDTHS = (6, 5, 10, 9, 8, 8, 8, 8, 8, 0)  # fixed, so rows printed one by one as steps end line up


def _line(cells: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, TABLE_WIDTHS, strict=True)).rstrip()


def format_header() -> str:
    return _line(TABLE_HEAD)


def format_row(s: dict[str, Any]) -> str:
    """One step as a row of the human-readable report."""
    load = f"c={s['concurrency']}" if s["concurrency"] is not None else f"r={s['rate']:g}/s"
    lat = s["latency_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    errors = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "0"
    return _line([s["mode"], s["input"], load, f"{s['images_per_s']:.1f}", fmt(lat["p50"]), fmt(lat["p90"]),
                  fmt(lat["p99"]), fmt(lat["max"]), str(s["requests"]), errors])


def format_table(steps: Sequence[dict[str, Any]]) -> str:
    """The human-readable report: one row per step."""
    return "\n".join([format_header(), *map(format_row, steps)])
