"""``--front-processes N``: the first front (this process) starts N - 1 more, each a whole asyncio gRPC front on the
same port (SO_REUSEPORT: the kernel spreads new connections over them) with its own batcher, attached to this
front's worker processes (AttachedWorkerPool, worker_pool.py). docs/architecture.md, "Front processes", says why.

This module is the supervision between them, over one pipe per secondary front:

  secondary -> first, once:  FrontReady(pid) when it has attached and listens, or FrontFailed(message)
  first -> secondary:        Scrape(seq) -> Scraped(seq, text)   its /metrics exposition, merged into ours
                             Drain(grace_s)                       drain as on SIGTERM, then exit

A secondary front (front_process.py) has no metrics or health port of its own (the first front's serve them for the
pod), does not poll for versions, and never stops a worker. It exits when its pipe closes: the first front is gone,
and with it the workers.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from .settings import Settings

log = logging.getLogger(__name__)
SCRAPE_TIMEOUT_S = 5.0  # a secondary's exposition not in by then is left out of this scrape (and logged)
EXIT_MARGIN_S = 5.0  # after its grace period, how long a draining secondary may take to exit before SIGKILL


@dataclass(frozen=True)
class FrontSpec:
    """What a secondary front is started with."""

    index: int  # 1..N-1 (the first front is 0)
    settings: Settings  # the first front's, with its port, the version it serves, and no ports of its own
    socket_dir: Path  # where the workers listen (Engine.socket_dir of the first front)


FrontMain = Callable[[Connection, FrontSpec], None]


@dataclass(frozen=True)
class FrontReady:
    pid: int


@dataclass(frozen=True)
class FrontFailed:
    message: str


@dataclass(frozen=True)
class Scrape:
    seq: int


@dataclass(frozen=True)
class Scraped:
    seq: int
    text: bytes


@dataclass(frozen=True)
class Drain:
    grace_s: float


def secondary_settings(settings: Settings, port: int, version: str, batch_time_limit_s: float) -> Settings:
    """A secondary front's settings: the first front's port, version and batch time limit (derived there from the
    warm-up), and no ports or polling of its own."""
    return replace(settings, port=port, version=int(version), metrics_port=-1, health_port=-1, poll_interval_s=0.0,
                   batch_time_limit_s=batch_time_limit_s, sources=dict(settings.sources))


# ---------------------------------------------------------------------------------------------- first front


@dataclass(eq=False)
class _Front:
    spec: FrontSpec
    proc: Any = None  # multiprocessing SpawnProcess
    conn: Connection | None = None
    lock: threading.Lock = None  # type: ignore[assignment]  # one exchange at a time on the pipe
    pid: int = 0


class Fronts:
    """The secondary fronts, from the first front's side: start, scrape, drain, and notice one that dies."""

    def __init__(self, specs: list[FrontSpec], start_timeout_s: float, target: FrontMain):
        """``target``: the secondary's process body, ``front_process.front_main`` (handed in, because that module
        imports the server that imports this one)."""
        self.start_timeout_s = start_timeout_s
        self.target = target
        self._ctx = mp.get_context("spawn")
        self._fronts = [_Front(spec, lock=threading.Lock()) for spec in specs]
        self._seq = itertools.count(1)
        self._draining = False
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Spawn every secondary and wait until each has attached to the workers and listens (they start in
        parallel). Raises RuntimeError with the first failure; every secondary is stopped then."""
        try:
            for front in self._fronts:
                parent, child = self._ctx.Pipe()
                front.proc = self._ctx.Process(target=self.target, args=(child, front.spec), daemon=True,
                                               name=f"resnet-serve-front-{front.spec.index}")
                front.proc.start()
                child.close()
                front.conn = parent
            deadline = time.monotonic() + self.start_timeout_s
            for front in self._fronts:
                front.pid = self._await_ready(front, deadline)
        except BaseException:
            self.kill()
            raise
        self._watcher = threading.Thread(target=self._watch, name="fronts-watcher", daemon=True)
        self._watcher.start()
        log.info("%d more front processes serve the port (pids %s)", len(self._fronts),
                 ", ".join(str(f.pid) for f in self._fronts))

    def _await_ready(self, front: _Front, deadline: float) -> int:
        assert front.conn is not None
        ready = wait([front.conn, front.proc.sentinel], max(0.0, deadline - time.monotonic()))
        if front.conn in ready or front.conn.poll():
            with contextlib.suppress(EOFError, OSError):
                msg = front.conn.recv()
                if isinstance(msg, FrontReady):
                    return msg.pid
                if isinstance(msg, FrontFailed):
                    raise RuntimeError(f"front process {front.spec.index} failed to start: {msg.message}")
        if not ready:
            raise RuntimeError(f"front process {front.spec.index} not ready within {self.start_timeout_s:g} s")
        front.proc.join(1.0)
        raise RuntimeError(f"front process {front.spec.index} exited with code {front.proc.exitcode} at start")

    def alive(self) -> int:
        return sum(1 for f in self._fronts if f.proc is not None and f.proc.is_alive())

    def pids(self) -> list[int]:
        return [f.pid for f in self._fronts]

    def scrape(self) -> list[tuple[int, bytes]]:
        """(front index, exposition text) of every secondary that answers within SCRAPE_TIMEOUT_S. From the
        metrics HTTP threads; one exchange per pipe at a time, and a late answer is told apart by its seq."""
        out = []
        for front in self._fronts:
            if self._draining or front.proc is None or not front.proc.is_alive():
                continue
            with front.lock:
                conn = front.conn  # under the lock: kill() may close it meanwhile
                if conn is None:
                    continue
                seq = next(self._seq)
                try:
                    conn.send(Scrape(seq))
                    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
                    while conn.poll(max(0.0, deadline - time.monotonic())):
                        msg = conn.recv()
                        if isinstance(msg, Scraped) and msg.seq == seq:
                            out.append((front.spec.index, msg.text))
                            break
                    else:
                        log.warning("front process %d sent no metrics within %g s", front.spec.index,
                                    SCRAPE_TIMEOUT_S)
                except (EOFError, OSError):
                    continue
        return out

    def drain(self, grace_s: float) -> None:
        """Tell every secondary to drain (as on SIGTERM) and wait for each to exit: grace_s, plus a margin to
        retire its batcher, then SIGKILL. Blocking: call it off the event loop."""
        self._draining = True
        for front in self._fronts:
            with front.lock, contextlib.suppress(OSError, ValueError):
                if front.conn is not None:
                    front.conn.send(Drain(grace_s))
        deadline = time.monotonic() + grace_s + EXIT_MARGIN_S
        for front in self._fronts:
            if front.proc is not None:
                front.proc.join(max(0.0, deadline - time.monotonic()))
                if front.proc.is_alive():
                    log.warning("front process %d still running %g s after its drain began: killed",
                                front.spec.index, grace_s + EXIT_MARGIN_S)
        self.kill()

    def kill(self) -> None:
        """SIGKILL whatever is still running and close the pipes (idempotent)."""
        self._draining = True
        for front in self._fronts:
            if front.proc is not None and front.proc.is_alive():
                front.proc.kill()
                front.proc.join(EXIT_MARGIN_S)
            with front.lock:
                if front.conn is not None:
                    front.conn.close()
                    front.conn = None

    def _watch(self) -> None:
        """A secondary that dies is logged (its listening socket went with it: the kernel stops sending it
        connections, and clients that were on it reconnect to the others)."""
        pending = {f.proc.sentinel: f for f in self._fronts}
        while pending and not self._draining:
            for sentinel in wait(list(pending), timeout=1.0):
                front = pending.pop(sentinel)
                if not self._draining:
                    front.proc.join(1.0)
                    log.error("front process %d (pid %d) exited with code %s; %d of %d fronts serve",
                              front.spec.index, front.pid, front.proc.exitcode, self.alive() + 1,
                              len(self._fronts) + 1)
