"""The engine's front <-> worker protocol without a model: batches round-tripped through the shared-memory layout
and a real pipe to the worker's serve loop (a stand-in compute instead of Paddle), malformed requests and replies."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from resnet_serve.common.imaging import Normaliser, normalise
from resnet_serve.common.modeldir import Manifest
from resnet_serve.server.predictor_config import PredictorSettings
from resnet_serve.server.worker import serve
from resnet_serve.server.worker_protocol import (
    BatchDone,
    BatchFailed,
    BatchLayout,
    EngineError,
    RunBatch,
    SharedBatch,
    Stop,
    WorkerSpec,
    batch_result,
)

SHAPE = (3, 4, 5)  # (3, H, W)
MAX_BATCH = 4
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LAYOUT = BatchLayout(MAX_BATCH, SHAPE)


def fake_logits(x: np.ndarray) -> np.ndarray:
    """Stands in for the predictor: per-row sums of each channel, so every input value reaches the answer."""
    return x.sum(axis=(2, 3))


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 5, 3), dtype=np.uint8)


def floats(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


@pytest.fixture
def front() -> Iterator[SharedBatch]:
    shared = SharedBatch(LAYOUT)
    yield shared
    shared.close()
    shared.unlink()


class Worker:
    """The worker's serve loop on a thread, over a real pipe and its own attachment to the front's shared memory."""

    def __init__(self, shm_name: str, compute=fake_logits, layout: BatchLayout = LAYOUT):
        self.conn, child = mp.get_context("spawn").Pipe()
        self.shared = SharedBatch(layout, shm_name)
        self.thread = threading.Thread(target=serve, args=(child, [self.shared], compute, Normaliser(MEAN, STD)),
                                       daemon=True)
        self.thread.start()

    def ask(self, request: object) -> object:
        self.conn.send(request)
        assert self.conn.poll(30), "no reply from the serve loop"
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send(Stop())
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.shared.close()


@pytest.fixture
def worker(front: SharedBatch) -> Iterator[Worker]:
    w = Worker(front.name)
    yield w
    w.stop()


def test_layout_holds_float_rows_then_pixel_rows() -> None:
    f32, u8, logits = LAYOUT.views(bytearray(LAYOUT.nbytes))
    assert LAYOUT.nbytes == MAX_BATCH * 60 * 5 and logits is None
    assert (f32.shape, f32.dtype, u8.shape, u8.dtype) == ((4, 3, 4, 5), np.float32, (4, 4, 5, 3), np.uint8)
    assert u8.__array_interface__["data"][0] - f32.__array_interface__["data"][0] == f32.nbytes


WITH_LOGITS = BatchLayout(MAX_BATCH, SHAPE, num_classes=3)  # fake_logits' [n, 3]


def test_a_layout_with_classes_holds_the_logits_after_the_pixel_rows() -> None:
    f32, u8, logits = WITH_LOGITS.views(bytearray(WITH_LOGITS.nbytes))
    assert WITH_LOGITS.nbytes == LAYOUT.nbytes + MAX_BATCH * 3 * 4
    assert logits is not None and (logits.shape, logits.dtype) == ((4, 3), np.float32)
    assert logits.__array_interface__["data"][0] - u8.__array_interface__["data"][0] == u8.nbytes


def test_logits_that_fit_come_back_through_shared_memory_and_are_copied_out() -> None:
    """The reply carries no array; the front's copy is taken before the slot is written again, so the next batch
    in that slot cannot change an answer already handed out."""
    front = SharedBatch(WITH_LOGITS)
    w = Worker(front.name, layout=WITH_LOGITS)
    try:
        answers = []
        for seed in (3, 4):
            px = pixels(2, seed)
            request = WITH_LOGITS.request_for(list(px))
            front.write(list(px), request)
            reply = w.ask(request)
            assert isinstance(reply, BatchDone) and reply.logits is None
            answers.append(front.logits_of(reply, 2).logits)
            assert not np.shares_memory(answers[-1], front.logits)
        for seed, got in zip((3, 4), answers, strict=True):
            np.testing.assert_allclose(got, fake_logits(normalise(pixels(2, seed), MEAN, STD)), rtol=1e-6)
    finally:
        w.stop()
        front.close()
        front.unlink()


def test_logits_of_another_shape_travel_in_the_reply() -> None:
    """A model whose output is not [n, num_classes] as the manifest says is still answered, through the pipe."""
    front = SharedBatch(WITH_LOGITS)
    w = Worker(front.name, lambda x: np.ones((len(x), 5), np.float32), layout=WITH_LOGITS)
    try:
        front.write([floats(1)[0]], RunBatch(1, (0,)))
        reply = w.ask(RunBatch(1, (0,)))
        assert isinstance(reply, BatchDone) and reply.logits is not None and reply.logits.shape == (1, 5)
        assert front.logits_of(reply, 1) is reply
    finally:
        w.stop()
        front.close()
        front.unlink()


def test_a_reply_naming_a_missing_logits_region_is_an_engine_error(front: SharedBatch) -> None:
    with pytest.raises(EngineError, match="no logits region"):
        front.logits_of(BatchDone(None), 1)


def test_a_mixed_batch_round_trips_through_shared_memory_and_the_pipe(front: SharedBatch, worker: Worker) -> None:
    px, fl = pixels(2), floats(2)
    rows = [px[0], fl[0], px[1], fl[1]]
    request = LAYOUT.request_for(rows)
    assert request == RunBatch(4, (1, 3))
    front.write(rows, request)
    reply = worker.ask(request)
    model_input = np.stack([normalise(px[0], MEAN, STD), fl[0], normalise(px[1], MEAN, STD), fl[1]])
    assert isinstance(reply, BatchDone) and reply.logits.dtype == np.float32
    np.testing.assert_allclose(batch_result(reply).logits, fake_logits(model_input), rtol=1e-6)


def test_an_all_pixel_batch_is_normalised_whole_and_a_smaller_batch_reuses_the_buffer(front: SharedBatch,
                                                                                      worker: Worker) -> None:
    for n, seed in ((4, 3), (1, 4)):
        px = pixels(n, seed)
        request = LAYOUT.request_for(list(px))
        assert request == RunBatch(n, ())
        front.write(list(px), request)
        logits = batch_result(worker.ask(request)).logits
        np.testing.assert_allclose(logits, fake_logits(normalise(px, MEAN, STD)), rtol=1e-6)


@pytest.mark.parametrize("rows,match", [
    ([np.zeros((4, 5), np.uint8)], r"uint8 item 0 must have shape \[4, 5, 3\]"),
    ([np.zeros((3, 4, 5), np.uint8)], "uint8 item 0"),  # model-input shape but pixel dtype
    ([np.zeros((3, 4, 5), np.float32), np.zeros((4, 5, 3), np.float32)], r"float item 1 must have shape"),
    ([], r"batch size 0 outside 1..4"),
    ([np.zeros((3, 4, 5), np.float32)] * 5, r"batch size 5 outside 1..4"),
])
def test_the_front_refuses_rows_that_do_not_fit_the_layout(rows: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LAYOUT.request_for(rows)


@pytest.mark.parametrize("request_,match", [
    (("run", 1), r"unknown request \('run', 1\)"),  # the old ad-hoc tuple
    (RunBatch(0), "batch size 0 outside 1..4"),
    (RunBatch(5), "batch size 5 outside 1..4"),
    (RunBatch(2, (2,)), r"float rows \(2,\) outside the batch of 2"),
    (RunBatch(2, (-1,)), "float rows"),
    (RunBatch("2"), "batch size '2'"),  # type: ignore[arg-type]
])
def test_a_malformed_request_is_a_failed_batch_and_the_worker_keeps_serving(front: SharedBatch, worker: Worker,
                                                                            request_: object, match: str) -> None:
    reply = worker.ask(request_)
    assert isinstance(reply, BatchFailed) and "ValueError" in reply.message
    with pytest.raises(EngineError, match=match):
        batch_result(reply)
    fl = floats(1)
    front.write([fl[0]], RunBatch(1, (0,)))
    np.testing.assert_allclose(batch_result(worker.ask(RunBatch(1, (0,)))).logits, fake_logits(fl), rtol=1e-6)


def test_a_predictor_exception_is_a_failed_batch(front: SharedBatch) -> None:
    calls = []

    def flaky(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("predictor exploded")
        return fake_logits(x)

    w = Worker(front.name, flaky)
    try:
        front.write([floats(1)[0]], RunBatch(1, (0,)))
        with pytest.raises(EngineError, match="RuntimeError: predictor exploded"):
            batch_result(w.ask(RunBatch(1, (0,))))
        assert batch_result(w.ask(RunBatch(1, (0,)))).logits.shape == (1, 3)
        assert calls == [1, 1]
    finally:
        w.stop()


def test_the_front_reads_only_batch_replies() -> None:
    logits = np.ones((1, 3), np.float32)
    assert batch_result(BatchDone(logits)).logits is logits
    with pytest.raises(EngineError, match="^boom$"):
        batch_result(BatchFailed("boom"))
    with pytest.raises(EngineError, match="unexpected worker reply tuple"):
        batch_result(("ok", logits, 0.1))


def test_the_start_spec_and_every_message_survive_pickling(tmp_path: Path) -> None:
    """A worker is spawned: its spec (the front's one plan included) and the messages cross a process boundary."""
    manifest = Manifest(name="m", version=1, architecture="resnet18", num_classes=3, input_size=[4, 5], mean=MEAN,
                        std=STD)
    settings = PredictorSettings(device="gpu", precision="fp16", engine="cuda")
    spec = WorkerSpec(tmp_path, manifest, settings, settings.plan(tmp_path, manifest), (1, 2, 4), LAYOUT,
                      shm_names=("psm_x", "psm_y"), visible_gpu=1)
    assert pickle.loads(pickle.dumps(spec)) == spec
    for msg in (RunBatch(2, (1,), slot=1), Stop(), BatchFailed("x")):
        assert pickle.loads(pickle.dumps(msg)) == msg
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(BatchDone(np.eye(2, dtype=np.float32)))).logits,
                                  np.eye(2))


