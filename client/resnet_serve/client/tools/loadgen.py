"""A load generator for classifier.v1 in the spirit of Triton's perf_analyzer, on grpc.aio in one process.

Closed loop: N workers, each with one request outstanding (unary), or N items in flight over streams.
Open loop: Poisson arrivals at R images/s, each latency measured from its *scheduled* send time (so a slow server
cannot hide its queueing by slowing the generator down: no coordinated omission).
A request carries `batch` images (protocol "oip" only): the closed loop keeps N requests (N * batch images) in
flight, the open loop's requests arrive at R / batch per second.

Each step warms up, then measures a window [start, end). Accounting, so totals match the server's counters:
- every request sent is counted once: `warmup_requests` if sent before `start`, `requests` if sent in the
  window (nothing is sent at or after `end`; the step then waits for every outstanding answer);
- `images_per_s`: successful answers *received* inside the window, times `batch`, / the window's length;
- latency percentiles and `errors` (by gRPC code): over the requests sent inside the window.
With `requests` set, a step measures exactly that many requests instead of a duration (open loop: that many
Poisson arrivals after the warm-up, each counted by its scheduled time): the window runs from `start` to the last
answer, and every successful answer to a measured request counts, so nothing depends on how much work fits in a
time window (what tests use).

Requests are serialised once up front (a request id is appended as an extra protobuf field), and responses of
unary calls are not even parsed, so the generator stays cheap; `processes` > 1 splits the load over several
client processes (each with its own event loop and channel) and merges their samples.

This module runs a sweep (run) in one or several processes. One step in one process is load_steps.StepRunner over
a transport: classifier_transport (classifier.v1) or oip_transport (the Open Inference Protocol, imported only
for protocol "oip"); the report's fields and table are load_report.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from resnet_serve.common.malloc import keep_freed_memory

from .classifier_transport import ClassifierTransport
from .load_report import summarize
from .load_steps import LoadConfig, Samples, StepRunner, Transport

__all__ = ["LoadConfig", "run"]

# More than the server keeps (common/malloc.py): a load generator has no RSS budget, and sending OIP messages of 32
# images (4.8 MB each, several in flight) churned through 16 MB.
LOADGEN_TRIM_BYTES = 64 << 20


def _transport(config: LoadConfig, seed: int) -> Transport:
    if config.protocol == "oip":
        from .oip_transport import OIPTransport  # tritonclient: the client's optional `oip` extra

        return OIPTransport(config, seed)
    return ClassifierTransport(config, seed)


# --- whole runs ------------------------------------------------------------------------------------------------
async def _run_steps(config: LoadConfig, share: Callable[[str, float], float], seed: int,
                     before_step: Callable[[], Awaitable[None]] | None = None,
                     after_step: Callable[[Samples], None] = lambda s: None) -> list[Samples]:
    requests = int(share("concurrency", config.requests))  # this process's part of a request-bounded step
    runner = StepRunner(config, _transport(config, seed), seed, requests)
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


def split_load(total: float, index: int, parts: int, kind: str) -> float:
    """This process's part of a step's load: rates split evenly (a sum of Poisson processes is Poisson),
    concurrency as whole workers."""
    if kind == "rate":
        return total / parts
    return int(total) // parts + (index < int(total) % parts)


def _child(config: LoadConfig, index: int, barrier: Any, results: Any, go: Any) -> None:
    """One client process: its share of every step, each started once the parent has handed over the previous
    step (a token on `go`) and then together with the others (the barrier); each step's samples are sent as soon
    as it ends, then (index, None, None) says this process is done."""
    keep_freed_memory(LOADGEN_TRIM_BYTES)

    async def sync_start() -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, go.get)
        await loop.run_in_executor(None, barrier.wait)

    def share(kind: str, load: float) -> float:
        return split_load(load, index, config.processes, kind)

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
    processes > 1 the load is split over that many client processes. Like the server, the load generator keeps
    the memory it frees (common/malloc.py), so its own cost per image is not page faults."""
    config.validate()
    keep_freed_memory(LOADGEN_TRIM_BYTES)
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
    # One token per process per step: a step starts only after the previous one was handed to on_step, so what
    # on_step reads (e.g. the server's counters) holds that step and nothing of the next.
    gos = [ctx.Queue() for _ in range(config.processes)]
    procs = [ctx.Process(target=_child, args=(config, i, barrier, results, gos[i]), daemon=True)
             for i in range(config.processes)]
    for p in procs:
        p.start()

    def release() -> None:
        for go in gos:
            go.put(None)

    release()  # the first step
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
                release()  # the others then meet the broken barrier and end
            continue
        if part is None:
            finished.add(index)
            if error:
                failures.append(error)
                release()
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
            release()  # the next step (after the last: unread, harmless)
    for p in procs:
        p.join()
    if failures:
        raise RuntimeError(f"load-generator process failed: {failures[0]}")
