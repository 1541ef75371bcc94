"""One image request's path through the server, minus the transport: preprocess (off the event loop) ->
batcher -> postprocess (softmax, top-k, labels). Knows numpy and the batcher; nothing of gRPC or Paddle."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from .admission import PreprocessPool
from .batcher import Batcher
from .metrics import Metrics
from .preprocess import InvalidInput, Preprocessor

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class ModelDescription:
    name: str
    version: str
    architecture: str
    input_shape: tuple[int, int, int]
    num_classes: int
    precision: str
    max_batch_size: int
    device: str
    engine: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ImageInput:
    kind: str  # encoded | uint8 | float32
    data: bytes
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Prediction:
    class_id: int
    label: str
    score: float


def top_k(logits: np.ndarray, k: int, labels: list[str]) -> list[Prediction]:
    """Softmax probabilities of the k best classes, best first."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    best = np.argpartition(-p, k - 1)[:k] if k < len(p) else np.arange(len(p))
    best = best[np.lexsort((best, -p[best]))]  # by score, ties by class id: stable answers
    return [Prediction(int(i), labels[i], float(p[i])) for i in best]


@dataclass(frozen=True)
class Answer:
    predictions: list[Prediction]
    model_version: str  # the version that computed it (a reload may switch versions between two requests)


class Pipeline:
    """One model version's path. Counts the calls inside it so a reload can retire it once they are done."""

    def __init__(self, batcher: Batcher, preprocessor: Preprocessor, labels: list[str], model: ModelDescription,
                 metrics: Metrics, pool: PreprocessPool):
        self.batcher, self.preprocessor, self.labels = batcher, preprocessor, labels
        self.model, self.metrics, self.pool = model, metrics, pool
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no call is inside this pipeline (used to retire a replaced version)."""
        await self._idle.wait()

    def resolve_top_k(self, requested: int) -> int:
        """One rule for the default and an explicit k: 0 means 5, and any k is capped at the class count."""
        return min(requested or DEFAULT_TOP_K, self.model.num_classes)

    def _prepare(self, image: ImageInput) -> np.ndarray:
        t0 = time.perf_counter()
        if image.kind == "encoded":
            x = self.preprocessor.encoded(image.data)
        elif image.kind == "uint8":
            x = self.preprocessor.uint8_hwc(image.shape, image.data)
        elif image.kind == "float32":
            x = self.preprocessor.float32_chw(image.shape, image.data)
        else:
            raise InvalidInput("request carries no image (set `encoded` or `tensor`)")
        self.metrics.preprocess.labels(image.kind).observe(time.perf_counter() - t0)
        return x

    async def classify(self, image: ImageInput, k: int, deadline: float | None) -> Answer:
        """Raises InvalidInput, or the batcher's/engine's exceptions; the transport maps them to status codes."""
        self.active += 1
        self._idle.clear()
        try:
            k = self.resolve_top_k(k)
            if image.kind == "float32" or (image.kind == "uint8" and
                                           tuple(image.shape[:2]) == self.preprocessor.input_size):
                x = self._prepare(image)  # a bounds check and a view, no pixel work: cheaper than a thread hop
            else:
                x = await self.pool.run(self._prepare, image, size=len(image.data))
            logits = await self.batcher.submit(x, deadline)
            return Answer(top_k(logits, k, self.labels), self.model.version)
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()
