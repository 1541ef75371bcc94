"""The engine worker process: owns one Paddle predictor and runs the batches the front process hands it.

Why a process: ``predictor.run()`` holds the GIL for the whole batch, so the gRPC front never runs one
(docs/architecture.md, "Process model"). Paddle is imported only when the predictor is built
(resnet_serve.server.predictor), so the front can import this module (``worker_main`` is the spawn target) without
loading Paddle, and a GPU worker chooses its device before Paddle starts. The messages and the shared-memory
layout are in resnet_serve.server.worker_protocol; process start, watchdog and restart in worker_pool.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

import numpy as np

from resnet_serve.common.imaging import Normaliser

from .predictor import build_predictor
from .trt_cache import select_gpu
from .worker_protocol import BatchDone, BatchFailed, LoadFailed, Ready, RunBatch, SharedBatch, Stop, WorkerSpec

Compute = Callable[[np.ndarray], np.ndarray]  # float32 [n, 3, H, W] or uint8 [n, H, W, 3] -> logits [n, C]

TEST_GATE_ENV = "RESNET_SERVE_TEST_WORKER_GATE"


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
            t1 = time.perf_counter()
            for b in spec.buckets:  # every new shape costs a slow first run: pay it before serving
                compute(spec.layout.warmup_batch(b))
            t2 = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - report any load failure to the front, which raises it
            conn.send(LoadFailed(f"loading {spec.version_dir} failed: {type(e).__name__}: {e}"))
            return
        conn.send(Ready(t1 - t0, t2 - t1, predictor.input_name, predictor.output_name, predictor.build_info))
        serve(conn, slots, compute, Normaliser(spec.manifest.mean, spec.manifest.std))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front went away: nothing left to serve
    finally:
        for shared in slots:
            shared.close()
        conn.close()


def serve(conn: Connection, slots: Sequence[SharedBatch], compute: Compute, normalise: Normaliser) -> None:
    """Answer every request on ``conn``, in the order received, until Stop (or EOFError when the front goes
    away). The front may queue a second batch (in another slot) behind the one computing: it is read the moment
    this one is answered, so the worker never waits for the front to write it."""
    while True:
        request = conn.recv()
        if isinstance(request, Stop):
            return
        conn.send(answer(request, slots, compute, normalise))


def answer(request: object, slots: Sequence[SharedBatch], compute: Compute,
           normalise: Normaliser) -> BatchDone | BatchFailed:
    """One batch: read it from its shared-memory slot, run it. Any failure, a malformed request included, is a
    BatchFailed reply: a bad batch must not take the worker down."""
    try:
        if not isinstance(request, RunBatch):
            raise ValueError(f"unknown request {request!r}")
        if not isinstance(request.slot, int) or not 0 <= request.slot < len(slots):
            raise ValueError(f"slot {request.slot!r} outside 0..{len(slots) - 1}")
        batch = slots[request.slot].read(request, normalise)
        return BatchDone(np.ascontiguousarray(compute(batch), dtype=np.float32))
    except Exception as e:  # noqa: BLE001 - reported to the front, which raises EngineError for this batch
        return BatchFailed(f"{type(e).__name__}: {e}")