def test_unlinked_shared_memory_cannot_be_attached() -> None:
    shared = SharedBatch(LAYOUT)
    name = shared.name
    shared.close()
    shared.unlink()
    shared.unlink()  # twice is harmless (close() after a failed start, then again)
    with pytest.raises(FileNotFoundError):
        SharedBatch(LAYOUT, name)


def test_a_pixel_input_layout_hands_the_pixel_rows_over_untouched_unless_a_float_row_is_in_the_batch() -> None:
    """Manifest input_format uint8_nhwc (docs/architecture.md, "Where normalisation happens"): an all-pixel batch
    is read as the uint8 rows themselves (no normalisation); a batch with a float row is model input as before."""
    layout = BatchLayout(MAX_BATCH, SHAPE, pixels_in=True)
    assert layout.nbytes == LAYOUT.nbytes  # float rows keep their place
    assert layout.warmup_batch(2).shape == (2, 4, 5, 3) and layout.warmup_batch(2).dtype == np.uint8
    assert LAYOUT.warmup_batch(2).shape == (2, 3, 4, 5) and LAYOUT.warmup_batch(2).dtype == np.float32
    shared = SharedBatch(layout)
    try:
        px, fl = pixels(3, seed=5), floats(1)
        request = layout.request_for(list(px))
        shared.write(list(px), request)
        read = shared.read(request, Normaliser(MEAN, STD))
        assert read.dtype == np.uint8 and np.array_equal(read, px)
        assert np.shares_memory(read, shared.pixels)  # a view of the buffer: nothing copied or converted
        rows = [px[0], fl[0]]
        request = layout.request_for(rows)
        shared.write(rows, request)
        read = shared.read(request, Normaliser(MEAN, STD))
        np.testing.assert_allclose(read, np.stack([normalise(px[0], MEAN, STD), fl[0]]), rtol=1e-6)
        del read  # a live view blocks close()
    finally:
        shared.close()
        shared.unlink()


