"""Worker process lifecycle for the engine front: spawn, wait for ready, watch, restart, the batch time limit, stop.

Each instance is one worker process (worker.py) with its own shared batch buffer and control pipe
(worker_protocol.py); one batch at a time per instance. This module never imports Paddle, gRPC or asyncio.

Failure semantics:
- the worker dies while it holds a batch: ``WorkerDied`` for that batch (never a hang: the wait watches
  the pipe and the process sentinel together), and the instance restarts in the background;
- a worker that dies while idle is noticed by a watcher thread and restarted without failing anything;
  a call made while its instance restarts waits for it (at most ``start_timeout_s``);
- a worker that holds a batch longer than the batch time limit (hung: deadlocked, SIGSTOPped, swapping) is
  killed and replaced, and that batch fails with ``WorkerDied``: no request waits on a worker forever.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from typing import Any

from .worker import worker_main
from .worker_protocol import EngineError, LoadFailed, Ready, Reply, Request, SharedBatch, Stop, WorkerDied, WorkerSpec

STOP_TIMEOUT_S = 10.0
STOP_GRACE_S = 3.0  # close(): how long an idle worker gets to exit on Stop before it is killed
# Default batch time limit: this many times the slowest worker's warm-up of every bucket (a TensorRT engine built
# at its first run is built then, so a cold build makes it longer), and never less than the floor.
BATCH_LIMIT_WARMUPS = 10.0
BATCH_LIMIT_FLOOR_S = 30.0

WorkerEvent = Callable[[str, int], None]  # (event, instance): "died" | "hung" | "restarted" | "restart_failed"


@dataclass
class _Instance:
    index: int
    shared: SharedBatch
    lock: threading.Lock = field(default_factory=threading.Lock)  # one batch in flight per instance
    proc: Any = None  # multiprocessing SpawnProcess
    conn: Connection | None = None
    state: str = "starting"  # starting | ready | restarting | failed | closed
    restart_thread: threading.Thread | None = None


class WorkerPool:
    """``instances`` worker processes started from ``spec``; ``call`` runs one request on one of them."""

    def __init__(self, spec: WorkerSpec, instances: int, start_timeout_s: float, batch_time_limit_s: float = 0.0,
                 gpus: tuple[int, ...] = (), on_event: WorkerEvent | None = None):
        """``batch_time_limit_s`` > 0: fixed; 0: derived from the warm-up timings by ``start``. ``gpus`` (device
        gpu only): instance i runs on gpus[i % len(gpus)]. ``on_event`` is called from pool threads (watcher,
        restart, or a caller's) and never raises into them."""
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self.spec = spec
        self.instances = instances
        self.start_timeout_s = start_timeout_s
        self.gpus = gpus if spec.settings.device == "gpu" else ()
        self.on_event = on_event
        self._fixed_limit_s = batch_time_limit_s
        self._ctx = mp.get_context("spawn")
        self._cond = threading.Condition()  # guards instance states and process handles
        self._instances: list[_Instance] = []
        self._closed = False
        self._watcher: threading.Thread | None = None
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)  # wakes the watcher on changes

        self.load_seconds: float = 0.0
        self.warmup_seconds: float = 0.0
        self.batch_time_limit_s: float = batch_time_limit_s or BATCH_LIMIT_FLOOR_S  # set by start()
        self.input_name: str = spec.manifest.input_name
        self.output_name: str = ""
        self.build_info: dict[str, Any] = {}  # what the first worker built (GPU: engine, precision built, cache)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Spawn every worker and block until each has loaded and warmed every bucket.

        Raises EngineError with the worker's message if any fails (all workers are stopped then).
        """
        if self._instances:
            raise RuntimeError("WorkerPool.start() called twice")
        try:
            for i in range(self.instances):
                self._instances.append(_Instance(index=i, shared=SharedBatch(self.spec.layout)))
            for inst in self._instances:  # spawn all first: they load in parallel
                inst.proc, inst.conn = self._spawn(inst)
            deadline = time.monotonic() + self.start_timeout_s
            for inst in self._instances:
                self._record_ready(self._await_ready(inst.proc, inst.conn, deadline))
                with self._cond:
                    inst.state = "ready"
                    self._cond.notify_all()
        except BaseException:
            self.close()
            raise
        self.batch_time_limit_s = self._fixed_limit_s or max(BATCH_LIMIT_FLOOR_S,
                                                              BATCH_LIMIT_WARMUPS * self.warmup_seconds)
        self._watcher = threading.Thread(target=self._watch, name="engine-watcher", daemon=True)
        self._watcher.start()

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every worker (Stop, up to ``grace_s`` to exit, then SIGKILL) and unlink the shared memory.

        Idempotent. Bounded whatever the workers do (a hung or SIGSTOPped worker ignores Stop and SIGTERM; a
        batch it held then fails with WorkerDied). Explicit because Paddle's SIGTERM handler makes killing
        workers at exit noisy.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for inst in self._instances:
                inst.state = "closed"
            self._cond.notify_all()
        self._wake()
        for inst in self._instances:
            self._send_stop(inst.conn)
        for inst in self._instances:
            self._stop_process(inst.proc, inst.conn, grace_s)
        for inst in self._instances:
            t = inst.restart_thread
            if t is not None and t is not threading.current_thread():
                t.join(STOP_TIMEOUT_S)
            # A restart that raced with close may have spawned another process: stop it too.
            self._stop_process(inst.proc, inst.conn, grace_s)
        if self._watcher is not None:
            self._watcher.join(STOP_TIMEOUT_S)
        for inst in self._instances:
            inst.shared.close()
            inst.shared.unlink()
        self._wake_r.close()
        self._wake_w.close()

    # ---------------------------------------------------------------- queries

    def alive_instances(self) -> int:
        """Instances that are warmed and whose process is alive (health is NOT_SERVING at zero)."""
        with self._cond:
            return sum(1 for inst in self._instances
                       if inst.state == "ready" and inst.proc is not None and inst.proc.is_alive())

    def worker_pids(self) -> list[int]:
        with self._cond:
            return [inst.proc.pid if inst.proc is not None else -1 for inst in self._instances]

    def shm_names(self) -> list[str]:
        return [inst.shared.name for inst in self._instances]

    def visible_gpu(self, index: int) -> int | None:
        """Instance ``index``'s GPU, round-robin over ``gpus``; None on CPU or when no GPUs are named."""
        return self.gpus[index % len(self.gpus)] if self.gpus else None

    # ---------------------------------------------------------------- requests

    def call(self, index: int, prepare: Callable[[SharedBatch], Request]) -> Reply:
        """Run one request on instance ``index`` and return the worker's reply.

        Waits for the instance to be ready (restarting it if its process died while idle), then, holding it,
        lets ``prepare`` write the batch into its shared memory and return the request to send. Raises
        WorkerDied if the worker dies or exceeds the batch time limit while it holds the request.
        """
        inst = self._instances[index]
        with inst.lock:
            self._await_instance(inst)
            return self._exchange(inst, prepare(inst.shared))

    def _await_instance(self, inst: _Instance) -> None:
        """Block until the instance is ready, restarting it if its process has died while idle."""
        deadline = time.monotonic() + self.start_timeout_s
        retried = False
        with self._cond:
            while True:
                if inst.state == "closed":
                    raise WorkerDied("engine is closed")
                if inst.state == "ready":
                    if inst.proc.is_alive():
                        return
                    self._begin_restart_locked(inst, inst.proc)
                elif inst.state == "failed":
                    if retried:
                        raise WorkerDied(f"instance {inst.index} could not be restarted")
                    retried = True  # try once more per call: the cause (e.g. a model file) may be gone
                    self._begin_restart_locked(inst, inst.proc)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerDied(f"instance {inst.index} not ready after {self.start_timeout_s} s")
                self._cond.wait(remaining)

    def _exchange(self, inst: _Instance, request: Request) -> Reply:
        """Send one request and wait for its reply, watching the process so a death never hangs us."""
        proc, conn = inst.proc, inst.conn
        limit = self.batch_time_limit_s
        try:
            conn.send(request)
            deadline = time.monotonic() + limit
            while True:
                remaining = deadline - time.monotonic()
                ready = wait([conn, proc.sentinel], timeout=max(0.0, min(1.0, remaining)))
                if conn in ready or conn.poll():
                    return conn.recv()
                if ready or not proc.is_alive():
                    break
                if remaining <= 0:
                    proc.kill()  # SIGKILL: also ends a SIGSTOPped process
                    self._emit("hung", inst.index)
                    self._on_death(inst, proc)
                    raise WorkerDied(f"worker {inst.index} (pid {proc.pid}) exceeded the batch time limit of "
                                     f"{limit:g} s; it was killed and is being replaced")
        except (EOFError, OSError):
            pass
        self._on_death(inst, proc)
        raise WorkerDied(f"worker {inst.index} (pid {proc.pid}) died while running a batch"
                         f" (exit code {proc.exitcode})")

    # ---------------------------------------------------------------- processes

    def _spawn(self, inst: _Instance) -> tuple[Any, Connection]:
        parent, child = self._ctx.Pipe()
        spec = replace(self.spec, shm_name=inst.shared.name, visible_gpu=self.visible_gpu(inst.index))
        proc = self._ctx.Process(target=worker_main, name=f"resnet-serve-worker-{inst.index}", daemon=True,
                                 args=(child, spec))
        proc.start()
        child.close()  # only the worker holds its end: its death then reads as EOF here
        return proc, parent

    def _await_ready(self, proc: Any, conn: Connection, deadline: float) -> Ready:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineError(f"worker pid {proc.pid} not ready within {self.start_timeout_s} s")
            ready = wait([conn, proc.sentinel], timeout=remaining)
            if conn in ready or conn.poll():
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = LoadFailed("")
                if isinstance(msg, Ready):
                    return msg
                proc.join(STOP_TIMEOUT_S)
                message = msg.message if isinstance(msg, LoadFailed) else ""
                raise EngineError(message or f"worker pid {proc.pid} exited with code {proc.exitcode} while loading")
            if ready:
                proc.join(STOP_TIMEOUT_S)
                raise EngineError(f"worker pid {proc.pid} exited with code {proc.exitcode} while loading")

    def _record_ready(self, msg: Ready) -> None:
        if msg.build_info and not self.build_info:
            self.build_info = dict(msg.build_info)
        self.load_seconds = max(self.load_seconds, msg.load_seconds)
        self.warmup_seconds = max(self.warmup_seconds, msg.warmup_seconds)
        self.input_name, self.output_name = msg.input_name, msg.output_name

    @staticmethod
    def _send_stop(conn: Connection | None) -> None:
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(Stop())

    def _stop_process(self, proc: Any, conn: Connection | None, grace_s: float = STOP_GRACE_S) -> None:
        """Stop, up to grace_s to exit, then SIGKILL (SIGTERM would wait for a SIGSTOPped worker)."""
        if proc is None:
            return
        self._send_stop(conn)
        proc.join(grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if conn is not None:
            conn.close()

    def _on_death(self, inst: _Instance, proc: Any) -> None:
        with self._cond:
            self._begin_restart_locked(inst, proc)

    def _begin_restart_locked(self, inst: _Instance, proc: Any) -> None:
        """Start restarting ``inst`` unless that already happened for this process (caller holds _cond)."""
        if self._closed or inst.proc is not proc or inst.state not in ("ready", "failed"):
            return
        was_failed = inst.state == "failed"
        inst.state = "restarting"
        if not was_failed:
            self._emit("died", inst.index)
        inst.restart_thread = threading.Thread(target=self._restart, args=(inst, proc),
                                               name=f"engine-restart-{inst.index}", daemon=True)
        inst.restart_thread.start()

    def _restart(self, inst: _Instance, old_proc: Any) -> None:
        # The old pipe is left to garbage collection: a caller may still be reading it, and closing an fd
        # under another thread's wait() could let a reused fd number be read in its place.
        with contextlib.suppress(Exception):
            old_proc.join(STOP_TIMEOUT_S)
            if old_proc.is_alive():  # e.g. detected through a broken pipe: make sure it is gone
                old_proc.kill()
                old_proc.join(STOP_TIMEOUT_S)
        with self._cond:
            if self._closed:
                return
            proc, conn = self._spawn(inst)
            inst.proc, inst.conn = proc, conn
        try:
            self._await_ready(proc, conn, time.monotonic() + self.start_timeout_s)
        except EngineError:
            with self._cond:
                if inst.state == "restarting":
                    inst.state = "failed"
                self._cond.notify_all()
            if not self._closed:
                self._emit("restart_failed", inst.index)
            return
        with self._cond:
            if inst.state != "restarting":  # closed meanwhile; close() stops the process
                return
            inst.state = "ready"
            self._cond.notify_all()
        self._wake()
        self._emit("restarted", inst.index)

    def _watch(self) -> None:
        """Notice workers that die while idle, so they restart before the next batch needs them."""
        while True:
            with self._cond:
                if self._closed:
                    return
                watched = {inst.proc.sentinel: (inst, inst.proc)
                           for inst in self._instances if inst.state == "ready"}
            try:
                fired = wait([self._wake_r, *watched], timeout=None)
            except OSError:
                return
            for obj in fired:
                if obj is self._wake_r:
                    with contextlib.suppress(EOFError, OSError):
                        while self._wake_r.poll():
                            self._wake_r.recv_bytes()
                elif obj in watched:
                    inst, proc = watched[obj]
                    self._on_death(inst, proc)

    def _wake(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._wake_w.send_bytes(b"w")

    def _emit(self, event: str, index: int) -> None:
        cb = self.on_event
        if cb is not None:
            with contextlib.suppress(Exception):
                cb(event, index)
