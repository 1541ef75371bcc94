"""The engine worker process: owns one Paddle predictor and runs the batches the front process hands it.

Why a process: ``predictor.run()`` holds the GIL for the whole batch, so the gRPC front never runs one
(docs/architecture.md, "Process model"). Paddle is imported only when the predictor is built
(resnet_serve.server.predictor), so the front can import this module (``worker_main`` is the spawn target) without
loading Paddle, and a GPU worker chooses its device before Paddle starts. The messages and the shared-memory
layout are in resnet_serve.server.worker_protocol; process start, watchdog and restart in worker_pool.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait

import numpy as np

from resnet_serve.common.imaging import Normaliser

from .predictor import build_predictor
from .trt_cache import select_gpu
from .worker_protocol import (
    Attach,
    Attached,
    BatchDone,
    BatchFailed,
    BatchLayout,
    BusyClock,
    LoadFailed,
    Ready,
    RunBatch,
    SharedBatch,
    Stop,
    WorkerSpec,
)

Compute = Callable[[np.ndarray], np.ndarray]  # float32 [n, 3, H, W] or uint8 [n, H, W, 3] -> logits [n, C]

TEST_GATE_ENV = "RESNET_SERVE_TEST_WORKER_GATE"
ATTACH_TIMEOUT_S = 5.0  # an attaching front sends Attach at once; a connection silent this long is dropped
# A reply another front does not take within this long drops that front: a stopped or stuck front must not hold up
# the worker (and with it every other front). It re-attaches, as after a worker restart.
ATTACHED_SEND_TIMEOUT_S = 5
MAX_ATTACHED = 64  # other fronts' connections held at once (settings bound --front-processes well below)


def gated(compute: Compute) -> Compute:
    """Tests only: with RESNET_SERVE_TEST_WORKER_GATE naming a FIFO, every run (warm-up included) first reads one
    byte from it, so a test decides exactly when a batch may finish (tests/harness.py, WorkerGate). Checked once at
    worker start: unset in production, the batch path is the bare predictor."""
    path = os.environ.get(TEST_GATE_ENV)
    if not path:
        return compute
    fd = os.open(path, os.O_RDONLY)

    def run(batch: np.ndarray) -> np.ndarray:
        os.read(fd, 1)
        return compute(batch)

    return run


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Process body: load and warm the predictor, send Ready (or LoadFailed), then answer RunBatch until Stop."""
    select_gpu(spec.visible_gpu)  # CUDA_VISIBLE_DEVICES, before anything imports Paddle
    # The front owns shutdown: Ctrl-C in a terminal reaches the whole process group, but only the front
    # should react (it drains, then stops us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    slots: list[SharedBatch] = []
    listener: socket.socket | None = None
    clock: BusyClock | None = None
    try:
        t0 = time.perf_counter()
        try:
            predictor = build_predictor(spec.version_dir, spec.manifest, spec.settings, spec.plan)
            # `import paddle` installs a SIGTERM handler that aborts with a crash dump; a terminate() from
            # the front should just end the process.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            for name in spec.shm_names:
                slots.append(SharedBatch(spec.layout, name))
            compute = gated(predictor.run)
            if spec.clock_name:
                clock = BusyClock(spec.clock_name)
                compute = clocked(compute, clock)
            t1 = time.perf_counter()
            for b in spec.buckets:  # every new shape costs a slow first run: pay it before serving
                compute(spec.layout.warmup_batch(b))
            t2 = time.perf_counter()
            if spec.listen_path:  # warmed: the other fronts may attach from now on
                listener = listen(spec.listen_path)
        except Exception as e:  # noqa: BLE001 - report any load failure to the front, which raises it
            conn.send(LoadFailed(f"loading {spec.version_dir} failed: {type(e).__name__}: {e}"))
            return
        conn.send(Ready(t1 - t0, t2 - t1, predictor.input_name, predictor.output_name, predictor.build_info))
        serve(conn, slots, compute, Normaliser(spec.manifest.mean, spec.manifest.std), listener, spec.layout,
              spec.clock_name)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front went away: nothing left to serve
    finally:
        for shared in slots:
            shared.close()
        conn.close()
        if listener is not None:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(spec.listen_path)
        if clock is not None:
            clock.close()


def clocked(compute: Compute, clock: BusyClock) -> Compute:
    """``compute`` that keeps ``clock`` (when the current batch began; 0 while idle)."""

    def run(batch: np.ndarray) -> np.ndarray:
        clock.value[0] = time.monotonic()
        try:
            return compute(batch)
        finally:
            clock.value[0] = 0.0

    return run


