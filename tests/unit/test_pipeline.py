"""pipeline: top-k postprocessing, the top_k rule, and one image's path (preprocess -> batcher -> answer) over a
real Batcher, Preprocessor and PreprocessPool; the engine's workers are a numpy runner (tests/unit/serving_parts.py).
"""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from resnet_serve.server.admission import PreprocessQueueFull
from resnet_serve.server.batcher import QueueFull
from resnet_serve.server.pipeline import PICK_K, Answers, ImageInput, Prediction, top_k, top_k_arrays
from resnet_serve.server.preprocess import InvalidInput
from tests.unit.serving_parts import CLASSES, LABELS, SIZE, ClassPickingRunner, Parts, run, uint8_image


# --- top_k ---------------------------------------------------------------------------------------------------
def test_top_k_is_softmax_of_the_best_classes_best_first() -> None:
    logits = np.array([1.0, 3.0, 2.0, 0.0])
    p = np.exp(logits) / np.exp(logits).sum()
    got = top_k(logits, 2, LABELS)
    assert [x.class_id for x in got] == [1, 2]
    assert [x.label for x in got] == ["class-1", "class-2"]
    assert [x.score for x in got] == pytest.approx([p[1], p[2]])


def test_top_k_breaks_ties_by_class_id_and_returns_every_class_when_k_exceeds_them() -> None:
    got = top_k(np.array([5.0, 7.0, 5.0, 7.0]), 10, LABELS)
    assert [x.class_id for x in got] == [1, 3, 0, 2]
    assert sum(x.score for x in got) == pytest.approx(1.0)


def test_top_k_is_stable_for_huge_logits() -> None:
    got = top_k(np.array([1e4, 0.0, -1e4, 0.0], dtype=np.float32), 1, LABELS)
    assert got == [Prediction(0, "class-0", 1.0)]


# --- resolve_top_k -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("requested", "expected"), [(0, 4), (1, 1), (3, 3), (4, 4), (99, 4)])
def test_resolve_top_k_defaults_to_five_and_caps_at_the_class_count(requested: int, expected: int) -> None:
    assert Parts().pipeline.resolve_top_k(requested) == expected  # 4 classes: the default 5 is capped too


