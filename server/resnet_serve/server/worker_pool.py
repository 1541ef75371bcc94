"""Worker process lifecycle for the engine front: spawn, wait for ready, watch, restart, the batch time limit, stop.

Each instance is one worker process (worker.py) with its control pipe and ``slots`` shared-memory batch buffers
(worker_protocol.py; two by default): while one batch computes, the next is written into the other slot and queued
on the pipe, so the worker starts it the moment it answers the first. At most one batch per slot is outstanding.
The worker answers in order; the callers of one process take turns reading (``_Channel``): only the caller whose
batch was sent first reads the next reply, so no two threads ever receive on one pipe. This module never imports
Paddle, gRPC or asyncio.

Failure semantics (every batch an instance holds, computing or queued behind it, is answered exactly once):
- the worker dies while it holds batches: ``WorkerDied`` for each of them (never a hang: the reader watches the
  pipe and the process sentinel together, and once one caller sees the death the pipe is marked broken, so a
  queued batch never reads a reply that was not its own), and the instance restarts in the background;
- a worker that dies while idle is noticed by a watcher thread and restarted without failing anything;
  a call made while its instance restarts waits for it (at most ``start_timeout_s``);
- a worker that computes one batch longer than the batch time limit (hung: deadlocked, SIGSTOPped, swapping) is
  killed and replaced, and that batch and the one queued behind it fail with ``WorkerDied``: no request waits on a
  worker forever. A queued batch's clock starts when the batch ahead of it is answered (the earliest the worker
  can start it), so waiting behind a slow batch never counts against it.

``AttachedWorkerPool`` (at the end) is the same pool as a secondary front sees it (``--front-processes`` > 1): the
first front's workers, reached through each worker's Unix socket instead of a pipe of its own. Everything a caller
relies on is the same (``call``, slots, turn-taking, time limit, failure semantics); what differs is how a worker is
reached and watched:
- attaching: connect to the worker's socket (retrying while it starts), name this front's own shared-memory slots
  (``Attach``), learn its pid (``Attached``);
- watching: a pidfd stands for the process sentinel (this process is not the worker's parent);
- a worker that dies is replaced by the first front; the attached pool re-attaches to the replacement (its calls
  wait, as they wait for a restart); a worker that shows no progress for the batch time limit while one of its
  batches waits (``HangWatch``) is killed from there, and the first front replaces it;
- closing detaches; it never stops a worker.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from .worker import worker_main
from .worker_protocol import (
    Attach,
    Attached,
    BatchDone,
    BusyClock,
    EngineError,
    LoadFailed,
    Ready,
    Reply,
    RunBatch,
    SharedBatch,
    Stop,
    WorkerDied,
    WorkerSpec,
    worker_socket,
)

STOP_TIMEOUT_S = 10.0
STOP_GRACE_S = 3.0  # close(): how long an idle worker gets to exit on Stop before it is killed
# Default batch time limit: this many times the slowest worker's warm-up of every bucket (a TensorRT engine built
# at its first run is built then, so a cold build makes it longer), and never less than the floor.
BATCH_LIMIT_WARMUPS = 10.0
BATCH_LIMIT_FLOOR_S = 30.0

WorkerEvent = Callable[[str, int], None]  # (event, instance): "died" | "hung" | "restarted" | "restart_failed"


SEND_LOCK_TIMEOUT_S = 1.0  # close(): how long to wait for a caller's send before sending Stop regardless


class HangWatch:
    """How long a caller waiting for its reply lets the worker go before it counts as hung (batch time limit).

    Without a clock (one front): the limit from when the caller's batch could start (the reply before it was in).
    With a clock (--front-processes > 1: other fronts' batches may be ahead of ours in the worker, and we cannot
    see when ours starts): the limit from the worker's last visible progress, a change of its BusyClock (a batch
    began or ended). A worker stuck on one batch, or stopped between batches with ours waiting, shows none."""

    def __init__(self, limit_s: float, clock: BusyClock | None = None, now: float | None = None):
        self.limit_s, self.clock = limit_s, clock
        self.since = time.monotonic() if now is None else now
        self.seen = clock.read() if clock is not None else 0.0

    def left(self, now: float | None = None) -> float:
        """Seconds left (<= 0: hung) at ``now`` (default: time.monotonic())."""
        now = time.monotonic() if now is None else now
        if self.clock is not None:
            value = self.clock.read()
            if value != self.seen:
                self.seen, self.since = value, now
        return self.since + self.limit_s - now


@dataclass(eq=False)
class _Channel:
    """One worker process's control pipe as its callers share it. Requests are sent (and their callers queued in
    ``waiting``) under ``cond``, so the queue has the pipe's order; the worker answers in that order, so the first
    caller waiting reads the next reply, and is the only one reading. ``broken``: the process died or was killed,
    or a reply could not be read: the pipe is out of step, and every caller still waiting fails at once."""

    proc: Any  # multiprocessing SpawnProcess
    conn: Connection
    cond: threading.Condition = field(default_factory=threading.Condition)
    waiting: deque[object] = field(default_factory=deque)
    broken: bool = False


@dataclass
class _Instance:
    index: int
    slots: list[SharedBatch]
    slot_cond: threading.Condition = field(default_factory=threading.Condition)  # guards free
    free: list[int] = field(default_factory=list)  # slots no caller holds
    proc: Any = None  # multiprocessing SpawnProcess
    conn: Connection | None = None
    channel: _Channel | None = None  # proc and conn as the callers share them
    clock: BusyClock | None = None  # --front-processes > 1: when the worker's current batch began
    state: str = "starting"  # starting | ready | restarting | failed | closed
    restart_thread: threading.Thread | None = None


class WorkerPool:
    """``instances`` worker processes started from ``spec``; ``call`` runs one request on one of them."""

    def __init__(self, spec: WorkerSpec, instances: int, start_timeout_s: float, batch_time_limit_s: float = 0.0,
                 gpus: tuple[int, ...] = (), on_event: WorkerEvent | None = None, slots: int = 2,
                 socket_dir: Path | None = None):
        """``batch_time_limit_s`` > 0: fixed; 0: derived from the warm-up timings by ``start``. ``gpus`` (device
        gpu only): instance i runs on gpus[i % len(gpus)]. ``on_event`` is called from pool threads (watcher,
        restart, or a caller's) and never raises into them. ``slots``: batches each instance may hold (1 or 2).
        ``socket_dir`` (--front-processes > 1): every worker also listens there for the other fronts
        (``AttachedWorkerPool``)."""
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        if slots not in (1, 2):
            raise ValueError(f"slots must be 1 or 2, got {slots}")
        self.spec = spec
        self.instances = instances
        self.slots = slots
        self.start_timeout_s = start_timeout_s
        self.gpus = gpus if spec.settings.device == "gpu" else ()
        self.on_event = on_event
        self._fixed_limit_s = batch_time_limit_s
        self._socket_dir = socket_dir
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
            self._create_instances()
            for inst in self._instances:  # spawn all first: they load in parallel
                self._spawn(inst)
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
        self._start_watcher()

    def _create_instances(self) -> None:
        """Every instance with its shared-memory slots (and, when other fronts attach, its BusyClock), appended one
        by one: close() unlinks whatever was created if a later one fails."""
        for i in range(self.instances):
            inst = _Instance(index=i, slots=[])
            self._instances.append(inst)
            for s in range(self.slots):
                inst.slots.append(SharedBatch(self.spec.layout))
                inst.free.append(s)
            if self._socket_dir is not None:
                inst.clock = BusyClock()

    def _start_watcher(self) -> None:
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
            self._send_stop(inst.channel)  # queued behind any batch the worker holds: those are answered first
        for inst in self._instances:
            self._stop_process(inst.channel, grace_s)
        for inst in self._instances:
            t = inst.restart_thread
            if t is not None and t is not threading.current_thread():
                t.join(STOP_TIMEOUT_S)
            # A restart that raced with close may have spawned another process: stop it too.
            self._stop_process(inst.channel, grace_s)
        if self._watcher is not None:
            self._watcher.join(STOP_TIMEOUT_S)
        for inst in self._instances:
            for shared in inst.slots:
                shared.close()
                shared.unlink()
            if inst.clock is not None:
                inst.clock.close()
                self._unlink_clock(inst.clock)
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
        """Every slot's shared memory block, instance by instance."""
        return [shared.name for inst in self._instances for shared in inst.slots]

    def visible_gpu(self, index: int) -> int | None:
        """Instance ``index``'s GPU, round-robin over ``gpus``; None on CPU or when no GPUs are named."""
        return self.gpus[index % len(self.gpus)] if self.gpus else None

    # ---------------------------------------------------------------- requests

    def call(self, index: int, prepare: Callable[[SharedBatch], RunBatch]) -> Reply:
        """Run one batch on instance ``index`` and return the worker's reply. Blocks while every slot of the
        instance is held by other callers (``slots`` callers per instance never wait here).

        Takes a free slot, waits for the instance to be ready (restarting it if its process died while idle), then
        lets ``prepare`` write the batch into that slot's shared memory and return the request; the pool names the
        slot in it, sends it, and waits for its turn to read the reply. Raises WorkerDied if the worker dies or
        exceeds the batch time limit while it holds the batch (computing it or with it queued).
        """
        inst = self._instances[index]
        slot = self._take_slot(inst)
        try:
            channel = self._await_instance(inst)
            request = replace(prepare(inst.slots[slot]), slot=slot)
            reply = self._exchange(inst, channel, request)
            return inst.slots[slot].logits_of(reply, request.n) if isinstance(reply, BatchDone) else reply
        finally:
            with inst.slot_cond:
                inst.free.append(slot)
                inst.slot_cond.notify()

    @staticmethod
    def _take_slot(inst: _Instance) -> int:
        """A slot no other caller holds; it is this caller's until its reply (or failure) is in."""
        with inst.slot_cond:
            inst.slot_cond.wait_for(lambda: bool(inst.free))
            return inst.free.pop(0)

    def _await_instance(self, inst: _Instance) -> _Channel:
        """Block until the instance is ready, restarting it if its process has died (or its pipe broke) while no
        batch was there to notice; the channel to send on."""
        deadline = time.monotonic() + self.start_timeout_s
        retried = False
        with self._cond:
            while True:
                if inst.state == "closed":
                    raise WorkerDied("engine is closed")
                if inst.state == "ready":
                    channel = inst.channel
                    assert channel is not None
                    if inst.proc.is_alive() and not channel.broken:
                        return channel
                    # Dead, or being killed by _break: a new batch waits for the replacement instead of failing.
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

    def _exchange(self, inst: _Instance, channel: _Channel, request: RunBatch) -> Reply:
        """Send one request, wait for the replies to the requests sent before it, then read its own, watching the
        process so a death never hangs us. Any way out but its own reply breaks the channel: the callers queued
        behind fail at once with WorkerDied rather than read a reply that is not theirs."""
        turn = object()
        failure = ""
        with channel.cond:
            try:
                if channel.broken:
                    raise OSError("the worker's pipe is broken")
                channel.conn.send(request)
            except (OSError, ValueError):  # the worker is gone (broken pipe), or close() closed the pipe
                self._break(channel)
                failure = "died before it could take a batch"
            else:
                channel.waiting.append(turn)
                try:
                    channel.cond.wait_for(lambda: channel.broken or channel.waiting[0] is turn)
                except BaseException:
                    channel.waiting.remove(turn)
                    self._break(channel)  # our reply will arrive with nobody to read it
                    raise
                if channel.broken:  # while this batch was queued behind another
                    channel.waiting.remove(turn)
                    failure = "died or was killed while this batch was queued in it"
        if failure:
            return self._died(inst, channel, failure)
        ok = False
        try:
            reply = self._read_reply(inst, channel)
            ok = True
            return reply
        finally:
            with channel.cond:
                channel.waiting.popleft()
                if not ok:
                    self._break(channel)
                channel.cond.notify_all()

    @staticmethod
    def _break(channel: _Channel) -> None:
        """The pipe is out of step (or its worker gone): fail every caller queued on it and kill the process, so
        that the instance restarts (the watcher, or those callers, see it die). Caller holds channel.cond."""
        channel.broken = True
        with contextlib.suppress(Exception):
            channel.proc.kill()
        channel.cond.notify_all()

    def _read_reply(self, inst: _Instance, channel: _Channel) -> Reply:
        """The caller whose turn it is: the next reply on the pipe is its own. The batch time limit counts from
        here: the worker starts this batch once it has answered the one before."""
        proc, conn = channel.proc, channel.conn
        limit = self.batch_time_limit_s
        watch = HangWatch(limit, inst.clock)
        try:
            while True:
                remaining = watch.left()
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
        return self._died(inst, channel, "died while running a batch")

    def _died(self, inst: _Instance, channel: _Channel, what: str) -> Reply:
        """Raise WorkerDied for one batch the dead worker held, and make sure the instance restarts."""
        proc = channel.proc
        proc.join(1.0)  # killed by _break or the time limit, or seen dead: reaped, so its exit code is known
        self._on_death(inst, proc)
        raise WorkerDied(f"worker {inst.index} (pid {proc.pid}) {what} (exit code {proc.exitcode})")

    # ---------------------------------------------------------------- processes

    def _spawn(self, inst: _Instance) -> tuple[Any, Connection]:
        """Start the instance's next worker process and make it the instance's (caller holds _cond, or start())."""
        parent, child = self._ctx.Pipe()
        spec = replace(self.spec, shm_names=tuple(shared.name for shared in inst.slots),
                       visible_gpu=self.visible_gpu(inst.index),
                       listen_path=worker_socket(self._socket_dir, inst.index) if self._socket_dir else "",
                       clock_name=inst.clock.name if inst.clock is not None else "")
        proc = self._ctx.Process(target=worker_main, name=f"resnet-serve-worker-{inst.index}", daemon=True,
                                 args=(child, spec))
        proc.start()
        child.close()  # only the worker holds its end: its death then reads as EOF here
        inst.proc, inst.conn, inst.channel = proc, parent, _Channel(proc, parent)
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
    def _send_stop(channel: _Channel | None) -> None:
        """Stop, after any request being sent (two sends must not interleave on the pipe); bounded even if a
        caller were stuck sending."""
        if channel is None:
            return
        locked = channel.cond.acquire(timeout=SEND_LOCK_TIMEOUT_S)
        try:
            with contextlib.suppress(OSError, ValueError):
                channel.conn.send(Stop())
        finally:
            if locked:
                channel.cond.release()

    def _stop_process(self, channel: _Channel | None, grace_s: float = STOP_GRACE_S) -> None:
        """Stop, up to grace_s to exit, then SIGKILL (SIGTERM would wait for a SIGSTOPped worker)."""
        if channel is None:
            return
        proc = channel.proc
        self._send_stop(channel)
        proc.join(grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
        channel.conn.close()

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
        try:
            if not self._start_replacement(inst):
                return
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

    def _start_replacement(self, inst: _Instance) -> bool:
        """Start the instance's next worker process and wait until it is ready (EngineError if it fails); False
        if the pool was closed first."""
        with self._cond:
            if self._closed:
                return False
            proc, conn = self._spawn(inst)
        self._await_ready(proc, conn, time.monotonic() + self.start_timeout_s)
        return True

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

    @staticmethod
    def _unlink_clock(clock: BusyClock) -> None:
        clock.unlink()  # the owner's: created here

    def _wake(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._wake_w.send_bytes(b"w")

    def _emit(self, event: str, index: int) -> None:
        cb = self.on_event
        if cb is not None:
            with contextlib.suppress(Exception):
                cb(event, index)


# ---------------------------------------------------------------- another front's workers

ATTACH_POLL_S = 0.05  # a replacement worker is another process's child: nothing notifies us when it listens


class AttachedProcess:
    """The process-like handle WorkerPool expects, for a worker this process did not start: a pidfd (readable once
    the process has exited, immune to pid reuse) is its sentinel and the target of kill."""

    def __init__(self, pid: int):
        self.pid = pid
        self.sentinel = os.pidfd_open(pid)
        self.exitcode: int | None = None  # only the parent can learn it
        self.name = f"worker pid {pid}"

    def is_alive(self) -> bool:
        return not wait([self.sentinel], 0)

    def join(self, timeout: float | None = None) -> None:
        wait([self.sentinel], timeout)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.sentinel, signal.SIGKILL)

    def __del__(self) -> None:  # left to garbage collection, like a pipe: a watcher may still be waiting on it
        with contextlib.suppress(Exception):
            os.close(self.sentinel)


class AttachedWorkerPool(WorkerPool):
    """``instances`` workers of another front, attached through the sockets in ``socket_dir``."""

    def __init__(self, spec: WorkerSpec, instances: int, start_timeout_s: float, batch_time_limit_s: float,
                 socket_dir: Path, on_event: WorkerEvent | None = None, slots: int = 2):
        """``batch_time_limit_s``: the owning front's (a worker computing one batch, anyone's, longer is hung)."""
        super().__init__(spec, instances, start_timeout_s, batch_time_limit_s, on_event=on_event, slots=slots)
        self.socket_dir = Path(socket_dir)

    def start(self) -> None:
        """Attach to every worker (waiting up to ``start_timeout_s`` for each to listen). EngineError if one
        cannot be attached; nothing is left attached then."""
        if self._instances:
            raise RuntimeError("AttachedWorkerPool.start() called twice")
        try:
            self._create_instances()
            for inst in self._instances:
                self._attach(inst, time.monotonic() + self.start_timeout_s)
                with self._cond:
                    inst.state = "ready"
                    self._cond.notify_all()
        except BaseException:
            self.close()
            raise
        self._start_watcher()

    def _attach(self, inst: _Instance, deadline: float) -> None:
        """Connect to the instance's worker, name our slots, and make it the instance's process and channel."""
        path = worker_socket(self.socket_dir, inst.index)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):  # not listening yet (starting, or replaced)
                sock.close()
                if time.monotonic() >= deadline:
                    raise EngineError(f"no worker listening at {path} within {self.start_timeout_s:g} s") from None
                if self._closed:
                    raise EngineError("engine is closed") from None
                time.sleep(ATTACH_POLL_S)
        conn = Connection(sock.detach())
        try:
            conn.send(Attach(tuple(shared.name for shared in inst.slots)))
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise EngineError(f"the worker at {path} did not answer Attach")
            reply = conn.recv()
            if not isinstance(reply, Attached):
                raise EngineError(f"the worker at {path} refused to attach")
            proc = AttachedProcess(reply.pid)
            clock = BusyClock(reply.clock_name)
        except (EOFError, OSError) as e:
            conn.close()
            raise EngineError(f"attaching to the worker at {path} failed: {e}") from e
        except BaseException:
            conn.close()
            raise
        with self._cond:
            old_clock, inst.clock = inst.clock, clock
            inst.proc, inst.conn, inst.channel = proc, conn, _Channel(proc, conn)
        if old_clock is not None:
            old_clock.close()

    def _start_replacement(self, inst: _Instance) -> bool:
        """Re-attach to the replacement the owning front starts (waiting for it to listen); the old connection is
        left to garbage collection, as WorkerPool leaves its pipes (a caller may still be waiting on it)."""
        self._attach(inst, time.monotonic() + self.start_timeout_s)
        return True

    @staticmethod
    def _unlink_clock(clock: BusyClock) -> None:
        """Never: the owning front created it."""

    @staticmethod
    def _send_stop(channel: _Channel | None) -> None:
        """Never: the worker serves the other fronts too; the owning front stops it."""

    def _stop_process(self, channel: _Channel | None, grace_s: float = 0.0) -> None:
        """Detach: close our connection (the worker drops it and our slots); the worker lives on."""
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.conn.close()