def listen(path: str) -> socket.socket:
    """The Unix socket the other fronts attach through, at ``path`` (a previous process's socket file, left by
    its death, is replaced: the front that owns the pool restarts one worker process at a time per instance)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(MAX_ATTACHED)
    return sock


def serve(conn: Connection, slots: Sequence[SharedBatch], compute: Compute, normalise: Normaliser,
          listener: socket.socket | None = None, layout: BatchLayout | None = None, clock_name: str = "") -> None:
    """Answer every request on ``conn``, in the order received, until Stop (or EOFError when the front goes
    away). The front may queue a second batch (in another slot) behind the one computing: it is read the moment
    this one is answered, so the worker never waits for the front to write it.

    With a ``listener`` (--front-processes > 1), the other fronts' connections are served too, each in its own
    order with its own slots; one request per ready connection per round, so no front starves another. Anything
    going wrong on another front's connection (it went away, sent garbage) drops that connection only: the
    worker lives as long as the owning front's pipe."""
    attached: dict[Connection, list[SharedBatch]] = {}
    try:
        while True:
            watched: list = [conn, *attached]
            if listener is not None:
                watched.append(listener)
            # One front (no listener): its pipe is all there is to wait on, and a blocking recv is the cheapest wait
            # (a selector built and torn down per batch cost ~30 us of the gap between two batches).
            for ready in (wait(watched) if listener is not None else watched):
                if ready is conn:
                    request = conn.recv()
                    if isinstance(request, Stop):
                        return
                    conn.send(answer(request, slots, compute, normalise))
                elif ready is listener:
                    assert layout is not None
                    accept(listener, layout, attached, clock_name)
                else:
                    serve_attached(ready, attached, compute, normalise)
    finally:
        for other in list(attached):
            detach(other, attached)


def accept(listener: socket.socket, layout: BatchLayout, attached: dict[Connection, list[SharedBatch]],
           clock_name: str) -> None:
    """One front attaching: it names its slots (Attach), we map them and answer Attached(pid, clock_name)."""
    sock, _ = listener.accept()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", ATTACHED_SEND_TIMEOUT_S, 0))
    other = Connection(sock.detach())
    attached[other] = []
    try:
        if len(attached) > MAX_ATTACHED or not other.poll(ATTACH_TIMEOUT_S):
            raise ValueError("too many fronts, or a silent one")
        hello = other.recv()
        if not isinstance(hello, Attach) or not 1 <= len(hello.shm_names) <= 2:
            raise ValueError(f"expected Attach, got {type(hello).__name__}")
        for name in hello.shm_names:
            attached[other].append(SharedBatch(layout, name))
        other.send(Attached(os.getpid(), clock_name))
    except Exception:  # noqa: BLE001 - a front that cannot attach is dropped; the others keep being served
        detach(other, attached)


def serve_attached(other: Connection, attached: dict[Connection, list[SharedBatch]], compute: Compute,
                   normalise: Normaliser) -> None:
    """The next request of another front: answered on its connection, with its own slots."""
    try:
        request = other.recv()
        if isinstance(request, Stop):
            raise EOFError
        other.send(answer(request, attached[other], compute, normalise))
    except Exception:  # noqa: BLE001 - gone (EOFError, OSError) or not our protocol: drop this front only
        detach(other, attached)


def detach(other: Connection, attached: dict[Connection, list[SharedBatch]]) -> None:
    for shared in attached.pop(other, []):
        with contextlib.suppress(Exception):
            shared.close()
    with contextlib.suppress(OSError):
        other.close()


def answer(request: object, slots: Sequence[SharedBatch], compute: Compute,
           normalise: Normaliser) -> BatchDone | BatchFailed:
    """One batch: read it from its shared-memory slot, run it. Any failure, a malformed request included, is a
    BatchFailed reply: a bad batch must not take the worker down."""
    try:
        if not isinstance(request, RunBatch):
            raise ValueError(f"unknown request {request!r}")
        if not isinstance(request.slot, int) or not 0 <= request.slot < len(slots):
            raise ValueError(f"slot {request.slot!r} outside 0..{len(slots) - 1}")
        slot = slots[request.slot]
        return slot.answer(request.n, np.asarray(compute(slot.read(request, normalise))))
    except Exception as e:  # noqa: BLE001 - reported to the front, which raises EngineError for this batch
        return BatchFailed(f"{type(e).__name__}: {e}")