# --- classify ------------------------------------------------------------------------------------------------
def _png(value: int, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_each_kind_of_image_gets_its_own_answer_from_the_serving_version() -> None:
    async def body() -> None:
        async with Parts(version="7") as parts:
            p = parts.pipeline
            chw = np.full((3, SIZE, SIZE), 3.0, np.float32).tobytes()
            answers = await asyncio.gather(
                p.classify(uint8_image(1), 1, None),  # at the model size
                p.classify(uint8_image(2, size=2 * SIZE), 1, None),  # resized on a preprocess thread
                p.classify(ImageInput("encoded", _png(6, 16)), 1, None),
                p.classify(ImageInput("float32", chw, (3, SIZE, SIZE)), 2, None))
            assert [a.predictions[0].class_id for a in answers] == [1, 2, 2, 3]
            assert {a.model_version for a in answers} == {"7"}
            assert [len(a.predictions) for a in answers] == [1, 1, 1, 2]
            for kind in ("uint8", "encoded", "float32"):
                assert parts.metrics.registry.get_sample_value(
                    "resnet_serve_preprocess_duration_seconds_count", {"kind": kind}) >= 1

    run(body())


@pytest.mark.parametrize(("image", "message"), [
    (ImageInput("encoded", b""), "image is empty"),
    (ImageInput("encoded", b"not an image at all"), "image is not a"),
    (ImageInput("uint8", b"\0" * 12, (2, 2)), "uint8 tensor shape must be [H, W, 3], got 2 dimensions"),
    (ImageInput("float32", b"\0" * 4, (3, 1, 1)), "float32 tensor shape must be [3, 8, 8]"),
    (ImageInput("bmp", b"x"), "request carries no image"),
])
def test_an_unusable_image_raises_invalid_input_and_never_reaches_the_batcher(image: ImageInput,
                                                                            message: str) -> None:
    async def body() -> None:
        async with Parts() as parts:
            with pytest.raises(InvalidInput) as raised:
                await parts.pipeline.classify(image, 0, None)
            assert str(raised.value).startswith(message)
            assert parts.runner.calls == 0 and parts.pipeline.active == 0

    run(body())


def test_a_model_sized_uint8_image_skips_the_preprocess_threads() -> None:
    """Model-sized uint8 and float32 tensors need no pixel work: they are answered while the preprocess stage is
    full, when an image that must be decoded or resized is refused."""

    async def body() -> None:
        async with Parts(max_preprocess_images=1) as parts:
            started, release = threading.Event(), threading.Event()

            def occupy() -> None:
                started.set()
                release.wait(30)

            occupying = asyncio.ensure_future(parts.pool.run(occupy, size=1))
            assert await asyncio.to_thread(started.wait, 30)
            assert parts.pool.images == 1
            try:
                answer = await parts.pipeline.classify(uint8_image(3), 1, None)
                assert answer.predictions[0].class_id == 3
                with pytest.raises(PreprocessQueueFull):
                    await parts.pipeline.classify(uint8_image(3, size=2 * SIZE), 1, None)
            finally:
                release.set()
                await occupying

    run(body())


def test_wait_idle_returns_only_once_every_call_inside_has_finished() -> None:
    async def body() -> None:
        async with Parts(runner=ClassPickingRunner(held=True)) as parts:
            p = parts.pipeline
            await p.wait_idle()  # idle from the start
            call = asyncio.ensure_future(p.classify(uint8_image(2), 1, None))
            assert await asyncio.to_thread(parts.runner.entered.wait, 30)
            idle = asyncio.ensure_future(p.wait_idle())
            await asyncio.sleep(0)  # let it start waiting (ordering only: nothing depends on elapsed time)
            assert p.active == 1 and not idle.done()
            parts.runner.gate.set()
            assert (await call).predictions[0].class_id == 2
            await idle
            assert p.active == 0

    run(body())


def test_a_failed_call_leaves_the_pipeline_idle() -> None:
    async def body() -> None:
        async with Parts() as parts:
            with pytest.raises(InvalidInput):
                await parts.pipeline.classify(ImageInput("encoded", b""), 0, None)
            await asyncio.wait_for(parts.pipeline.wait_idle(), 5)
            assert parts.pipeline.active == 0

    run(body())


# --- classify_all: the images of one message -----------------------------------------------------------------
def reference_top_k(row: np.ndarray, k: int, labels: list[str]) -> list[Prediction]:
    """The definition, slowly: softmax in float64, every class sorted by (-probability, class id)."""
    e = np.exp(row.astype(np.float64) - row.max())
    p = e / e.sum(keepdims=True)
    return [Prediction(i, labels[i], float(p[i])) for i in sorted(range(len(p)), key=lambda i: (-p[i], i))[:k]]


def top_k_rows(logits: np.ndarray, k: int, labels: list[str]) -> list[list[Prediction]]:
    """What a message of many images is answered with: top_k_arrays, read back through Answers."""
    return [a.predictions for a in Answers(top_k_arrays(logits, k), labels, "1")]


def test_top_k_arrays_is_the_softmax_ranking_of_each_row_ties_by_class_id() -> None:
    """Both ways of choosing (repeated argmax up to PICK_K, partition and sort above it) against the definition,
    scores exactly equal."""
    logits = np.random.default_rng(0).normal(size=(6, CLASSES)).astype(np.float32)
    logits[2] = [5.0, 7.0, 5.0, 7.0]  # ties: by class id
    for k in (1, 2, CLASSES):
        assert top_k_rows(logits, k, LABELS) == [reference_top_k(row, k, LABELS) for row in logits]
    wide = np.random.default_rng(1).normal(size=(5, 1000)).astype(np.float32)
    wide[1, [3, 500, 999]] = 9.0  # a three-way tie at the top
    wide[3, :] = 1.0  # every class tied
    labels = [f"c{i}" for i in range(1000)]
    for k in (1, 5, PICK_K, PICK_K + 1, 1000):
        assert top_k_rows(wide, k, labels) == [reference_top_k(row, k, labels) for row in wide], k
    assert [top_k(row, 5, labels) for row in wide] == top_k_rows(wide, 5, labels)
    assert [p.class_id for p in top_k_rows(wide, 5, labels)[1][:3]] == [3, 500, 999]


def test_a_row_with_fewer_finite_logits_than_k_still_gets_k_distinct_classes() -> None:
    row = np.full(1000, -np.inf, np.float32)
    row[[7, 400]] = [2.0, 1.0]
    labels = [f"c{i}" for i in range(1000)]
    got = top_k(row, 5, labels)
    assert [p.class_id for p in got] == [7, 400, 0, 1, 2] == [p.class_id for p in reference_top_k(row, 5, labels)]
    assert top_k_rows(row[None], 5, labels) == [got]


def test_model_sized_images_of_one_message_go_to_the_batcher_together() -> None:
    """Six model-sized tensors: one batch of four (the batch size) and one of two, each image its own answer."""

    async def body() -> None:
        async with Parts(runner=ClassPickingRunner(held=True), version="3") as parts:
            call = asyncio.ensure_future(parts.pipeline.classify_all([uint8_image(v) for v in range(6)], 1, None))
            assert await asyncio.to_thread(parts.runner.entered.wait, 30)
            assert parts.batcher.queue_depth == 2 and parts.batcher.in_flight == 6  # admitted all at once
            parts.runner.gate.set()
            answers = await call
            assert [a.predictions[0].class_id for a in answers] == [v % CLASSES for v in range(6)]
            assert {a.model_version for a in answers} == {"3"} and parts.runner.calls == 2
            assert parts.pipeline.active == 0

    run(body())


def test_a_message_that_needs_pixel_work_is_answered_image_by_image_in_order() -> None:
    async def body() -> None:
        async with Parts() as parts:
            images = [uint8_image(1), ImageInput("encoded", _png(6, 16)), uint8_image(3, size=2 * SIZE)]
            answers = await parts.pipeline.classify_all(images, 1, None)
            assert [a.predictions[0].class_id for a in answers] == [1, 2, 3]

    run(body())


def test_a_message_the_queue_cannot_hold_is_refused_whole() -> None:
    """Three places left, four images: none is queued (no partial message); the calls inside are unharmed."""

    async def body() -> None:
        async with Parts(runner=ClassPickingRunner(held=True), max_queue_size=4) as parts:
            first = asyncio.ensure_future(parts.pipeline.classify(uint8_image(0), 1, None))
            assert await asyncio.to_thread(parts.runner.entered.wait, 30)
            queued = asyncio.ensure_future(parts.pipeline.classify(uint8_image(1), 1, None))
            while parts.batcher.queue_depth < 1:
                await asyncio.sleep(0)  # ordering only: let the call reach the queue
            with pytest.raises(QueueFull, match="no room for 4 images"):
                await parts.pipeline.classify_all([uint8_image(v) for v in range(4)], 1, None)
            assert parts.batcher.queue_depth == 1 and parts.pipeline.active == 2
            parts.runner.gate.set()
            assert [(await c).predictions[0].class_id for c in (first, queued)] == [0, 1]

    run(body())
