"""`--front-processes 2`: two asyncio gRPC fronts on one port (SO_REUSEPORT) sharing one worker, run as users run
the server (a subprocess). Which front a connection lands on is the kernel's choice, so each test opens
connections until every front has answered (counted in the merged /metrics), never for a time."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc
from tests.harness import WorkerGate, one_error_line, run_cli, start_subprocess_server, wait_for

MAX_CONNECTIONS = 200  # the kernel spreads connections over both fronts; this many all on one: ~2^-199
OK_SERIES = "resnet_serve_requests_total"
TOKEN = "fronts-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def request(i: int) -> pb.ClassifyRequest:
    arr = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[32, 32, 3], data=arr.tobytes()),
                              request_id=str(i), top_k=3)


def connection(port: int) -> grpc.Channel:
    """A channel with a connection of its own (not shared through gRPC's global subchannel pool)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def metrics_text(metrics_port: int) -> str:
    from urllib.request import urlopen

    return urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()


def per_front(metrics_port: int, name: str, **labels: str) -> dict[str, float]:
    """{front: value summed over the other labels} of one metric, from the first front's merged /metrics."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text(metrics_port)):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.labels["front"]] = out.get(s.labels["front"], 0.0) + s.value
    return out


def children(pid: int) -> list[int]:
    """Every child of ``pid``, whichever of its threads started it."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            out += [int(c) for c in (task / "children").read_text().split()]
    return sorted(set(out))


def runs_paddle(pid: int) -> bool:
    """The worker maps Paddle's library; a front never imports Paddle."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "paddle" in f.read()
    except OSError:
        return False


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Fronts2:
    def __init__(self, model_dir: Path, gate: WorkerGate, *args: str):
        self.proc, ports = start_subprocess_server("--model-dir", str(model_dir), "--front-processes", "2",
                                                   "--max-batch-size", "4", "--threads-per-instance", "1",
                                                   *args, env=gate.env)
        self.port, self.metrics_port = ports["port"], ports["metrics_port"]
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['health_port']}")
        health = health_pb2_grpc.HealthStub(channel)
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                 == health_pb2.HealthCheckResponse.SERVING, timeout=300, what="SERVING")
        channel.close()

    def workers(self) -> list[int]:
        return [c for c in children(self.proc.pid) if runs_paddle(c)]

    def secondaries(self) -> list[int]:
        """The other front: a spawned child of the first that serves no Paddle (the resource tracker aside)."""
        out = []
        for c in children(self.proc.pid):
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if b"spawn_main" in f.read() and not runs_paddle(c):
                    out.append(c)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(60)


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerGate]:
    g = WorkerGate(tmp_path_factory.mktemp("fronts") / "gate")
    g.open()
    yield g
    g.close()


@pytest.fixture(scope="module")
def two(tiny_model_dir: Path, gate: WorkerGate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fronts2]:
    tokens = tmp_path_factory.mktemp("fronts-auth") / "tokens"
    tokens.write_text(TOKEN + "\n")
    server = Fronts2(tiny_model_dir, gate, "--auth-token-file", str(tokens))
    yield server
    server.close()


def classify_until_both_fronts_answered(server: Fronts2, first: int) -> list[pb.ClassifyResponse]:
    """One request per new connection (health checked on it first) until both fronts have answered one more;
    every health check must say SERVING."""
    before = per_front(server.metrics_port, OK_SERIES, code="OK", method="Classify")
    answers = []
    for i in range(first, first + MAX_CONNECTIONS):
        channel = connection(server.port)
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            answers.append(pb_grpc.ClassifierStub(channel).Classify(request(i % 3), timeout=60, metadata=AUTH))
        finally:
            channel.close()
        now = per_front(server.metrics_port, OK_SERIES, code="OK", method="Classify")
        if all(now.get(f, 0) > before.get(f, 0) for f in ("0", "1")):
            assert sum(now.values()) - sum(before.values()) == len(answers)
            return answers
    raise AssertionError(f"{MAX_CONNECTIONS} connections and one front answered none: {now}")


def test_both_fronts_answer_with_the_same_results(two: Fronts2) -> None:
    answers = classify_until_both_fronts_answered(two, 0)
    reference = {}
    for a in answers:
        got = [(p.class_id, round(p.score, 6)) for p in a.predictions]
        assert reference.setdefault(a.request_id, got) == got
    assert len(answers[0].predictions) == 3


def test_metrics_merge_every_front_and_promtool_accepts_them(two: Fronts2) -> None:
    classify_until_both_fronts_answered(two, 1000)
    text = metrics_text(two.metrics_port)
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    assert {s.labels.get("front") for s in samples} == {"0", "1"}  # every sample says which front it is from
    assert set(per_front(two.metrics_port, "process_resident_memory_bytes")) == {"0", "1"}
    assert set(per_front(two.metrics_port, "resnet_serve_worker_resident_memory_bytes")) == {"0"}  # exported once
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (.ci/run installs Debian's prometheus package)")
        pytest.skip("promtool not installed")
    r = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_reload_is_refused_with_failed_precondition(two: Fronts2) -> None:
    with connection(two.port) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.AdminStub(channel).ReloadModel(pb.ReloadModelRequest(), timeout=60, metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "front_processes > 1" in e.value.details()


def test_a_second_server_on_the_same_port_is_refused_despite_so_reuseport(two: Fronts2, tiny_model_dir: Path) -> None:
    """The fronts share their port with each other, never with another server started by mistake."""
    r = run_cli("resnet-serve", "--model-dir", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(two.port),
                "--metrics-port", "-1", "--health-port", "-1", "--front-processes", "2",
                env={"RESNET_SERVE_LOG_LEVEL": "WARNING"}, timeout=300)
    line = one_error_line(r)
    assert f"cannot listen on 127.0.0.1:{two.port} for gRPC" in line and "in use" in line


def test_a_killed_worker_is_replaced_and_every_front_reattaches(two: Fronts2) -> None:
    (worker,) = two.workers()
    restarts = per_front(two.metrics_port, "resnet_serve_worker_restarts_total")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: per_front(two.metrics_port, "resnet_serve_worker_restarts_total").get("0", 0)
             > restarts.get("0", 0), timeout=300, what="the first front to restart the worker")
    wait_for(lambda: per_front(two.metrics_port, "resnet_serve_workers_alive") == {"0": 1.0, "1": 1.0},
             timeout=300, what="both fronts to see the new worker (the other front re-attaches)")
    answers = classify_until_both_fronts_answered(two, 2000)
    assert all(len(a.predictions) == 3 for a in answers)
    assert two.workers() != [worker]


def test_a_dead_secondary_front_leaves_the_port_served(tiny_model_dir: Path, gate: WorkerGate) -> None:
    server = Fronts2(tiny_model_dir, gate)
    try:
        (secondary,) = server.secondaries()
        os.kill(secondary, signal.SIGKILL)
        # Reaped by the first front: only then has every thread of it exited and its listening socket closed (a
        # killed process's main thread turns zombie while its other threads may still be exiting).
        wait_for(lambda: not Path(f"/proc/{secondary}").exists(), what="the secondary front to be reaped")
        for i in range(20):  # new connections: only the first front listens now
            with connection(server.port) as channel:
                assert pb_grpc.ClassifierStub(channel).Classify(request(i), timeout=60).request_id == str(i)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0
        assert "front process 1 (pid" in server.proc.stderr.read()
    finally:
        server.close()


def test_a_stopped_secondary_front_neither_blocks_metrics_nor_shutdown(tiny_model_dir: Path, gate: WorkerGate) -> None:
    """SIGSTOP the other front: /metrics still answers (without it, after the scrape timeout), and SIGTERM still ends
    the server (the stopped front is killed once its drain time is up): exit 0, every process gone."""
    server = Fronts2(tiny_model_dir, gate, "--grace-period-s", "1")
    try:
        (secondary,) = server.secondaries()
        workers = server.workers()
        os.kill(secondary, signal.SIGSTOP)
        fronts = {s.labels.get("front") for fam in text_string_to_metric_families(metrics_text(server.metrics_port))
                  for s in fam.samples}
        assert fronts == {"0"}
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0
        assert "front process 1 still running" in server.proc.stderr.read()
        wait_for(lambda: all(gone(pid) for pid in [secondary, *workers]), what="every process to exit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(secondary, signal.SIGCONT)
        server.close()


def test_drain_answers_everything_both_fronts_accepted(tiny_model_dir: Path, gate: WorkerGate) -> None:
    server = Fronts2(tiny_model_dir, gate, "--grace-period-s", "120")
    channels: list[grpc.Channel] = []
    try:
        gate.hold()
        accepted = []
        for i in range(MAX_CONNECTIONS):  # one call per connection until both fronts hold some
            channels.append(connection(server.port))
            accepted.append(pb_grpc.ClassifierStub(channels[-1]).Classify.future(request(i), timeout=300))
            wait_for(lambda: sum(per_front(server.metrics_port, "resnet_serve_in_flight_requests").values())
                     == len(accepted), what="the call inside a front")
            held = per_front(server.metrics_port, "resnet_serve_in_flight_requests")
            if held.get("0") and held.get("1"):
                break
        workers, secondaries = server.workers(), server.secondaries()
        server.proc.send_signal(signal.SIGTERM)
        gate.open()
        assert [f.result().request_id for f in accepted] == [str(i) for i in range(len(accepted))]
        assert server.proc.wait(120) == 0
        wait_for(lambda: all(gone(pid) for pid in workers + secondaries), what="every worker and front to exit")
    finally:
        gate.open()
        for c in channels:
            c.close()
        server.close()


def test_the_fronts_and_workers_exit_when_the_first_front_is_killed(tiny_model_dir: Path, gate: WorkerGate) -> None:
    server = Fronts2(tiny_model_dir, gate)
    try:
        others = server.workers() + server.secondaries()
        assert len(others) == 2
        server.proc.kill()
        server.proc.wait(60)
        wait_for(lambda: all(gone(pid) for pid in others), what="the worker and the other front to exit")
    finally:
        server.close()
