"""The load generator's bookkeeping without a server: which requests count as warm-up or measured, merging
processes, load splitting, a failed stream (scripted transport). (The report's percentiles and table:
test_load_report.py; the payloads: test_payloads.py; runs against a real server: tests/integration/test_client.py
and test_oip.py.)"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from resnet_serve.client.tools import load_report, loadgen
from resnet_serve.client.tools.load_steps import MAX_BATCH, LoadConfig, Recorder, Samples, StepRunner, StreamFailed


def test_recorder_sorts_requests_by_send_time_and_answers_by_window() -> None:
    rec = Recorder(start=10.0, end=20.0)
    events = [(9.0, 10.5, None),    # warm-up request answered in the window: throughput, no latency sample
              (9.5, 9.8, None),     # warm-up entirely
              (12.0, 12.5, None),   # measured
              (15.0, 15.1, "RESOURCE_EXHAUSTED"),
              (19.9, 20.4, None)]   # measured, answered after the window: latency, not throughput
    for sent, done, code in events:
        rec.sent(sent)
        rec.done(sent, done, code)
    s = rec.s
    assert (s.warmup_requests, s.requests, s.ok_in_window) == (2, 3, 2)
    assert s.latencies_s.tolist() == pytest.approx([0.5, 0.5])
    assert s.errors == Counter({"RESOURCE_EXHAUSTED": 1}) and s.window_s == 10.0


def test_a_request_bounded_recorder_measures_exactly_its_requests() -> None:
    rec = Recorder(start=10.0, end=11.0, limit=3)
    assert rec.open(9.0) and rec.open(50.0)  # warm-up; the window is counted in requests, not seconds
    rec.sent(9.0)
    rec.done(9.0, 10.2, None)  # warm-up: not measured
    for sent, done, code in [(10.0, 30.0, None), (10.1, 10.2, "UNAVAILABLE"), (10.2, 40.0, None)]:
        assert rec.open(sent)
        rec.sent(sent)
        rec.done(sent, done, code)
    assert not rec.open(10.3)
    s = rec.s
    assert (s.warmup_requests, s.requests, s.ok_in_window, s.window_s) == (1, 3, 2, 30.0)
    assert s.errors == Counter({"UNAVAILABLE": 1}) and len(s.latencies_s) == 2


def test_merge_adds_processes_and_summary_has_the_documented_fields() -> None:
    a = Samples(window_s=2.0, warmup_requests=1, requests=10, ok_in_window=9, errors=Counter({"UNAVAILABLE": 1}))
    a.latencies_s.extend([0.001] * 9)
    b = Samples(window_s=2.0, warmup_requests=2, requests=20, ok_in_window=20)
    b.latencies_s.extend([0.003] * 20)
    m = Samples.merge([a, b])
    assert (m.warmup_requests, m.requests, m.ok_in_window, len(m.latencies_s)) == (3, 30, 29, 29)
    config = LoadConfig(target="x:1", mode="stream", concurrency=(4,))
    step = load_report.summarize(config, "concurrency", 4, m)
    assert step["concurrency"] == 4 and step["rate"] is None and step["mode"] == "stream"
    assert step["images_per_s"] == 14.5 and step["errors"] == {"UNAVAILABLE": 1} and step["duration_s"] == 2.0
    assert step["latency_ms"]["max"] == 3.0 and step["latency_ms"]["p50"] == 3.0
    table = load_report.format_table([step])
    assert "c=4" in table.splitlines()[1] and "UNAVAILABLE=1" in table


def test_load_is_split_over_processes_without_loss() -> None:
    for total, parts in [(1, 2), (16, 3), (7, 7)]:
        shares = [loadgen.split_load(total, i, parts, "concurrency") for i in range(parts)]
        assert sum(shares) == total and max(shares) - min(shares) <= 1
    assert sum(loadgen.split_load(90.0, i, 4, "rate") for i in range(4)) == pytest.approx(90.0)


def test_steps_and_validation() -> None:
    assert LoadConfig(target="x:1", concurrency=(1, 4)).steps() == [("concurrency", 1), ("concurrency", 4)]
    assert LoadConfig(target="x:1", rates=(50.0,)).steps() == [("rate", 50.0)]
    for bad in (dict(mode="bidi"), dict(input="png"), dict(concurrency=(0,)), dict(rates=(-1.0,)),
                dict(duration_s=0), dict(processes=0), dict(requests=-1), dict(batch=2),
                dict(protocol="oip", model="m", batch=0), dict(protocol="oip", model="m", batch=MAX_BATCH + 1)):
        with pytest.raises(ValueError):
            LoadConfig(target="x:1", **bad).validate()
    LoadConfig(target="x:1", protocol="oip", model="m", batch=MAX_BATCH).validate()



class ScriptedTransport:
    """A Transport answering each stream item as soon as it is sent, by a script: the first stream fails at its
    third item; the second answers its first item with an error naming no request."""

    def __init__(self) -> None:
        self.streams = 0

    async def unary(self, n: int) -> str | None:
        return None

    async def stream(self, items: AsyncIterator[int]) -> AsyncIterator[tuple[str | None, str | None]]:
        self.streams += 1
        k = 0
        async for n in items:
            k += 1
            if self.streams == 1 and k == 3:
                raise StreamFailed("UNAVAILABLE")
            yield (None, "INVALID_ARGUMENT") if self.streams == 2 and k == 1 else (str(n), None)

    async def close(self) -> None:
        pass


def test_a_failed_stream_counts_its_unanswered_items_and_is_replaced() -> None:
    """One copy of the stream accounting for every protocol: a failed stream's unanswered item is an error of
    the stream's code, a new stream carries on, an answer naming no request is put on the oldest unanswered."""
    config = LoadConfig(target="x:1", mode="stream", warmup_s=0, requests=6)
    transport = ScriptedTransport()
    runner = StepRunner(config, transport, requests=6)
    s = asyncio.run(runner.run("concurrency", 1))
    assert transport.streams == 2
    assert (s.warmup_requests, s.requests, s.ok_in_window, len(s.latencies_s)) == (0, 6, 4, 4)
    assert s.errors == Counter({"UNAVAILABLE": 1, "INVALID_ARGUMENT": 1})


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_an_open_loop_step_bounded_by_requests_sends_exactly_that_many_arrivals(mode: str) -> None:
    """Arrivals are counted by their scheduled time, so the count never depends on how fast the machine is."""
    config = LoadConfig(target="x:1", mode=mode, rates=(1000.0,), warmup_s=0, requests=7)
    transport = ScriptedTransport()
    transport.streams = 10  # past the script's failures: every item is answered OK
    s = asyncio.run(StepRunner(config, transport, requests=7).run("rate", 1000.0))
    assert (s.warmup_requests, s.requests, s.ok_in_window, len(s.latencies_s)) == (0, 7, 7, 7)


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_an_open_loop_of_n_image_requests_arrives_n_times_less_often(mode: str) -> None:
    """--rate is images/s: requests of 4 images are drawn at a quarter of it (the arrival clock is scripted)."""

    class Clock(random.Random):
        def __init__(self) -> None:
            super().__init__(0)
            self.rates: list[float] = []

        def expovariate(self, lambd: float) -> float:
            self.rates.append(lambd)
            return 0.0  # every arrival due at once: nothing waits

    config = LoadConfig(target="x:1", mode=mode, rates=(100.0,), warmup_s=0, requests=5, protocol="oip",
                        model="m", batch=4)
    transport = ScriptedTransport()
    transport.streams = 10  # past the script's failures
    runner = StepRunner(config, transport, requests=5)
    runner.rng = clock = Clock()
    s = asyncio.run(runner.run("rate", 100.0))
    assert s.requests == 5 and set(clock.rates) == {25.0}
