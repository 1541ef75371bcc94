"""An engine attached to another engine's workers (what a secondary front runs, --front-processes > 1), in this
process with real worker processes: same answers; a worker the owner replaces is re-attached; a worker that
hangs on an attached front's batch is killed from there and replaced by the owner; detaching never stops a
worker. Outcomes are events (answers, exceptions, pids), never durations."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from resnet_serve.server.engine import Engine, EngineConfig, WorkerDied
from tests.harness import WorkerGate, gated_workers, wait_for

BUCKETS = (1, 2)
LIMIT_S = 2.0  # the attached front's batch time limit; its batches are held by the gate, never finished in time


def rows(seed: int) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerGate]:
    with gated_workers(tmp_path_factory.mktemp("attached") / "gate") as g:
        g.open()
        yield g


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path, gate: WorkerGate) -> Iterator[tuple[Engine, Engine]]:
    version = tiny_model_dir / "1"
    owner = Engine(EngineConfig(version_dir=version, threads_per_instance=1, max_batch_size=2, buckets=BUCKETS,
                                worker_sockets=True))
    owner.start()
    assert owner.socket_dir is not None
    other = Engine(EngineConfig(version_dir=version, threads_per_instance=1, max_batch_size=2, buckets=BUCKETS,
                                attach_to=owner.socket_dir, batch_time_limit_s=LIMIT_S))
    try:
        other.start()
        yield owner, other
    finally:
        other.close()
        owner.close()


def test_the_attached_engine_answers_as_the_owner_does(engines: tuple[Engine, Engine]) -> None:
    owner, other = engines
    assert other.worker_pids() == owner.worker_pids()
    x = rows(0)
    assert np.array_equal(other.runners()[0](x), owner.runners()[0](x))


def test_a_replaced_worker_is_reattached(engines: tuple[Engine, Engine]) -> None:
    owner, other = engines
    (pid,) = owner.worker_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: owner.worker_pids() != [pid] and owner.alive_instances() == 1, timeout=300,
             what="the owner to replace the worker")
    x = rows(1)
    try:
        got = other.runners()[0](x)
    except WorkerDied:  # it sent before it noticed the death: that batch fails, the next one waits for the new worker
        got = other.runners()[0](x)
    assert np.array_equal(got, owner.runners()[0](x))
    wait_for(lambda: other.worker_pids() == owner.worker_pids(), what="the attached engine to follow")


def test_a_worker_hung_on_an_attached_batch_is_killed_from_there_and_replaced(engines: tuple[Engine, Engine],
                                                                              gate: WorkerGate) -> None:
    owner, other = engines
    (pid,) = owner.worker_pids()
    gate.hold()
    try:
        with pytest.raises(WorkerDied, match="exceeded the batch time limit"):
            other.runners()[0](rows(2))
    finally:
        gate.open()
    wait_for(lambda: owner.worker_pids() != [pid] and owner.alive_instances() == 1, timeout=300,
             what="the owner to replace the killed worker")
    x = rows(3)
    assert np.array_equal(other.runners()[0](x), owner.runners()[0](x))


def test_closing_an_attached_engine_leaves_the_workers_serving(engines: tuple[Engine, Engine],
                                                                tiny_model_dir: Path) -> None:
    owner, _ = engines
    assert owner.socket_dir is not None
    extra = Engine(EngineConfig(version_dir=tiny_model_dir / "1", threads_per_instance=1, max_batch_size=2,
                                buckets=BUCKETS, attach_to=owner.socket_dir, batch_time_limit_s=LIMIT_S))
    extra.start()
    pids = owner.worker_pids()
    extra.close()
    assert owner.worker_pids() == pids and owner.alive_instances() == 1
    assert owner.runners()[0](rows(4)).shape[0] == 2


def test_attaching_where_no_worker_listens_fails_with_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    from resnet_serve.server.engine import EngineError

    lonely = Engine(EngineConfig(version_dir=tiny_model_dir / "1", buckets=BUCKETS, max_batch_size=2,
                                 attach_to=tmp_path, start_timeout_s=0.2))
    with pytest.raises(EngineError, match="no worker listening at"):
        lonely.start()
