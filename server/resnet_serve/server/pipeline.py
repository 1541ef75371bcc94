"""One image request's path through the server, minus the transport: preprocess (off the event loop) ->
batcher -> postprocess (softmax, top-k, labels). Knows numpy and the batcher; nothing of gRPC or Paddle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, overload

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
    data: bytes | memoryview  # a memoryview: a slice of a larger request, not copied
    shape: tuple[int, ...] = ()


class Prediction(NamedTuple):
    """A tuple, not a dataclass: half the cost to make, and a response of 32 images at k=5 makes 160."""

    class_id: int
    label: str
    score: float


class TopK(NamedTuple):
    """The k best classes of each of n images, best first: what a response of many images is written from,
    with no object per class (oip_codec.response_of)."""

    ids: np.ndarray     # int64 [n, k]
    scores: np.ndarray  # float64 [n, k], softmax probabilities


PICK_K = 16  # up to this k the best classes are picked by repeated argmax: 3-4x faster than a partition and sort


def top_k(logits: np.ndarray, k: int, labels: list[str]) -> list[Prediction]:
    """top_k_arrays of one row, the same answers as Prediction objects, in 1-D numpy (a third of the time of
    top_k_arrays on one row)."""
    z = np.asarray(logits).astype(np.float64)
    e = np.exp(z - z.max())
    total = e.sum()
    ids: list[int] = []
    if k <= PICK_K and k < len(z):
        for _ in range(k):
            i = int(z.argmax())
            if ids and z[i] == -np.inf:  # fewer than k classes above -inf: i may be taken already
                ids = []
                break
            ids.append(i)
            z[i] = -np.inf
    if not ids:
        ids = np.argsort(-(e / total), kind="stable")[:k].tolist()
    return [Prediction(i, labels[i], float(e[i] / total)) for i in ids]


def top_k_arrays(logits: np.ndarray, k: int) -> TopK:
    """The k best classes of every row of [n, classes] logits by softmax probability, best first, ties by class id
    (stable answers). The probabilities are float64 whichever way the classes are chosen."""
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    total = e.sum(axis=1, keepdims=True)
    best = _picked(z, k) if k <= PICK_K and k < z.shape[1] else None
    if best is None:  # a stable sort: tied classes stay in class id order (a partition would pick among them)
        best = np.argsort(-(e / total), axis=1, kind="stable")[:, :k]
    return TopK(best.astype(np.int64, copy=False), np.take_along_axis(e, best, axis=1) / total)



def _picked(z: np.ndarray, k: int) -> np.ndarray | None:
    """The k largest of each row by repeated argmax (it returns the first maximum: ties go to the lower class id);
    None when a row has fewer than k values above -inf (a class would be picked twice). Overwrites z."""
    rows = np.arange(len(z))
    best = np.empty((len(z), k), np.intp)
    for j in range(k):
        best[:, j] = column = z.argmax(axis=1)
        if j and np.isneginf(z[rows, column]).any():
            return None
        z[rows, column] = -np.inf
    return best


@dataclass(frozen=True)
class Answer:
    predictions: list[Prediction]
    model_version: str  # the version that computed it (a reload may switch versions between two requests)


class Answers(Sequence[Answer]):
    """Every image's answer of one call, in order, all from one version. Answers computed together are held as
    arrays (TopK) and an Answer, with its Prediction objects, is made only when one is asked for; a response of
    many images is written from the arrays. Answers made one by one (``of``) are kept as they are, and their
    arrays made only if asked for."""

    def __init__(self, top: TopK | None, labels: Sequence[str], model_version: str,
                 made: Sequence[Answer] | None = None):
        self._top, self._made = top, made
        self.labels, self.model_version = labels, model_version

    @classmethod
    def of(cls, answers: Sequence[Answer], labels: Sequence[str], model_version: str) -> Answers:
        """Answers made one by one (the images that each took their own call), as one block."""
        return cls(None, labels, model_version, list(answers))

    @property
    def top(self) -> TopK:
        if self._top is None:
            made = self._made or []
            k = len(made[0].predictions) if made else 0
            ids = np.array([[p.class_id for p in a.predictions] for a in made], np.int64).reshape(len(made), k)
            self._top = TopK(ids, np.array([[p.score for p in a.predictions] for a in made],
                                            np.float64).reshape(ids.shape))
        return self._top

    def __len__(self) -> int:
        return len(self._made) if self._made is not None else len(self.top.ids)

    @overload
    def __getitem__(self, i: int) -> Answer: ...

    @overload
    def __getitem__(self, i: slice) -> list[Answer]: ...

    def __getitem__(self, i: int | slice) -> Answer | list[Answer]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._made is not None:
            return self._made[i]
        ids, scores = self.top.ids[i].tolist(), self.top.scores[i].tolist()
        labels = self.labels
        return Answer([Prediction(c, labels[c], s) for c, s in zip(ids, scores, strict=True)], self.model_version)


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
        self.metrics.preprocess_of(image.kind).observe(time.perf_counter() - t0)
        return x

    def _inline(self, image: ImageInput) -> bool:
        """A bounds check and a view, no pixel work: cheaper on the loop than a hop to a preprocess thread."""
        return image.kind == "float32" or (image.kind == "uint8" and
                                           tuple(image.shape[:2]) == self.preprocessor.input_size)

    def _enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.active -= 1
        if not self.active:
            self._idle.set()

    async def classify(self, image: ImageInput, k: int, deadline: float | None) -> Answer:
        """Raises InvalidInput, or the batcher's/engine's exceptions; the transport maps them to status codes."""
        self._enter()
        try:
            k = self.resolve_top_k(k)
            x = self._prepare(image) if self._inline(image) else \
                await self.pool.run(self._prepare, image, size=len(image.data))
            logits = await self.batcher.submit(x, deadline)
            return Answer(top_k(logits, k, self.labels), self.model.version)
        finally:
            self._leave()

    async def classify_all(self, images: Sequence[ImageInput], k: int, deadline: float | None) -> Answers:
        """Every image's answer, in order; on the first failure the others are abandoned and it is raised.

        Images that need no pixel work (tensors at the model's size: what a GPU is fed) go to the batcher
        together and are answered in one pass (Batcher.submit_many, top_k_arrays): a message of N images pays the
        per-call costs once. Others are prepared on the preprocess threads, each its own call."""
        if len(images) == 1 or not all(self._inline(image) for image in images):
            answers = await all_or_first_error([self.classify(image, k, deadline) for image in images])
            return Answers.of(answers, self.labels, self.model.version)
        self._enter()
        try:
            k = self.resolve_top_k(k)
            rows = await self.batcher.submit_many([self._prepare(image) for image in images], deadline)
            return Answers(top_k_arrays(np.stack(rows), k), self.labels, self.model.version)
        finally:
            self._leave()


async def all_or_first_error(calls: list[Awaitable[Answer]]) -> list[Answer]:
    """Every answer in order; on the first failure the other calls are cancelled and it is raised."""
    if len(calls) == 1:
        return [await calls[0]]
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
        if failed is not None:
            raise failed.exception()
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
