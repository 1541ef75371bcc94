"""What the engine front and a worker process exchange: the start spec, the batch buffer in shared memory, and
the typed messages on the control pipe (docs/architecture.md, "Process model").

A batch travels through the worker's preallocated shared memory; only a small message crosses the pipe:

  front -> worker, at spawn:  WorkerSpec (model, manifest, settings and the plan computed once by the front)
  worker -> front, once:      Ready(...) after loading and warming every bucket, or LoadFailed(message) (it exits)
  front -> worker:            RunBatch(n, float_rows, slot) -> BatchDone(logits, or None: in the slot) |
                              BatchFailed(message)
                              Stop()   exit cleanly

With ``--front-processes N`` > 1 the worker also listens on a Unix socket (``WorkerSpec.listen_path``) for the
other fronts (``AttachedWorkerPool`` in worker_pool.py); each opens one connection and speaks the same
RunBatch/Reply exchange on it, after naming its own slots:

  other front -> worker:      Attach(shm_names) -> Attached(pid, clock_name)

The worker then also keeps a ``BusyClock``: when the batch it computes began, whoever sent it, so that any front
can tell a hung worker from a busy queue (only the owning front sees when its own batch starts).

Each worker has ``batches in flight`` shared-memory slots (two by default): the front writes the next batch into
one slot while the worker computes the other's. The worker answers requests in the order they arrive.

Nothing here imports Paddle, gRPC or asyncio: both sides import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from resnet_serve.common.imaging import Normaliser
from resnet_serve.common.modeldir import Manifest

from .predictor_config import Plan, PredictorSettings


class EngineError(RuntimeError):
    """The predictor failed on a batch, or the engine could not start; the servicer maps it to INTERNAL."""


class WorkerDied(RuntimeError):
    """The worker died while holding the batch (or could not be restarted); mapped to UNAVAILABLE."""


# ------------------------------------------------------------------ shared-memory layout


@dataclass(frozen=True)
class BatchLayout:
    """One worker's shared memory: float32 [max_batch, 3, H, W] model input, then uint8 [max_batch, H, W, 3] pixels
    (4x fewer bytes to write in the front; the worker normalises them into the float rows, unless
    ``pixels_in``: the model takes the pixel rows as they are, docs/architecture.md "Where normalisation
    happens"), then, with ``num_classes``, float32 [max_batch, num_classes] logits: the worker writes a batch's
    answer there instead of pickling it through the pipe (128 KB for 32 images of 1,000 classes)."""

    max_batch: int
    input_shape: tuple[int, int, int]  # (3, H, W)
    pixels_in: bool = False  # the manifest's input_format is uint8_nhwc
    num_classes: int = 0  # 0: no logits region, every answer travels in its BatchDone

    def warmup_batch(self, n: int) -> np.ndarray:
        """Zeros of the model's own input for a batch of ``n`` (what an all-uint8 batch feeds it)."""
        c, h, w = self.input_shape
        return np.zeros((n, h, w, c), np.uint8) if self.pixels_in else np.zeros((n, c, h, w), np.float32)

    @property
    def nbytes(self) -> int:
        return self.max_batch * (int(np.prod(self.input_shape)) * (4 + 1) + self.num_classes * 4)

    def views(self, buf: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The float32 input, uint8 pixel and float32 logits arrays over ``buf`` (a shared memory buffer of
        ``nbytes``); no logits array without ``num_classes``."""
        c, h, w = self.input_shape
        f32 = np.ndarray((self.max_batch, c, h, w), dtype=np.float32, buffer=buf)
        u8 = np.ndarray((self.max_batch, h, w, c), dtype=np.uint8, buffer=buf, offset=f32.nbytes)
        logits = np.ndarray((self.max_batch, self.num_classes), dtype=np.float32, buffer=buf,
                            offset=f32.nbytes + u8.nbytes) if self.num_classes else None
        return f32, u8, logits

    def request_for(self, rows: Sequence[np.ndarray]) -> RunBatch:
        """The request announcing ``rows``: uint8 [H, W, 3] pixels or float [3, H, W] model input, in any mix.
        Raises ValueError for a row of another shape or a batch that does not fit."""
        c, h, w = self.input_shape
        if not 1 <= len(rows) <= self.max_batch:
            raise ValueError(f"batch size {len(rows)} outside 1..{self.max_batch}")
        float_rows = []
        for i, row in enumerate(rows):
            row = np.asarray(row)
            if row.dtype != np.uint8:
                if row.shape != (c, h, w):
                    raise ValueError(f"float item {i} must have shape [{c}, {h}, {w}], got {list(row.shape)}")
                float_rows.append(i)
            elif row.shape != (h, w, c):
                raise ValueError(f"uint8 item {i} must have shape [{h}, {w}, {c}], got {list(row.shape)}")
        return RunBatch(len(rows), tuple(float_rows))

    def check(self, request: RunBatch) -> None:
        """Raises ValueError unless ``request`` names rows inside this layout (the worker checks what it receives)."""
        if not isinstance(request.n, int) or not 1 <= request.n <= self.max_batch:
            raise ValueError(f"batch size {request.n!r} outside 1..{self.max_batch}")
        if not all(isinstance(i, int) and 0 <= i < request.n for i in request.float_rows):
            raise ValueError(f"float rows {request.float_rows!r} outside the batch of {request.n}")


class SharedBatch:
    """A ``BatchLayout`` over a named shared memory block: created (and finally unlinked) by the front, attached
    by the worker. The front writes a batch with ``write``; the worker turns it into model input with ``read``."""

    def __init__(self, layout: BatchLayout, name: str | None = None):
        self.layout = layout
        self.shm = SharedMemory(name=name, create=name is None, size=layout.nbytes if name is None else 0)
        self.floats, self.pixels, self.logits = layout.views(self.shm.buf)

    @property
    def name(self) -> str:
        return self.shm.name

    def write(self, rows: Sequence[np.ndarray], request: RunBatch) -> None:
        """Front side: each row into its part of the buffer (``request`` from ``layout.request_for(rows)``)."""
        float_rows = set(request.float_rows)
        for i, row in enumerate(rows):
            if i in float_rows:
                self.floats[i] = row  # casts to float32 if needed
            else:
                self.pixels[i] = row

    def read(self, request: RunBatch, normalise: Normaliser) -> np.ndarray:
        """Worker side: normalise the batch's uint8 rows into the float rows; returns the float32 [n, 3, H, W]
        model input (a view of the buffer). With ``layout.pixels_in`` a batch without float rows is returned as
        its uint8 [n, H, W, 3] pixels, untouched. Raises ValueError for a request outside the layout."""
        self.layout.check(request)
        n = request.n
        if not request.float_rows and self.layout.pixels_in:
            return self.pixels[:n]
        if not request.float_rows:
            normalise(self.pixels[:n], self.floats[:n])
        else:
            for i in sorted(set(range(n)) - set(request.float_rows)):
                normalise(self.pixels[i], self.floats[i])
        return self.floats[:n]

    def answer(self, n: int, logits: np.ndarray) -> BatchDone:
        """Worker side: the reply to a batch of ``n`` whose answer is ``logits``: written into the logits region
        when it is float32 [n, num_classes] as the layout expects, else carried in the reply itself."""
        if self.logits is not None and logits.shape == (n, self.layout.num_classes):
            self.logits[:n] = logits
            return BatchDone(None)
        return BatchDone(np.ascontiguousarray(logits, dtype=np.float32))

    def logits_of(self, done: BatchDone, n: int) -> BatchDone:
        """Front side, before the slot is written again: the reply with its logits in hand (a copy of the region
        when the worker wrote them there)."""
        if done.logits is not None:
            return done
        if self.logits is None:
            raise EngineError("the worker answered in shared memory that has no logits region")
        return BatchDone(self.logits[:n].copy())

    def close(self) -> None:
        """Release this process's mapping (the arrays over it first: a live buffer export blocks close)."""
        self.floats = self.pixels = self.logits = None  # type: ignore[assignment]
        self.shm.close()

    def unlink(self) -> None:
        """Front side, after every process closed it: free the block."""
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


class BusyClock:
    """When the worker began the batch it is computing (time.monotonic()), or 0 while idle: 8 bytes of shared
    memory, created (and finally unlinked) by the owning front, written by the worker, read by every front waiting
    on it (worker_pool.HangWatch). An aligned 8-byte store is atomic: a reader never sees half of one."""

    def __init__(self, name: str | None = None):
        self.shm = SharedMemory(name=name, create=name is None, size=8 if name is None else 0)
        self.value = np.ndarray((1,), dtype=np.float64, buffer=self.shm.buf)
        if name is None:
            self.value[0] = 0.0

    @property
    def name(self) -> str:
        return self.shm.name

    def read(self) -> float:
        """When the current batch began; 0.0 while idle."""
        return float(self.value[0])

    def close(self) -> None:
        self.value = None  # type: ignore[assignment]
        self.shm.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


# ------------------------------------------------------------------ start spec


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start, computed once in the front and pickled into the spawned process: the
    manifest is not loaded again, nor the plan made again (only a GPU worker re-keys its TensorRT cache)."""

    version_dir: Path
    manifest: Manifest
    settings: PredictorSettings
    plan: Plan
    buckets: tuple[int, ...]  # warmed before Ready: every batch shape served
    layout: BatchLayout
    shm_names: tuple[str, ...] = ()  # this instance's SharedBatch slots; RunBatch.slot indexes them
    visible_gpu: int | None = None  # GPU only: this instance's device (CUDA_VISIBLE_DEVICES)
    listen_path: str = ""  # --front-processes > 1: the Unix socket the other fronts attach through
    clock_name: str = ""  # ... and the BusyClock they read


def worker_socket(socket_dir: Path, index: int) -> str:
    """Where instance ``index``'s worker listens for the other fronts (every process of it, restarts included)."""
    return str(Path(socket_dir) / f"w{index}.sock")


# ------------------------------------------------------------------ messages on the control pipe


@dataclass(frozen=True)
class RunBatch:
    """Front -> worker: the first ``n`` rows of shared-memory slot ``slot`` are a batch. Rows listed in
    ``float_rows`` are already float32 model input; the others are uint8 pixels the worker normalises."""

    n: int
    float_rows: tuple[int, ...] = ()
    slot: int = 0


@dataclass(frozen=True)
class Stop:
    """Front -> worker: exit cleanly."""


Request = RunBatch | Stop


@dataclass(frozen=True)
class Attach:
    """Another front -> worker, first on its socket: the shared-memory slots its RunBatch.slot will index."""

    shm_names: tuple[str, ...]


@dataclass(frozen=True)
class Attached:
    """Worker -> another front: attached; the pid lets that front watch the process and kill it if it hangs,
    which its BusyClock tells."""

    pid: int
    clock_name: str


@dataclass(frozen=True)
class Ready:
    """Worker -> front, once: loaded and warmed; the front reports these timings and names."""

    load_seconds: float
    warmup_seconds: float
    input_name: str
    output_name: str
    build_info: dict[str, Any] = field(default_factory=dict)  # GPU: what was built (trt_cache)


@dataclass(frozen=True)
class LoadFailed:
    """Worker -> front, instead of Ready: the model could not be loaded; the worker exits."""

    message: str


@dataclass(frozen=True)
class BatchDone:
    """Worker -> front: the batch's float32 logits [n, C]; None: they are in the slot's logits region
    (SharedBatch.answer)."""

    logits: np.ndarray | None


@dataclass(frozen=True)
class BatchFailed:
    """Worker -> front: the batch failed (the predictor raised, or the request was malformed); the worker lives on."""

    message: str


Reply = BatchDone | BatchFailed


def batch_result(reply: object) -> BatchDone:
    """The front's reading of a batch reply: BatchDone, else EngineError with the worker's message."""
    if isinstance(reply, BatchDone):
        return reply
    if isinstance(reply, BatchFailed):
        raise EngineError(reply.message)
    raise EngineError(f"unexpected worker reply {type(reply).__name__}")