def test_each_slot_is_its_own_batch_and_replies_come_in_request_order() -> None:
    """Two slots: both batches are written before the worker reads either (the second queued on the pipe behind
    the first), and each reply answers its own slot's rows, in the order sent; a slot the worker lacks fails
    that batch only."""
    slots = [SharedBatch(LAYOUT), SharedBatch(LAYOUT)]
    conn, child = mp.get_context("spawn").Pipe()
    attached = [SharedBatch(LAYOUT, s.name) for s in slots]
    thread = threading.Thread(target=serve, args=(child, attached, fake_logits, Normaliser(MEAN, STD)), daemon=True)
    try:
        a, b = floats(2, seed=3), floats(4, seed=4)
        slots[0].write(list(a), RunBatch(2, (0, 1), slot=0))
        slots[1].write(list(b), RunBatch(4, (0, 1, 2, 3), slot=1))
        conn.send(RunBatch(2, (0, 1), slot=0))
        conn.send(RunBatch(4, (0, 1, 2, 3), slot=1))
        conn.send(RunBatch(1, (0,), slot=2))
        thread.start()
        replies = []
        for _ in range(3):
            assert conn.poll(30), "no reply from the serve loop"
            replies.append(conn.recv())
        np.testing.assert_allclose(batch_result(replies[0]).logits, fake_logits(a), rtol=1e-6)
        np.testing.assert_allclose(batch_result(replies[1]).logits, fake_logits(b), rtol=1e-6)
        assert isinstance(replies[2], BatchFailed) and "slot 2 outside 0..1" in replies[2].message
        conn.send(Stop())
        thread.join(30)
        assert not thread.is_alive()
    finally:
        for s in attached + slots:
            s.close()
        for s in slots:
            s.unlink()
