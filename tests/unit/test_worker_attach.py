"""Other fronts attached to a worker's serve loop (--front-processes > 1) without a model: the loop on a thread,
its owner's pipe, and real Unix-socket connections from "other fronts" with their own shared memory. A front that
misbehaves (garbage, silence, leaving mid-batch) loses its own connection; the owner and the others keep being
served; only the owner's Stop ends the loop."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest

from resnet_serve.common.imaging import Normaliser
from resnet_serve.server import worker as worker_module
from resnet_serve.server.worker import listen, serve
from resnet_serve.server.worker_pool import HangWatch
from resnet_serve.server.worker_protocol import (
    Attach,
    Attached,
    BatchDone,
    BatchFailed,
    BatchLayout,
    BusyClock,
    RunBatch,
    SharedBatch,
    Stop,
    worker_socket,
)

LAYOUT = BatchLayout(2, (3, 2, 2))
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def fake_logits(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=(2, 3))


class Loop:
    """worker.serve on a thread: the owner's pipe, its slot, and a listener for other fronts."""

    def __init__(self, socket_dir: Path, compute=fake_logits):
        self.path = worker_socket(socket_dir, 0)
        self.owner_slot = SharedBatch(LAYOUT)
        self.worker_slot = SharedBatch(LAYOUT, self.owner_slot.name)  # the worker's own mapping of it
        self.conn, child = mp.get_context("spawn").Pipe()
        self.listener = listen(self.path)
        self.thread = threading.Thread(target=serve, daemon=True,
                                       args=(child, [self.worker_slot], compute, Normaliser(MEAN, STD),
                                             self.listener, LAYOUT))
        self.thread.start()

    def ask(self, request: object) -> object:
        self.conn.send(request)
        assert self.conn.poll(30), "no reply to the owner"
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send(Stop())
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.listener.close()
        self.worker_slot.close()
        self.owner_slot.close()
        self.owner_slot.unlink()


class Front:
    """Another front: its own slot, one connection to the worker."""

    def __init__(self, path: str):
        self.slot = SharedBatch(LAYOUT)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        self.conn = Connection(sock.detach())

    def attach(self) -> object:
        self.conn.send(Attach((self.slot.name,)))
        assert self.conn.poll(30)
        return self.conn.recv()

    def run(self, rows: np.ndarray) -> object:
        request = LAYOUT.request_for(list(rows))
        self.slot.write(list(rows), request)
        self.conn.send(request)
        assert self.conn.poll(30)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.close()
        self.slot.close()
        self.slot.unlink()


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    w = Loop(tmp_path)
    yield w
    w.stop()


def rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, 2, 2, 3), dtype=np.uint8)


def expected(x: np.ndarray) -> np.ndarray:
    out = np.empty((len(x), 3, 2, 2), np.float32)
    Normaliser(MEAN, STD)(x, out)
    return fake_logits(out)


def owner_still_served(loop: Loop) -> None:
    x = rows(99)
    loop.owner_slot.write(list(x), LAYOUT.request_for(list(x)))
    reply = loop.ask(RunBatch(2))
    assert isinstance(reply, BatchDone) and np.allclose(reply.logits, expected(x))


def test_two_attached_fronts_each_get_their_own_batches_answered(loop: Loop) -> None:
    a, b = Front(loop.path), Front(loop.path)
    try:
        assert a.attach() == Attached(os.getpid(), clock_name="")
        assert isinstance(b.attach(), Attached)
        xa, xb = rows(1), rows(2)
        ra, rb = a.run(xa), b.run(xb)
        assert isinstance(ra, BatchDone) and np.allclose(ra.logits, expected(xa))
        assert isinstance(rb, BatchDone) and np.allclose(rb.logits, expected(xb))
        owner_still_served(loop)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("first", [b"not a pickle at all", None], ids=["garbage", "wrong-message"])
def test_a_front_that_does_not_attach_properly_is_dropped_and_nobody_else_notices(loop: Loop, first) -> None:
    bad = Front(loop.path)
    try:
        if first is None:
            bad.conn.send(RunBatch(1))  # a batch before Attach
        else:
            bad.conn.send_bytes(first)
        with pytest.raises(EOFError):  # dropped: its connection closes
            bad.conn.recv()
        good = Front(loop.path)
        assert isinstance(good.attach(), Attached)
        assert isinstance(good.run(rows(3)), BatchDone)
        good.close()
        owner_still_served(loop)
    finally:
        bad.slot.close()
        bad.slot.unlink()


