"""A simulated engine, for benchmarks only (issue 17): a batch of b images "computes" in a + c*b milliseconds.

Why: to show on a CPU machine how well the front and the batcher would feed a GPU, the worker needs a GPU-like
cost curve (a fixed launch cost plus a small cost per image) without a GPU. ``--engine simulated
--simulated-cost-ms A,C`` selects it (server/resnet_serve/server/settings.py); it is never a serving default, and
GetModelInfo and the info metric report engine "simulated" so no figure is mistaken for a model's.

The logits are a deterministic function of the pixels, so tests can check each answer belongs to its request: an
image whose mean pixel value (0-255, over every STRIDE-th row and column) rounds to p gets top-1 class
``p % num_classes``. Only that sample is read (uint8 pixels are never normalised: a GPU would do it in the graph),
and the wait is counted from when ``run`` began, so the batch takes a + c*b ms in all as long as that sampling is
cheaper.

The wait ends on time: a plain ``time.sleep`` of 5 ms returned 0.17 ms late (median; 0.37 ms at the 90th
percentile) on the 2-core benchmark machine, the kernel's 50 us timer slack plus the wake-up of an idle CPU, which
is the simulator's error, not the serving path's. So the worker's timer slack is set to 1 ns and the last
``SPIN_TAIL_S`` of every wait is spun on the clock rather than slept, as a CUDA host thread spins by default while
it waits for its GPU (cudaDeviceScheduleAuto, with fewer GPU contexts than cores).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resnet_serve.common.modeldir import Manifest

STRIDE = 8  # every 8th row and column: enough for a deterministic answer, 1/64 of the reading
SPIN_TAIL_S = 0.0003  # the end of every wait, spun: worker CPU per batch spent so that the batch ends on time
PR_SET_TIMERSLACK = 29  # prctl(2)


def parse_cost_ms(text: str) -> tuple[float, float]:
    """"A,C" -> (a, c) milliseconds: a per batch, c per image; both finite and >= 0. ValueError otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        a, c = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"simulated_cost_ms must be A,C in milliseconds (a batch of b takes A + C*b ms), e.g. "
                         f"5,0.1; not {text!r}") from None
    if not (np.isfinite(a) and np.isfinite(c) and a >= 0 and c >= 0):
        raise ValueError(f"simulated_cost_ms A,C must be finite and >= 0, not {text!r}")
    return a, c


def batch_seconds(cost_ms: tuple[float, float], n: int) -> float:
    """The simulated compute time of a batch of n: (a + c*n) ms, in seconds."""
    a, c = cost_ms
    return (a + c * n) / 1000.0


def wait_until(deadline: float, clock: Callable[[], float], sleep: Callable[[float], None],
               spin_tail_s: float = SPIN_TAIL_S) -> None:
    """Return at ``deadline`` (on ``clock``): sleep until ``spin_tail_s`` before it, spin on the clock after."""
    left = deadline - clock()
    if left <= 0:
        return
    if left > spin_tail_s:
        sleep(left - spin_tail_s)
    while clock() < deadline:
        pass


def tighten_timer_slack() -> bool:
    """Ask Linux to wake this thread's sleeps within 1 ns of their end instead of 50 us (prctl
    PR_SET_TIMERSLACK); False where that is not available."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def simulated_top1(pixel_mean: float, num_classes: int) -> int:
    """The class the simulated engine ranks first for an image of this mean pixel value (0-255)."""
    return int(round(pixel_mean)) % num_classes


@dataclass
class SimulatedPredictor:
    """The Predictor interface the worker uses (server/resnet_serve/server/worker.py): ``input_name``,
    ``output_name``, ``build_info`` and ``run``; built by ``predictor.build_predictor`` for engine "simulated".

    ``run`` waits for the simulated compute (``wait_until``: slept, its last ``SPIN_TAIL_S`` spun; the timer slack of
    the thread that makes the predictor, the worker's only one, is tightened). ``time.sleep`` releases the GIL,
    unlike a real predictor, whose ``run()`` holds the GIL for the whole batch (docs/architecture.md, "Process
    model"): the worker is a process of its own either way, so the front sees the same thing, but threads inside
    the worker would not.
    ``sleep`` and ``clock`` are injectable so tests check the requested waits instead of timing them.
    """

    manifest: Manifest
    cost_ms: tuple[float, float] = (0.0, 0.0)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.perf_counter
    build_info: dict[str, Any] = field(default_factory=dict)  # empty: what log_build reads is for GPU builds

    def __post_init__(self) -> None:
        self.input_name: str = self.manifest.input_name
        self.output_name: str = "simulated_logits"
        self.num_classes = int(self.manifest.num_classes)
        self._mean = np.asarray(self.manifest.mean, np.float64)
        self._std = np.asarray(self.manifest.std, np.float64)
        tighten_timer_slack()

    def batch_seconds(self, n: int) -> float:
        """The simulated compute time of a batch of n: (a + c*n) ms."""
        return batch_seconds(self.cost_ms, n)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 model input [n, 3, H, W], or uint8 pixels [n, H, W, 3] -> float32 logits [n, num_classes], after
        (a + c*n) ms in all. Pixels are never normalised here: a pixel-input model normalises them in its graph,
        on the GPU this engine stands in for."""
        start = self.clock()
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[3 if batch.dtype == np.uint8 else 1] != 3:
            raise ValueError(f"expected [n, 3, H, W] float32 or [n, H, W, 3] uint8, got {batch.shape}")
        logits = self.logits(self.pixel_means(batch))
        wait_until(start + self.batch_seconds(len(batch)), self.clock, self.sleep)
        return logits

    def pixel_means(self, batch: np.ndarray) -> np.ndarray:
        """Each image's mean pixel value (0-255) over a strided sample: read from uint8 pixels as they are (a
        GPU would normalise them, so no CPU is spent on it here), recovered from float32 model input."""
        if batch.dtype == np.uint8:
            return np.asarray(batch[:, ::STRIDE, ::STRIDE, :], np.float64).mean(axis=(1, 2, 3))
        sample = np.asarray(batch[:, :, ::STRIDE, ::STRIDE], np.float64).mean(axis=(2, 3))  # [n, 3]
        return ((sample * self._std + self._mean) * 255.0).mean(axis=1)

    def logits(self, pixel_means: np.ndarray) -> np.ndarray:
        """[n, num_classes], peaked at each image's ``simulated_top1``."""
        top = np.array([simulated_top1(p, self.num_classes) for p in pixel_means], np.float64)
        return (-np.abs(np.arange(self.num_classes)[None, :] - top[:, None])).astype(np.float32)
