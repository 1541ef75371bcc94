"""The engine with the real tiny model: worker processes, shared memory, errors, death and restart.

One engine is shared by the module (spawning a worker costs seconds); tests that need their own start one.
Synchronisation uses events and joins only: no sleeps.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import pytest

from resnet_serve.server.engine import Engine, EngineConfig, EngineError, WorkerDied
from resnet_serve.server.worker_protocol import RunBatch, SharedBatch, batch_result
from tests.harness import WorkerGate

WAIT_S = 120.0  # upper bound for a restart; reached only if something is broken


class Events:
    """Collects on_worker_event calls and lets a test wait for one."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self._cond = threading.Condition()

    def __call__(self, event: str, instance: int) -> None:
        with self._cond:
            self.log.append((event, instance))
            self._cond.notify_all()

    def wait_for(self, event: str, after: int) -> None:
        """Block until `event` is logged at an index >= after."""
        with self._cond:
            assert self._cond.wait_for(lambda: any(e == event for e, _ in self.log[after:]), WAIT_S), \
                f"no {event!r} event within {WAIT_S} s: {self.log}"


class Dispatches:
    """The engine's on_dispatch: logs (instance, n) of every batch handed to a worker, then runs `action` (a test
    sets it to kill the worker holding the batch, or to learn that the batch is there)."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int]] = []
        self.action = None
        self._cond = threading.Condition()

    def __call__(self, instance: int, n: int) -> None:
        with self._cond:
            self.log.append((instance, n))
            self._cond.notify_all()
        if self.action is not None:
            self.action(instance)

    def wait_for(self, count: int) -> None:
        """Block until `count` batches have been written into a worker's slots."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.log) >= count, WAIT_S), f"{self.log} after {WAIT_S} s"


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((8, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, inputs: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Logits from the shared predictor builder in a separate process (started now, read on first use)."""
    d = tmp_path_factory.mktemp("ref")
    np.save(d / "x.npy", inputs)
    code = f"""
import numpy as np
from resnet_serve.server.predictor import build_predictor
p = build_predictor({str(tiny_model_dir / "1")!r})
x = np.load({str(d / "x.npy")!r})
out = {{str(n): p.run(x[:n]) for n in (1, 4, 8)}}
np.savez({str(d / "ref.npz")!r}, **out)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cache: dict[int, np.ndarray] = {}

    def get(n: int) -> np.ndarray:
        if not cache:
            _, err = proc.communicate(timeout=WAIT_S)
            assert proc.returncode == 0, err.decode()[-2000:]
            cache.update({int(k): v for k, v in np.load(d / "ref.npz").items()})
        return cache[n]

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def events() -> Events:
    return Events()


@pytest.fixture(scope="module")
def dispatches() -> Dispatches:
    return Dispatches()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, reference, events: Events, dispatches: Dispatches) -> Iterator[Engine]:
    eng = Engine(EngineConfig(version_dir=tiny_model_dir / "1", instances=1, threads_per_instance=2,
                              max_batch_size=8, buckets=(1, 2, 4, 8), start_timeout_s=WAIT_S),
                 on_worker_event=events, on_dispatch=dispatches)
    eng.start()
    yield eng
    eng.close()


def close_to(a: np.ndarray, ref: np.ndarray) -> bool:
    """Relative bound: random-init logits can be large, and oneDNN's rounding scales with them."""
    return a.shape == ref.shape and float(np.abs(a - ref).max()) <= 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_engine_module_does_not_import_paddle() -> None:
    code = ("import sys, resnet_serve.server.engine, resnet_serve.server.worker, resnet_serve.server.predictor, "
            "resnet_serve.server.predictor_config; "
            "print(sorted(m for m in sys.modules if m == 'paddle' or m.startswith('paddle.')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_start_reports_model_timings_and_names(engine: Engine) -> None:
    assert engine.input_shape == (3, 32, 32)
    assert engine.labels[:2] == ["digit_0", "digit_1"] and len(engine.labels) == 10
    assert engine.load_seconds > 0 and engine.warmup_seconds > 0
    assert engine.input_name == "image" and engine.output_name
    assert engine.alive_instances() == 1
    assert [r.__name__ for r in engine.runners()] == ["engine_runner_0", "engine_runner_0"]  # one per slot
    assert all(pid > 0 and pid != os.getpid() for pid in engine.worker_pids())


def test_outputs_match_a_direct_predictor_and_do_not_depend_on_the_batch(engine: Engine, reference,
                                                                         dispatches: Dispatches,
                                                                         inputs: np.ndarray) -> None:
    run = engine.runners()[0]
    start = len(dispatches.log)
    out8 = run(inputs)
    out4 = run(inputs[:4])
    singles = np.concatenate([run(inputs[i:i + 1]) for i in range(4)])
    assert out8.dtype == np.float32 and out8.shape == (8, 10)
    assert close_to(out8, reference(8))
    assert close_to(out4, reference(4))
    assert close_to(singles[:1], reference(1))
    # The same image gives the same logits whatever batch it travels in.
    assert close_to(out4, out8[:4])
    assert close_to(singles, out4)
    assert dispatches.log[start:] == [(0, 8), (0, 4), (0, 1), (0, 1), (0, 1), (0, 1)]


def test_batch_outside_buckets_or_wrong_shape_is_rejected_before_sending(engine: Engine, dispatches: Dispatches,
                                                                         inputs: np.ndarray) -> None:
    run = engine.runners()[0]
    start = len(dispatches.log)
    with pytest.raises(ValueError, match="bucket"):
        run(inputs[:3])
    with pytest.raises(ValueError, match="shape"):
        run(inputs[:2, :, :16])
    with pytest.raises(ValueError, match="bucket|shape"):
        run(inputs[0])
    with pytest.raises(ValueError, match="uint8 item 0 must have shape"):
        run([np.zeros((3, 32, 32), np.uint8)])
    assert dispatches.log[start:] == []


def test_uint8_rows_are_normalised_in_the_worker(engine: Engine) -> None:
    """Pixels travel as uint8 (4x fewer bytes, no work in the front); mixed with float rows in one batch."""
    from resnet_serve.common.imaging import normalise

    run = engine.runners()[0]
    pixels = np.random.default_rng(5).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    floats = normalise(pixels, engine.manifest.mean, engine.manifest.std)
    from_floats = run(floats)
    from_pixels = run(list(pixels))
    mixed = run([pixels[0], floats[1], pixels[2], floats[3]])
    assert close_to(from_floats, from_pixels) and close_to(from_floats, mixed)


def test_worker_side_error_raises_engine_error_and_the_worker_keeps_serving(engine: Engine,
                                                                            inputs: np.ndarray) -> None:
    pids = engine.worker_pids()
    with pytest.raises(EngineError, match="batch size 99 outside 1..8"):  # raised inside the worker's handler
        batch_result(engine.workers.call(0, lambda _shared: RunBatch(99)))
    assert engine.runners()[0](inputs[:2]).shape == (2, 10)
    assert engine.worker_pids() == pids


def test_worker_killed_while_holding_a_batch_raises_worker_died_then_restarts(
        engine: Engine, events: Events, dispatches: Dispatches, reference, inputs: np.ndarray) -> None:
    run = engine.runners()[0]
    old_pid = engine.worker_pids()[0]
    mark = len(events.log)
    # Kill the worker after the batch is committed to it and before the request leaves: deterministic.
    dispatches.action = lambda _i: os.kill(old_pid, signal.SIGKILL)
    try:
        with pytest.raises(WorkerDied):
            run(inputs[:4])
    finally:
        dispatches.action = None
    out = run(inputs[:4])  # waits for the background restart, then runs
    assert close_to(out, reference(4))
    assert engine.worker_pids()[0] != old_pid
    events.wait_for("restarted", mark)
    assert ("died", 0) in events.log[mark:]
    assert engine.alive_instances() == 1


def test_worker_killed_while_idle_is_restarted_without_failing_a_batch(engine: Engine, events: Events,
                                                                       inputs: np.ndarray) -> None:
    old_pid = engine.worker_pids()[0]
    mark = len(events.log)
    os.kill(old_pid, signal.SIGKILL)
    events.wait_for("restarted", mark)  # noticed by the watcher, not by a batch
    assert events.log[mark:] == [("died", 0), ("restarted", 0)]
    assert engine.alive_instances() == 1
    assert engine.worker_pids()[0] != old_pid
    assert engine.runners()[0](inputs[:1]).shape == (1, 10)


def test_worker_killed_during_a_run_never_hangs_the_caller(engine: Engine, events: Events, dispatches: Dispatches,
                                                           inputs: np.ndarray) -> None:
    run = engine.runners()[0]
    old_pid = engine.worker_pids()[0]
    mark = len(events.log)
    dispatched = threading.Event()
    dispatches.action = lambda _i: dispatched.set()
    result: list[object] = []

    def call() -> None:
        try:
            result.append(run(inputs))
        except WorkerDied as e:
            result.append(e)

    t = threading.Thread(target=call)
    t.start()
    try:
        assert dispatched.wait(WAIT_S)
        os.kill(old_pid, signal.SIGKILL)  # races with the batch: either outcome is allowed, a hang is not
        t.join(WAIT_S)
    finally:
        dispatches.action = None
    assert not t.is_alive()
    assert len(result) == 1
    assert isinstance(result[0], WorkerDied) or np.asarray(result[0]).shape == (8, 10)
    events.wait_for("restarted", mark)
    assert engine.runners()[0](inputs[:8]).shape == (8, 10)
    assert engine.worker_pids()[0] != old_pid


def test_load_failure_raises_engine_error_with_the_workers_message(tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    bad = tmp_path / "1"
    shutil.copytree(tiny_model_dir / "1", bad)
    (bad / "inference.json").write_text("{ not a program")
    eng = Engine(EngineConfig(version_dir=bad, threads_per_instance=1, max_batch_size=1, buckets=(1,),
                              start_timeout_s=WAIT_S))
    before = {p.pid for p in mp.active_children()}
    with pytest.raises(EngineError, match="loading"):
        eng.start()
    assert {p.pid for p in mp.active_children()} <= before
    with pytest.raises(FileNotFoundError):
        SharedMemory(name=eng.shm_names()[0])


def test_failed_restart_recovers_once_the_cause_is_gone_and_close_cleans_up(tiny_model_dir: Path,
                                                                            tmp_path: Path,
                                                                            inputs: np.ndarray) -> None:
    vdir = tmp_path / "1"
    shutil.copytree(tiny_model_dir / "1", vdir)
    with pytest.raises(ValueError, match="bucket"):
        Engine(EngineConfig(version_dir=vdir, max_batch_size=2, buckets=(1, 4)))
    events = Events()
    eng = Engine(EngineConfig(version_dir=vdir, threads_per_instance=1, max_batch_size=2, buckets=(1, 2),
                              start_timeout_s=WAIT_S), on_worker_event=events)
    eng.start()
    run = eng.runners()[0]
    assert run(inputs[:2]).shape == (2, 10)

    good = (vdir / "inference.json").read_bytes()
    (vdir / "inference.json").write_text("{ not a program")  # the restart will fail to load
    os.kill(eng.worker_pids()[0], signal.SIGKILL)
    events.wait_for("restart_failed", 0)
    assert eng.alive_instances() == 0
    with pytest.raises(WorkerDied, match="could not be restarted"):
        run(inputs[:1])  # retried once by this call, failed again
    (vdir / "inference.json").write_bytes(good)
    mark = len(events.log)
    assert run(inputs[:1]).shape == (1, 10)  # the next call's retry succeeds
    assert eng.alive_instances() == 1
    events.wait_for("restarted", mark)

    pids, shm_names = eng.worker_pids(), eng.shm_names()
    eng.close()
    eng.close()  # idempotent
    assert not {p.pid for p in mp.active_children()} & set(pids)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # exited and reaped
    for name in shm_names:
        with pytest.raises(FileNotFoundError):
            SharedMemory(name=name)
    assert eng.alive_instances() == 0
    with pytest.raises(WorkerDied, match="closed"):
        run(inputs[:1])


def test_workers_start_from_the_manifest_and_plan_the_front_hands_them(tiny_model_dir: Path, tmp_path: Path,
                                                                        inputs: np.ndarray) -> None:
    """The manifest is read once, by whoever builds the Engine, and travels to the workers with the front's plan:
    a worker started after manifest.json is gone still loads, warms and serves."""
    from resnet_serve.common.modeldir import load_manifest

    vdir = tmp_path / "1"
    shutil.copytree(tiny_model_dir / "1", vdir)
    manifest = load_manifest(vdir, verify_checksums=True)
    eng = Engine(EngineConfig(version_dir=vdir, threads_per_instance=1, max_batch_size=1, buckets=(1,),
                              start_timeout_s=WAIT_S), manifest=manifest)
    assert eng.manifest is manifest and eng.workers.spec.plan == eng.workers.spec.settings.plan(vdir, manifest)
    (vdir / "manifest.json").unlink()
    with eng:
        assert eng.runners()[0](inputs[:1]).shape == (1, 10)


# ---------------------------------------------------------------- two batches in flight per worker


class Call(threading.Thread):
    """One runner call on its own thread; `outcome` is every result or exception it ended with (exactly one)."""

    def __init__(self, run, batch: np.ndarray):
        super().__init__(daemon=True)
        self.run_batch, self.batch = run, batch
        self.outcome: list[object] = []
        self.start()

    def run(self) -> None:
        try:
            self.outcome.append(self.run_batch(self.batch))
        except Exception as e:  # noqa: BLE001 - the test asserts which
            self.outcome.append(e)

    def result(self) -> object:
        self.join(WAIT_S)
        assert not self.is_alive(), "the runner call hung"
        assert len(self.outcome) == 1, self.outcome
        return self.outcome[0]


@pytest.fixture(scope="module")
def gated(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """A one-worker engine with buckets 1 and 4 whose first worker is held by a WorkerGate (its replacements are
    not: the gate variable is set only while it starts). Its own events and dispatches."""
    gate = WorkerGate(tmp_path_factory.mktemp("gate") / "fifo")
    events, dispatches = Events(), Dispatches()
    eng = Engine(EngineConfig(version_dir=tiny_model_dir / "1", instances=1, threads_per_instance=1,
                              max_batch_size=4, buckets=(1, 4), start_timeout_s=WAIT_S),
                 on_worker_event=events, on_dispatch=dispatches)
    with pytest.MonkeyPatch.context() as mp_env:
        for k, v in gate.env.items():
            mp_env.setenv(k, v)
        gate.open()  # the warm-up runs through the gate
        eng.start()
    gate.hold()
    yield eng, gate, events, dispatches
    gate.open()
    eng.close()
    gate.close()


def test_the_next_batch_is_written_into_the_other_slot_while_one_computes(gated, reference,
                                                                          inputs: np.ndarray) -> None:
    eng, gate, _, dispatches = gated
    first_runner, second_runner = eng.runners()
    start = len(dispatches.log)
    first = Call(first_runner, inputs[:4])
    dispatches.wait_for(start + 1)  # in the worker, held at the gate: it cannot finish
    second = Call(second_runner, inputs[4:8])
    dispatches.wait_for(start + 2)
    assert first.is_alive() and not first.outcome  # the second batch was written while the first computed
    assert dispatches.log[start:] == [(0, 4), (0, 4)]
    # Both batches sit in shared memory at once, each in its own slot.
    slots = [SharedBatch(eng.layout, name) for name in eng.shm_names()]
    try:
        assert len(slots) == 2
        np.testing.assert_array_equal(slots[0].floats[:4], inputs[:4])
        np.testing.assert_array_equal(slots[1].floats[:4], inputs[4:8])
    finally:
        for shared in slots:
            shared.close()
    gate.release(2)
    a, b = first.result(), second.result()
    # Each caller gets its own batch's logits: distinct inputs, distinct answers, each the direct predictor's.
    assert close_to(a, reference(8)[:4]) and close_to(b, reference(8)[4:])
    assert not close_to(a, b)


def test_a_worker_killed_holding_two_batches_fails_both_once_then_restarts(gated, reference,
                                                                          inputs: np.ndarray) -> None:
    eng, _gate, events, dispatches = gated  # the gate stays shut: the first batch computes, the second waits
    first_runner, second_runner = eng.runners()
    old_pid, mark, start = eng.worker_pids()[0], len(events.log), len(dispatches.log)
    first = Call(first_runner, inputs[:4])
    dispatches.wait_for(start + 1)
    second = Call(second_runner, inputs[4:8])
    dispatches.wait_for(start + 2)
    os.kill(old_pid, signal.SIGKILL)
    for call in (first, second):
        assert isinstance(call.result(), WorkerDied)
    events.wait_for("restarted", mark)
    assert events.log[mark:].count(("died", 0)) == 1
    assert close_to(first_runner(inputs[:4]), reference(4))  # the replacement (not gated) serves
    assert eng.worker_pids()[0] != old_pid and eng.alive_instances() == 1


def both_outstanding(dispatches: Dispatches) -> None:
    """Hold each of two runner calls in on_dispatch (its batch written) until both are: then both are sent."""
    barrier = threading.Barrier(2, timeout=WAIT_S)
    dispatches.action = lambda _i: barrier.wait()


def test_a_stopped_worker_holding_two_batches_is_killed_at_the_time_limit_and_both_fail(
        gated, inputs: np.ndarray) -> None:
    eng, _gate, events, dispatches = gated
    runners = eng.runners()
    old_pid, mark, limit = eng.worker_pids()[0], len(events.log), eng.workers.batch_time_limit_s
    os.kill(old_pid, signal.SIGSTOP)
    eng.workers.batch_time_limit_s = 5.0  # counts from when the worker could start the batch
    both_outstanding(dispatches)
    try:
        calls = [Call(run, inputs[:1]) for run in runners]
        outcomes = [c.result() for c in calls]
    finally:
        dispatches.action = None
        eng.workers.batch_time_limit_s = limit
    assert all(isinstance(o, WorkerDied) for o in outcomes), outcomes
    messages = [str(o) for o in outcomes]  # the one computing hit the limit; the one queued behind it failed too
    assert sum("exceeded the batch time limit of 5 s" in m for m in messages) == 1, messages
    assert sum("queued" in m for m in messages) == 1, messages
    events.wait_for("restarted", mark)
    assert events.log[mark:].count(("hung", 0)) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)  # killed (SIGKILL ends a stopped process) and reaped
    assert runners[1](inputs[:1]).shape == (1, 10)


def test_close_is_bounded_while_a_stopped_worker_holds_two_batches(gated, inputs: np.ndarray) -> None:
    """Last of the module: closes the shared gated engine (its fixture's close is then a no-op)."""
    eng, _gate, _events, dispatches = gated
    runners = eng.runners()
    pid, start = eng.worker_pids()[0], len(dispatches.log)
    os.kill(pid, signal.SIGSTOP)  # the batch time limit (30 s or more) is far away
    both_outstanding(dispatches)
    try:
        calls = [Call(run, inputs[:1]) for run in runners]
        dispatches.wait_for(start + 2)
        eng.close(grace_s=0.5)
        outcomes = [c.result() for c in calls]
    finally:
        dispatches.action = None
    assert all(isinstance(o, WorkerDied) for o in outcomes), outcomes
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
