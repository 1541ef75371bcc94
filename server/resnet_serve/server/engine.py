"""The engine as the front process sees it: one model version served by a pool of predictor worker processes.

Why processes: ``predictor.run()`` holds the GIL for a whole batch, so each engine instance is a worker
process owning one predictor (docs/architecture.md, "Process model"). This module checks the settings and
computes the predictor plan once, before any worker exists; turns a batch into a request written into a worker's
shared memory; and turns the reply into logits or an error. The parts:
- worker_protocol.py: the shared-memory layout and the typed messages between front and worker;
- worker_pool.py: the worker processes' lifecycle (spawn, ready, watchdog, restart, stop);
- worker.py: the worker process itself, around resnet_serve.server.predictor.
Nothing here imports Paddle, gRPC or asyncio, so the gRPC front stays free of Paddle.

Failure semantics: the predictor raises on a batch: ``EngineError`` (the worker stays up and keeps serving); the
worker dies or hangs while holding a batch: ``WorkerDied`` (worker_pool.py says how it is replaced).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet_serve.common.modeldir import Manifest, load_manifest, read_labels

from .predictor_config import PredictorSettings, program_served
from .worker_pool import STOP_GRACE_S, AttachedWorkerPool, WorkerEvent, WorkerPool
from .worker_protocol import BatchLayout, EngineError, RunBatch, SharedBatch, WorkerDied, WorkerSpec, batch_result

__all__ = ["Dispatch", "Engine", "EngineConfig", "EngineError", "WorkerDied"]

Dispatch = Callable[[int, int], None]  # (instance, batch size)


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
    batches_in_flight: int = 2  # per instance: one computing, the next written and queued behind it (1 or 2)
    simulated_cost_ms: tuple[float, float] = (0.0, 0.0)  # engine "simulated" (benchmarks): a + c*b ms per batch
    normalise: str = "auto"  # auto | graph | worker: which program of the export runs (program_served)
    # --front-processes > 1 (docs/architecture.md, "Front processes"): the first front's workers also listen on
    # Unix sockets in a private folder (worker_sockets); every other front attaches to them there (attach_to).
    worker_sockets: bool = False
    attach_to: Path | None = None


class Engine:
    """A pool of predictor worker processes, each holding up to ``batches_in_flight`` batches (one computing, the
    next written into its other shared-memory slot), driven through ``runners()``."""

    def __init__(self, cfg: EngineConfig, manifest: Manifest | None = None,
                 on_worker_event: WorkerEvent | None = None, on_dispatch: Dispatch | None = None):
        """``manifest``: the version's manifest when the caller has loaded (and verified) it already; it travels to
        the workers as is. ``on_worker_event(event, instance)``: "died" | "hung" | "restarted" |
        "restart_failed", from engine threads, never raising into them. ``on_dispatch(instance, n)``: called in
        the runner's thread once a batch of n is written into one of the instance's shared-memory slots, just
        before the worker is told to run it (it may then wait behind the batch computing in the other slot; tests
        use it to know a batch is in a worker, or to kill that worker then)."""
        self.cfg = cfg
        self.version_dir = Path(cfg.version_dir)
        self.manifest: Manifest = manifest if manifest is not None else load_manifest(self.version_dir)
        self.labels: list[str] = read_labels(self.version_dir, self.manifest)
        h, w = self.manifest.input_size
        self.input_shape: tuple[int, int, int] = (3, int(h), int(w))
        if not cfg.buckets or any(not 1 <= b <= cfg.max_batch_size for b in cfg.buckets):
            raise ValueError(f"buckets {cfg.buckets} must be non-empty and within 1..{cfg.max_batch_size}")
        self.buckets: tuple[int, ...] = tuple(sorted(set(cfg.buckets)))
        settings = PredictorSettings(device=cfg.device, precision=cfg.precision, threads=cfg.threads_per_instance,
                                     max_batch_size=cfg.max_batch_size, trt_cache_dir=cfg.trt_cache_dir,
                                     engine=cfg.engine, simulated_cost_ms=cfg.simulated_cost_ms)
        # Planned here, in the front, before any worker is spawned: a bad setting raises ValueError now, and every
        # worker gets this plan instead of making its own.
        served = program_served(self.manifest, cfg.device, cfg.engine, cfg.normalise)
        self.normalised_by = "graph" if served.takes_pixels else "worker"
        plan = settings.plan(self.version_dir, served)
        self.layout = BatchLayout(cfg.max_batch_size, self.input_shape, served.takes_pixels,
                                  int(self.manifest.num_classes))
        spec = WorkerSpec(self.version_dir, served, settings, plan, self.buckets, self.layout)
        self.on_worker_event = on_worker_event
        self.on_dispatch = on_dispatch
        # Owned by this engine (removed by close) when its workers listen for other fronts.
        self.socket_dir: Path | None = Path(tempfile.mkdtemp(prefix="resnet-serve-")) if cfg.worker_sockets else None
        if cfg.attach_to is not None:
            self.workers: WorkerPool = AttachedWorkerPool(spec, cfg.instances, cfg.start_timeout_s,
                                                          cfg.batch_time_limit_s, cfg.attach_to,
                                                          on_event=self._worker_event, slots=cfg.batches_in_flight)
        else:
            self.workers = WorkerPool(spec, cfg.instances, cfg.start_timeout_s, cfg.batch_time_limit_s, cfg.gpus,
                                      on_event=self._worker_event, slots=cfg.batches_in_flight,
                                      socket_dir=self.socket_dir)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Spawn every worker and block until each has loaded and warmed every bucket (EngineError if one fails)."""
        self.workers.start()

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every worker (``grace_s`` to exit on Stop, then SIGKILL) and free the shared memory. Idempotent.
        Attached to another front's workers: detach, and free this front's shared memory only."""
        self.workers.close(grace_s)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- queries

    @property
    def load_seconds(self) -> float:
        return self.workers.load_seconds

    @property
    def warmup_seconds(self) -> float:
        return self.workers.warmup_seconds

    @property
    def batch_time_limit_s(self) -> float:
        return self.workers.batch_time_limit_s

    @property
    def input_name(self) -> str:
        return self.workers.input_name

    @property
    def output_name(self) -> str:
        return self.workers.output_name

    @property
    def build_info(self) -> dict[str, Any]:
        """What the first worker built (GPU: engine, precision built, cache)."""
        return self.workers.build_info

    def alive_instances(self) -> int:
        """Instances that are warmed and whose process is alive (health is NOT_SERVING at zero)."""
        return self.workers.alive_instances()

    def worker_pids(self) -> list[int]:
        return self.workers.worker_pids()

    def shm_names(self) -> list[str]:
        return self.workers.shm_names()

    def runners(self) -> list[Callable[[Sequence[np.ndarray] | np.ndarray], np.ndarray]]:
        """Blocking callables, a batch (n in buckets) -> float32 logits [n, C]: ``batches_in_flight`` per
        instance, so that a caller per runner (the batcher's consumers) keeps each worker's slots full: one batch
        computes while the next is written. Ordered instance by instance within each round (0, 1, .., 0, 1, ..),
        so that the first runners taken spread the work over the instances."""
        return [self._make_runner(i) for _ in range(self.workers.slots) for i in range(self.cfg.instances)]

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
        if len(rows) not in self.buckets:
            raise ValueError(f"batch size {len(rows)} is not a warmed bucket {self.buckets}")
        request = self.layout.request_for(rows)  # checked before waiting for the worker

        def prepare(shared: SharedBatch) -> RunBatch:
            shared.write(rows, request)
            if self.on_dispatch is not None:
                self.on_dispatch(index, request.n)
            return request

        return batch_result(self.workers.call(index, prepare)).logits

    def _worker_event(self, event: str, index: int) -> None:
        if self.on_worker_event is not None:
            self.on_worker_event(event, index)