def test_a_silent_front_is_dropped_after_the_attach_timeout(loop: Loop, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "ATTACH_TIMEOUT_S", 0.0)  # the worker only polls, never waits, for it
    silent = Front(loop.path)
    try:
        with pytest.raises(EOFError):
            silent.conn.recv()
        owner_still_served(loop)
    finally:
        silent.close()


def test_garbage_and_bad_slots_after_attaching_drop_only_that_front(loop: Loop) -> None:
    a, b = Front(loop.path), Front(loop.path)
    try:
        a.attach(), b.attach()
        a.conn.send(RunBatch(1, slot=5))  # a slot it does not have
        assert a.conn.poll(30)
        reply = a.conn.recv()
        assert isinstance(reply, BatchFailed) and "slot 5" in reply.message
        a.conn.send_bytes(b"\x80garbage")
        with pytest.raises(EOFError):
            a.conn.recv()
        assert isinstance(b.run(rows(4)), BatchDone)
        owner_still_served(loop)
    finally:
        a.close()
        b.close()


def test_a_front_leaving_with_a_batch_unanswered_costs_only_its_reply(loop: Loop) -> None:
    a = Front(loop.path)
    a.attach()
    x = rows(5)
    a.slot.write(list(x), LAYOUT.request_for(list(x)))
    a.conn.send(RunBatch(2))
    a.close()  # gone before the reply: the worker's send fails, and it drops the connection
    owner_still_served(loop)
    b = Front(loop.path)
    try:
        b.attach()
        assert isinstance(b.run(rows(6)), BatchDone)
    finally:
        b.close()


def test_stop_from_another_front_only_detaches_it(loop: Loop) -> None:
    a = Front(loop.path)
    try:
        a.attach()
        a.conn.send(Stop())
        with pytest.raises(EOFError):
            a.conn.recv()
        owner_still_served(loop)
    finally:
        a.close()


def test_a_front_that_stops_reading_is_dropped_and_the_worker_serves_on(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Its reply cannot be sent (far more than a socket buffer, never read): after the send timeout the worker
    drops that front instead of waiting on it for ever."""
    monkeypatch.setattr(worker_module, "ATTACHED_SEND_TIMEOUT_S", 1)
    huge = Loop(tmp_path, compute=lambda x: np.zeros((len(x), 2_000_000), np.float32))  # 16 MB replies
    stuck = Front(huge.path)
    try:
        stuck.attach()
        x = rows(7)
        stuck.slot.write(list(x), LAYOUT.request_for(list(x)))
        stuck.conn.send(RunBatch(2))  # and never reads the reply
        huge.owner_slot.write(list(x), LAYOUT.request_for(list(x)))
        assert isinstance(huge.ask(RunBatch(2)), BatchDone)  # answered once the stuck front is dropped
    finally:
        stuck.close()
        huge.stop()


def test_the_hang_watch_counts_from_the_workers_last_progress_when_fronts_share_it() -> None:
    """With a BusyClock: batches of other fronts ahead of ours are progress (each restarts the count); a worker
    stuck on one batch, or idle with ours unanswered, is hung once the limit passes without a change."""
    clock = BusyClock()
    try:
        watch = HangWatch(10.0, clock, now=100.0)
        for t in (105.0, 111.0, 117.0):  # another front's batch begins every 6 s: never hung
            clock.value[0] = t
            assert watch.left(now=t + 0.5) == pytest.approx(10.0)
        assert watch.left(now=127.0) == pytest.approx(0.5)  # the batch begun at 117 s is still computing
        assert watch.left(now=128.0) < 0  # ... past the limit: hung
        clock.value[0] = 0.0  # it ended; now idle, with our batch still unanswered
        assert watch.left(now=130.0) == pytest.approx(10.0)
        assert watch.left(now=140.5) < 0
    finally:
        clock.close()
        clock.unlink()


def test_the_hang_watch_without_a_clock_counts_from_its_start() -> None:
    watch = HangWatch(10.0, None, now=100.0)
    assert watch.left(now=109.0) == pytest.approx(1.0) and watch.left(now=110.5) < 0
