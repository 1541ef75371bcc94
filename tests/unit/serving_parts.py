"""Real serving parts without a Paddle model, for the unit tests of pipeline, handle and serving_model: a real
Batcher, Preprocessor, PreprocessPool and Metrics around a numpy runner that stands in for the engine's workers
(the batcher's runner contract is the boundary: a blocking callable, list of items -> one row of logits each)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import numpy as np

from resnet_serve.common.modeldir import MANIFEST, Manifest, sha256_file
from resnet_serve.server.admission import PreprocessPool
from resnet_serve.server.batcher import Batcher, BatchPolicy
from resnet_serve.server.metrics import Metrics
from resnet_serve.server.pipeline import ImageInput, ModelDescription, Pipeline
from resnet_serve.server.preprocess import Preprocessor

T = TypeVar("T")
SAFETY_S = 30.0  # safety net only: no test comes anywhere near it
SIZE = 8  # the model's input: 8x8
CLASSES = 4
LABELS = [f"class-{i}" for i in range(CLASSES)]


def run(coro: Awaitable[T]) -> T:
    """Run one async test body with a global safety timeout."""

    async def main() -> T:
        return await asyncio.wait_for(coro, SAFETY_S)

    return asyncio.run(main())


class ClassPickingRunner:
    """Stands in for the engine's workers: each item's logits are 10 for class (first value of the item) mod
    CLASSES and 0 elsewhere, so every request can check it got its own row. `held`: every call waits until
    `gate` opens; `entered` is set once a call has started."""

    def __init__(self, held: bool = False):
        self.gate, self.entered = threading.Event(), threading.Event()
        if not held:
            self.gate.set()
        self.calls = 0

    def __call__(self, items: list[np.ndarray]) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        if not self.gate.wait(SAFETY_S):
            raise TimeoutError("the test never opened the runner's gate")
        logits = np.zeros((len(items), CLASSES), dtype=np.float32)
        for row, x in enumerate(items):
            logits[row, int(np.asarray(x).flat[0]) % CLASSES] = 10.0
        return logits


def description(version: str = "1", num_classes: int = CLASSES, max_batch_size: int = 4) -> ModelDescription:
    return ModelDescription(name="tiny", version=version, architecture="resnet18", input_shape=(3, SIZE, SIZE),
                            num_classes=num_classes, precision="fp32", max_batch_size=max_batch_size, device="cpu",
                            engine="paddle", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def uint8_image(value: int, size: int = SIZE) -> ImageInput:
    """A uniform uint8 HWC image; at the model's size the runner answers class value % CLASSES."""
    return ImageInput("uint8", np.full((size, size, 3), value, np.uint8).tobytes(), (size, size, 3))


class Parts:
    """A started pipeline and what it is made of; `close()` stops the batcher and the preprocess threads."""

    def __init__(self, runner: ClassPickingRunner | None = None, version: str = "1", max_preprocess_images: int = 64,
                 max_queue_size: int = 64):
        self.runner = runner or ClassPickingRunner()
        self.metrics = Metrics(max_batch_size=4)
        self.metrics.model_published("tiny", version)
        self.pool = PreprocessPool(1, max_preprocess_images, 1 << 30)
        self.batcher = Batcher([self.runner], BatchPolicy(max_batch_size=4, max_queue_delay_us=0,
                                                          max_queue_size=max_queue_size))
        self.pipeline = Pipeline(self.batcher, Preprocessor((SIZE, SIZE)), LABELS, description(version),
                                 self.metrics, self.pool)

    async def __aenter__(self) -> Parts:
        await self.batcher.start()
        return self

    async def __aexit__(self, *exc) -> None:
        self.runner.gate.set()
        await self.batcher.stop()
        self.pool.shutdown()


def fake_version(model_dir: Path, version: int, tamper: str | None = None, unlisted: str | None = None) -> Path:
    """A version folder a manifest describes, with placeholder model files (no predictor can load them: they stand
    in for an export where only the folder's rules are under test). `tamper`: that file changes after its sha256
    was listed; `unlisted`: that file has no sha256 in `files`."""
    folder = model_dir / str(version)
    folder.mkdir(parents=True)
    contents = {"inference.json": b"{}", "inference.pdiparams": b"\0" * 16, "labels.txt": "\n".join(LABELS).encode()}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    files = {name: sha256_file(folder / name) for name in contents if name != unlisted}
    manifest = Manifest(name="tiny", version=version, architecture="resnet18", num_classes=CLASSES,
                        input_size=[SIZE, SIZE], mean=[0.5] * 3, std=[0.25] * 3, files=files)
    (folder / MANIFEST).write_text(manifest.to_json())
    if tamper is not None:
        (folder / tamper).write_bytes(contents[tamper] + b"changed")
    return folder
