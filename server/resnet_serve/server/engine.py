"""Front-process side of the engine: worker processes, their shared input buffers, death and restart.

Why processes: ``predictor.run()`` holds the GIL for a whole batch, so each engine instance is a worker
process owning one predictor (docs/architecture.md, "Process model"). A batch is written into that worker's
preallocated shared-memory buffer and announced with a small message on its control pipe; the worker
answers with the logits and its compute time. This module never imports Paddle (directly or through
``worker``), so the gRPC front stays free of it.

Failure semantics:
- the predictor raises on a batch: ``EngineError`` (the worker stays up and keeps serving);
- the worker dies while it holds a batch: ``WorkerDied`` for that batch (never a hang: the wait watches
  the pipe and the process sentinel together), and the instance restarts in the background;
- a worker that dies while idle is noticed by a watcher thread and restarted without failing anything;
  a runner called while its instance restarts waits for it (at most ``start_timeout_s``);
- a worker that holds a batch longer than the batch time limit (hung: deadlocked, SIGSTOPped, swapping) is
  killed and replaced, and that batch fails with ``WorkerDied``: no request waits on a worker forever.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from resnet_serve.common.modeldir import Manifest, load_manifest, read_labels
from resnet_serve.server.predictor_config import plan_config
from resnet_serve.server.worker import shm_bytes, shm_views, worker_main

STOP_TIMEOUT_S = 10.0
STOP_GRACE_S = 3.0  # close(): how long an idle worker gets to exit on ("stop",) before it is killed
# Default batch time limit: this many times the slowest worker's warm-up of every bucket (a TensorRT engine built
# at its first run is built then, so a cold build makes it longer), and never less than the floor.
BATCH_LIMIT_WARMUPS = 10.0
BATCH_LIMIT_FLOOR_S = 30.0


@dataclass(frozen=True)
class EngineConfig:
    version_dir: Path
    instances: int = 1
    threads_per_instance: int = 2
    device: str = "cpu"  # cpu | gpu
    precision: str = "fp32"  # fp32 | fp16 | int8
    engine: str = "paddle"  # paddle | openvino
    max_batch_size: int = 8
    buckets: tuple[int, ...] = (1, 2, 4, 8)
    trt_cache_dir: Path | None = None
    start_timeout_s: float = 300.0  # per worker start, TensorRT builds included (settings.worker_start_timeout_s)
    gpus: tuple[int, ...] = ()  # GPU device: instance i runs on gpus[i % len(gpus)] (CUDA_VISIBLE_DEVICES)
    batch_time_limit_s: float = 0.0  # > 0: fixed; 0: derived from the warm-up timings once started


class EngineError(RuntimeError):
    """The predictor failed on a batch, or the engine could not start; the servicer maps it to INTERNAL."""


class WorkerDied(RuntimeError):
    """The worker died while holding the batch (or could not be restarted); mapped to UNAVAILABLE."""


@dataclass
class _Instance:
    index: int
    shm: SharedMemory
    view: np.ndarray  # float32 [max_batch, 3, H, W] over shm.buf: the predictor's input
    u8: np.ndarray  # uint8 [max_batch, H, W, 3] after it in shm.buf: raw pixels the worker normalises
    lock: threading.Lock = field(default_factory=threading.Lock)  # one batch in flight per instance
    proc: Any = None  # multiprocessing SpawnProcess
    conn: Connection | None = None
    state: str = "starting"  # starting | ready | restarting | failed | closed
    restart_thread: threading.Thread | None = None


class Engine:
    """A pool of predictor worker processes, one batch at a time each, driven through ``runners()``."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.version_dir = Path(cfg.version_dir)
        self.manifest: Manifest = load_manifest(self.version_dir)
        self.labels: list[str] = read_labels(self.version_dir, self.manifest)
        h, w = self.manifest.input_size
        self.input_shape: tuple[int, int, int] = (3, int(h), int(w))
        if cfg.instances < 1:
            raise ValueError(f"instances must be >= 1, got {cfg.instances}")
        if not cfg.buckets or any(not 1 <= b <= cfg.max_batch_size for b in cfg.buckets):
            raise ValueError(f"buckets {cfg.buckets} must be non-empty and within 1..{cfg.max_batch_size}")
        self.buckets: tuple[int, ...] = tuple(sorted(set(cfg.buckets)))
        self._plan_args: dict[str, Any] = {
            "device": cfg.device, "precision": cfg.precision, "threads": cfg.threads_per_instance,
            "max_batch_size": cfg.max_batch_size, "engine": cfg.engine,
            "trt_cache_dir": str(cfg.trt_cache_dir) if cfg.trt_cache_dir is not None else None,
        }
        # Validate the settings here, in the front, before any worker is spawned (raises ValueError).
        self.plan = plan_config(self.version_dir, self.manifest, device=cfg.device, precision=cfg.precision,
                                threads=cfg.threads_per_instance, max_batch_size=cfg.max_batch_size,
                                trt_cache_dir=cfg.trt_cache_dir, engine=cfg.engine)
        self._ctx = mp.get_context("spawn")
        self._cond = threading.Condition()  # guards instance states and process handles
        self._instances: list[_Instance] = []
        self._closed = False
        self._watcher: threading.Thread | None = None
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)  # wakes the watcher on changes

        self.load_seconds: float = 0.0
        self.warmup_seconds: float = 0.0
        self.batch_time_limit_s: float = cfg.batch_time_limit_s or BATCH_LIMIT_FLOOR_S  # set by start()
        self.input_name: str = self.manifest.input_name
        self.output_name: str = ""
        self.build_info: dict[str, Any] = {}  # what the first worker built (GPU: engine, precision built, cache)
        self.call_log: list[tuple[int, int]] = []
        # Callbacks, called from engine threads (watcher, restart, or the runner's caller), never raising
        # into them: on_worker_event(event, instance) with event "died" | "restarted" | "restart_failed";
        # on_batch(instance, n, compute_seconds) after each successful batch.
        self.on_worker_event: Callable[[str, int], None] | None = None
        self.on_batch: Callable[[int, int, float], None] | None = None
        self.last_compute_seconds: list[float] = [0.0] * cfg.instances
        # Test hook, called with the instance index after the batch is committed to a worker and just
        # before the request is sent: lets a test kill the worker while it "holds" the batch.
        self._before_send: Callable[[int], None] | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Spawn every worker and block until each has loaded and warmed every bucket.

        Raises EngineError with the worker's message if any fails (all workers are stopped then).
        """
        if self._instances:
            raise RuntimeError("Engine.start() called twice")
        try:
            for i in range(self.cfg.instances):
                shm = SharedMemory(create=True, size=shm_bytes(self.cfg.max_batch_size, self.input_shape))
                view, u8 = shm_views(shm.buf, self.cfg.max_batch_size, self.input_shape)
                self._instances.append(_Instance(index=i, shm=shm, view=view, u8=u8))
            for inst in self._instances:  # spawn all first: they load in parallel
                inst.proc, inst.conn = self._spawn(inst)
            deadline = time.monotonic() + self.cfg.start_timeout_s
            for inst in self._instances:
                ready = self._await_ready(inst.proc, inst.conn, deadline)
                self._record_ready(ready)
                with self._cond:
                    inst.state = "ready"
                    self._cond.notify_all()
        except BaseException:
            self.close()
            raise
        self.batch_time_limit_s = self.cfg.batch_time_limit_s or max(BATCH_LIMIT_FLOOR_S,
                                                                     BATCH_LIMIT_WARMUPS * self.warmup_seconds)
        self._watcher = threading.Thread(target=self._watch, name="engine-watcher", daemon=True)
        self._watcher.start()

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every worker (stop message, up to ``grace_s`` to exit, then SIGKILL) and unlink the shared memory.

        Idempotent. Bounded whatever the workers do (a hung or SIGSTOPped worker ignores "stop" and SIGTERM; a
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
            inst.view = None  # type: ignore[assignment]  # release the buffer export before close()
            inst.shm.close()
            with contextlib.suppress(FileNotFoundError):
                inst.shm.unlink()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- queries

    def runners(self) -> list[Callable[[np.ndarray], np.ndarray]]:
        """One blocking callable per instance: float32 batch [n, 3, H, W] (n in buckets) -> logits [n, C]."""
        return [self._make_runner(i) for i in range(len(self._instances))]

    def alive_instances(self) -> int:
        """Instances that are warmed and whose process is alive (health is NOT_SERVING at zero)."""
        with self._cond:
            return sum(1 for inst in self._instances
                       if inst.state == "ready" and inst.proc is not None and inst.proc.is_alive())

    def worker_pids(self) -> list[int]:
        with self._cond:
            return [inst.proc.pid if inst.proc is not None else -1 for inst in self._instances]

    def shm_names(self) -> list[str]:
        return [inst.shm.name for inst in self._instances]

    # ---------------------------------------------------------------- running batches

    def _make_runner(self, index: int) -> Callable[[Sequence[np.ndarray] | np.ndarray], np.ndarray]:
        def run(batch: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
            return self._run_batch(index, batch)

        run.__name__ = f"engine_runner_{index}"
        return run

    def _run_batch(self, index: int, batch: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Items are uint8 [H, W, 3] pixels (normalised by the worker) or float32 [3, H, W] model input, in any
        mix; a stacked array of either works too. They are written straight into the worker's shared memory."""
        rows = list(batch)
        n = len(rows)
        if n not in self.buckets:
            raise ValueError(f"batch size {n} is not a warmed bucket {self.buckets}")
        c, h, w = self.input_shape
        float_rows = []
        for i, row in enumerate(rows):
            row = np.asarray(row)
            if row.dtype != np.uint8:
                if row.shape != (c, h, w):
                    raise ValueError(f"float item {i} must have shape [{c}, {h}, {w}], got {list(row.shape)}")
                float_rows.append(i)
            elif row.shape != (h, w, c):
                raise ValueError(f"uint8 item {i} must have shape [{h}, {w}, {c}], got {list(row.shape)}")
        inst = self._instances[index]
        with inst.lock:
            self._await_instance(inst)
            for i, row in enumerate(rows):
                if i in float_rows:
                    inst.view[i] = row  # casts to float32 if needed
                else:
                    inst.u8[i] = row
            reply = self._exchange(inst, ("run", n, tuple(float_rows)))
        outputs, compute_s = self._unpack(reply)
        self.last_compute_seconds[index] = compute_s
        if self.on_batch is not None:
            with contextlib.suppress(Exception):
                self.on_batch(index, n, compute_s)
        return outputs

    def _call(self, index: int, msg: tuple) -> np.ndarray:
        """Send a raw protocol message (tests use ("fail", text) to force a worker-side error)."""
        inst = self._instances[index]
        with inst.lock:
            self._await_instance(inst)
            reply = self._exchange(inst, msg)
        return self._unpack(reply)[0]

    @staticmethod
    def _unpack(reply: tuple) -> tuple[np.ndarray, float]:
        if reply[0] == "ok":
            return reply[1], float(reply[2])
        if reply[0] == "error":
            raise EngineError(str(reply[1]))
        raise EngineError(f"unexpected worker reply {reply[0]!r}")

    def _await_instance(self, inst: _Instance) -> None:
        """Block until the instance is ready, restarting it if its process has died while idle."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
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
                    raise WorkerDied(f"instance {inst.index} not ready after {self.cfg.start_timeout_s} s")
                self._cond.wait(remaining)

    def _exchange(self, inst: _Instance, msg: tuple) -> tuple:
        """Send one request and wait for its reply, watching the process so a death never hangs us."""
        proc, conn = inst.proc, inst.conn
        if msg[0] == "run":
            self.call_log.append((inst.index, int(msg[1])))
        if self._before_send is not None:
            self._before_send(inst.index)
        limit = self.batch_time_limit_s
        try:
            conn.send(msg)
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

    def worker_plan_args(self, index: int) -> dict[str, Any]:
        """Instance ``index``'s predictor settings; on GPU its device, round-robin over ``cfg.gpus``."""
        if self.cfg.device == "gpu" and self.cfg.gpus:
            return {**self._plan_args, "visible_gpu": self.cfg.gpus[index % len(self.cfg.gpus)]}
        return self._plan_args

    def _spawn(self, inst: _Instance) -> tuple[Any, Connection]:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=worker_main, name=f"resnet-serve-worker-{inst.index}", daemon=True,
            args=(child, inst.shm.name, str(self.version_dir), self.worker_plan_args(inst.index),
                  list(self.buckets), self.input_shape))
        proc.start()
        child.close()  # only the worker holds its end: its death then reads as EOF here
        return proc, parent

    def _await_ready(self, proc: Any, conn: Connection, deadline: float) -> tuple:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineError(f"worker pid {proc.pid} not ready within {self.cfg.start_timeout_s} s")
            ready = wait([conn, proc.sentinel], timeout=remaining)
            if conn in ready or conn.poll():
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = ("error", "")
                if msg[0] == "ready":
                    return msg
                proc.join(STOP_TIMEOUT_S)
                raise EngineError(msg[1] or f"worker pid {proc.pid} exited with code {proc.exitcode}"
                                  " while loading")
            if ready:
                proc.join(STOP_TIMEOUT_S)
                raise EngineError(f"worker pid {proc.pid} exited with code {proc.exitcode} while loading")

    def _record_ready(self, msg: tuple) -> None:
        _, load_s, warm_s, input_name, output_name, *rest = msg
        if rest and rest[0] and not self.build_info:
            self.build_info = dict(rest[0])
        self.load_seconds = max(self.load_seconds, float(load_s))
        self.warmup_seconds = max(self.warmup_seconds, float(warm_s))
        self.input_name, self.output_name = input_name, output_name

    @staticmethod
    def _send_stop(conn: Connection | None) -> None:
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))

    def _stop_process(self, proc: Any, conn: Connection | None, grace_s: float = STOP_GRACE_S) -> None:
        """("stop",), up to grace_s to exit, then SIGKILL (SIGTERM would wait for a SIGSTOPped worker)."""
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
        # The old pipe is left to garbage collection: a runner may still be reading it, and closing an fd
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
            self._await_ready(proc, conn, time.monotonic() + self.cfg.start_timeout_s)
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
        cb = self.on_worker_event
        if cb is not None:
            with contextlib.suppress(Exception):
                cb(event, index)
