"""server/resnet_serve/server/simulated_engine.py: the benchmark's stand-in for a GPU (issue 17). A batch of b
takes a + c*b ms (checked through an injected sleep and clock, never by timing) and its logits are a fixed
function of its pixels, the same for uint8 NHWC pixels and for the float32 NCHW input the worker normalises."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from resnet_serve.common.imaging import Normaliser
from resnet_serve.common.modeldir import Manifest
from resnet_serve.server.predictor import build_predictor
from resnet_serve.server.predictor_config import PredictorSettings
from resnet_serve.server.simulated_engine import SPIN_TAIL_S, SimulatedPredictor, parse_cost_ms, simulated_top1

MANIFEST = Manifest(name="stand-in", version=1, architecture="none", num_classes=10, input_size=[16, 16],
                    mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


class FakeTime:
    """A clock that advances by what the predictor sleeps, by ``compute_s`` once after its first reading (the
    logits are computed then), and by ``tick_s`` at every reading (so a wait spun on it ends); the sleeps asked for."""

    def __init__(self, compute_s: float = 0.0, tick_s: float = 1e-6) -> None:
        self.now, self.sleeps, self.compute_s, self.tick_s, self.reads = 100.0, [], compute_s, tick_s, 0

    def clock(self) -> float:
        t = self.now
        self.now += self.tick_s + (self.compute_s if self.reads == 0 else 0.0)
        self.reads += 1
        return t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def run(self, predictor: SimulatedPredictor, batch: np.ndarray) -> float:
        """How long ``predictor.run(batch)`` took on this clock."""
        start = self.now
        predictor.run(batch)
        return self.now - start


def solid(*values: int) -> np.ndarray:
    return np.stack([np.full((16, 16, 3), v, np.uint8) for v in values])


def test_a_batch_of_b_takes_a_plus_c_times_b_ms_in_all_its_last_part_spun_not_slept() -> None:
    t = FakeTime()
    p = SimulatedPredictor(MANIFEST, (5.0, 0.1), sleep=t.sleep, clock=t.clock)
    for n, cost in ((1, 0.0051), (4, 0.0054), (32, 0.0082)):
        t.sleeps.clear()
        took = t.run(p, np.zeros((n, 3, 16, 16), np.float32))
        assert cost <= took <= cost + 3 * t.tick_s  # ends at the deadline, not a sleep's wake-up after it
        assert t.sleeps == pytest.approx([cost - SPIN_TAIL_S], abs=1e-5)  # the rest was spun on the clock


def test_a_wait_shorter_than_the_spun_tail_is_never_slept() -> None:
    t = FakeTime()
    took = t.run(SimulatedPredictor(MANIFEST, (SPIN_TAIL_S * 1000 / 2, 0.0), sleep=t.sleep, clock=t.clock),
                 solid(1))
    assert t.sleeps == []
    assert SPIN_TAIL_S / 2 <= took <= SPIN_TAIL_S / 2 + 3 * t.tick_s


def test_the_time_spent_on_the_logits_counts_toward_the_wait() -> None:
    t = FakeTime(compute_s=0.002)
    took = t.run(SimulatedPredictor(MANIFEST, (5.0, 0.0), sleep=t.sleep, clock=t.clock), solid(3))
    assert t.sleeps == pytest.approx([0.003 - SPIN_TAIL_S], abs=1e-5)
    assert 0.005 <= took <= 0.005 + 3 * t.tick_s
    t = FakeTime(compute_s=0.002)  # costlier than the simulated batch: no sleep, no spin, at all
    took = t.run(SimulatedPredictor(MANIFEST, (1.0, 0.0), sleep=t.sleep, clock=t.clock), solid(3))
    assert t.sleeps == []
    assert took == pytest.approx(0.002, abs=3 * t.tick_s)


def test_zero_cost_never_sleeps_nor_spins() -> None:
    t = FakeTime()
    took = t.run(SimulatedPredictor(MANIFEST, (0.0, 0.0), sleep=t.sleep, clock=t.clock), solid(1, 2))
    assert t.sleeps == []
    assert t.reads == 2 and took == pytest.approx(2 * t.tick_s)  # start, and the deadline already passed


def test_the_predictor_wakes_its_thread_within_1_ns_of_a_timer() -> None:
    """The kernel's default timer slack (50 us) is the simulator's error, not the serving path's; the worker's one
    thread gets 1 ns (prctl PR_GET_TIMERSLACK reads it back). In a thread of its own: pytest's keeps its slack."""
    slack: list[int] = []

    def make() -> None:
        SimulatedPredictor(MANIFEST, sleep=lambda s: None)
        slack.append(ctypes.CDLL(None).prctl(30, 0, 0, 0, 0))  # PR_GET_TIMERSLACK

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    assert slack == [1]


def test_logits_follow_each_images_pixels_for_both_input_types() -> None:
    p = SimulatedPredictor(MANIFEST, sleep=lambda s: None)
    pixels = solid(37, 200, 0, 9)
    by_pixels = p.run(pixels)
    n, h, w, c = pixels.shape
    by_input = p.run(Normaliser(MANIFEST.mean, MANIFEST.std)(pixels, np.empty((n, c, h, w), np.float32)))
    assert by_pixels.dtype == np.float32 and by_pixels.shape == (4, 10)
    assert by_pixels.argmax(axis=1).tolist() == [7, 0, 0, 9] == [simulated_top1(v, 10) for v in (37, 200, 0, 9)]
    np.testing.assert_array_equal(by_pixels, by_input)
    np.testing.assert_array_equal(p.run(pixels), by_pixels)  # deterministic


def test_it_has_the_interface_the_worker_uses_and_build_predictor_makes_it(tmp_path) -> None:
    """engine "simulated" dispatches before anything of Paddle: no model file is read, no plan has Config calls."""
    settings = PredictorSettings(engine="simulated", simulated_cost_ms=(2.0, 0.5))
    assert settings.plan(tmp_path, MANIFEST) == []
    p = build_predictor(tmp_path, MANIFEST, settings)
    assert isinstance(p, SimulatedPredictor) and p.cost_ms == (2.0, 0.5)
    assert (p.input_name, p.output_name, p.build_info) == ("image", "simulated_logits", {})


def test_a_bad_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="expected"):
        SimulatedPredictor(MANIFEST).run(np.zeros((1, 16, 16), np.float32))


@pytest.mark.parametrize("text", ["5", "5,0.1,2", "a,b", "", "nan,1", "-1,0", "1,-0.5"])
def test_cost_must_be_two_finite_non_negative_numbers(text: str) -> None:
    with pytest.raises(ValueError, match="simulated_cost_ms"):
        parse_cost_ms(text)
    assert parse_cost_ms("5, 0.1") == (5.0, 0.1)


def test_pixels_are_read_as_a_strided_sample_never_normalised_whole() -> None:
    """A batch of uint8 pixels costs the CPU only its sample (the whole batch normalised in numpy took longer than
    a + c*b at batch 32, so the engine could not keep its own cost curve): pixels off the sample grid change
    nothing, and pixels on it decide the class."""
    p = SimulatedPredictor(MANIFEST, sleep=lambda s: None)
    pixels = solid(40, 40)
    off_grid = pixels.copy()
    off_grid[1, 1::8, :, :] = 255  # rows 1, 9: never sampled
    np.testing.assert_array_equal(p.run(off_grid), p.run(pixels))
    on_grid = pixels.copy()
    on_grid[1, ::8, ::8, :] = 47
    assert p.run(on_grid).argmax(axis=1).tolist() == [0, 7]
