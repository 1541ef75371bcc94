"""Issue 13's hostile client, against ONE server: `resnet-serve` as users run it (a subprocess, default limits,
bearer-token auth), attacked over both APIs one attack after another.

Each attack is a function in ATTACKS: it builds its payloads first (serialised here, so the client's own work
is done before the clock runs) and returns the `fire` step, which sends them and asserts the answers. While
`fire` runs, other processes check health again and again, on the dedicated health port (what orchestrators
probe) and on the main port (answered by the event loop: a stall of the loop shows up there). Every check must
answer within 100 ms, plus whatever the machine itself adds at that moment: the slowest check of an unattacked
reference health server (a process of its own, probed the same way at the same time; 0-5 ms on a quiet machine,
hundreds of ms on a 2-core machine loaded with busy loops, where no process answers within 100 ms). An attack
over budget runs once more and must pass then (see test_attack). One attack has a documented larger budget on
the main port, never on the health port (see decode_backlog). After every attack:
the server is SERVING, the RSS of its front and worker processes grew by less than 100 MB over the module, and a
normal request answers exactly as before.

To add an attack, append a function to ATTACKS.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.grpc import service_pb2 as oip

from resnet_serve.protos import classifier_pb2 as pb
from tests.harness import scrape, start_subprocess_server, wait_for

TOKEN = "hostile-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
HEALTH_BUDGET_S = 0.1
RSS_BUDGET = 100 * 1024 * 1024
CLASSIFY = "/classifier.v1.Classifier/Classify"
CLASSIFY_STREAM = "/classifier.v1.Classifier/ClassifyStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MB = 1024 * 1024


@dataclass
class Target:
    """The server under attack and what the attacks need to reach it."""

    proc: subprocess.Popen
    address: str
    channel: grpc.Channel
    log_lines: list[str] = field(default_factory=list)  # the server's stderr, line by line
    metrics_port: int = 0
    health_address: str = ""  # the dedicated health port (--health-port)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`, from the server's /metrics."""
        return sum(v for (n, ls), v in scrape(self.metrics_port).items()
                   if n == name and labels.items() <= dict(ls).items())

    def unary(self, method: str) -> Callable:
        """A raw-bytes unary callable: payloads are serialised before the attack runs."""
        return self.channel.unary_unary(method)

    def code_of(self, method: str, payload: bytes, metadata=AUTH) -> tuple[grpc.StatusCode, str]:
        try:
            self.unary(method)(payload, metadata=metadata, timeout=60)
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def normal_request() -> bytes:
    arr = np.random.default_rng(7).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    return pb.ClassifyRequest(encoded=encode(arr), request_id="normal").SerializeToString()


def classify(target: Target) -> pb.ClassifyResponse:
    return pb.ClassifyResponse.FromString(target.unary(CLASSIFY)(normal_request(), metadata=AUTH, timeout=60))


def health_status(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


# --- the server --------------------------------------------------------------------------------------------------
@dataclass
class Baseline:
    rss: int
    answer: pb.ClassifyResponse


@pytest.fixture(scope="module")
def target(tiny_model_dir: Path):
    proc, ports = start_subprocess_server("--model-dir", str(tiny_model_dir), "--threads-per-instance", "1",
                                          env={"RESNET_SERVE_AUTH_TOKENS": TOKEN})
    lines: list[str] = []

    def read(stream) -> None:  # drained, or the server would block on a full pipe
        for line in iter(stream.readline, ""):
            lines.append(line)

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in (proc.stderr, proc.stdout)]
    for r in readers:
        r.start()
    address = f"127.0.0.1:{ports['port']}"
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * MB)])
    try:
        wait_for(lambda: _serving(channel), timeout=300, what="the server SERVING")
        yield Target(proc, address, channel, lines, ports["metrics_port"], f"127.0.0.1:{ports['health_port']}")
    finally:
        channel.close()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serving(channel: grpc.Channel) -> bool:
    try:
        return health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@pytest.fixture(scope="module")
def baseline(target: Target) -> Baseline:
    """Taken after a few normal requests of each kind, so lazily created state is not counted as growth."""
    for _ in range(5):
        answer = classify(target)
        target.unary(MODEL_INFER)(_infer(b"", "encoded", "BYTES", [1, 1], encoded=[_png()]), metadata=AUTH,
                                  timeout=60)
    return Baseline(rss_bytes(target.proc.pid), answer)


# --- payload helpers ---------------------------------------------------------------------------------------------
def _png(h: int = 40, w: int = 48) -> bytes:
    return encode(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _infer(raw: bytes, name: str, datatype: str, shape: list[int], encoded: list[bytes] | None = None,
           **fields) -> bytes:
    r = oip.ModelInferRequest(model_name="tiny", **fields)
    t = r.inputs.add(name=name, datatype=datatype, shape=shape)
    if encoded is not None:
        t.contents.bytes_contents.extend(encoded)
    elif raw:
        r.raw_input_contents.append(raw)
    return r.SerializeToString()


def expect(target: Target, method: str, payload: bytes, code: grpc.StatusCode, text: str = "",
           metadata=AUTH) -> None:
    got, details = target.code_of(method, payload, metadata)
    assert got == code and text in details and len(details) < 1000, (method, got, details[:300])


# --- the attacks (issue 13; each returns its fire step) ----------------------------------------------------------
def extreme_aspect_ratios(target: Target) -> Callable[[], None]:
    """Defect 1: a 955-byte 1x300000 PNG and a 12 MB uint8 [1, 4000000, 3] tensor, over both APIs."""
    strip = encode(np.zeros((1, 300_000, 3), np.uint8))
    v1_png = pb.ClassifyRequest(encoded=strip).SerializeToString()
    v1_raw = pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[1, 4_000_000, 3],
                                                 data=bytes(12_000_000))).SerializeToString()
    oip_raw = _infer(bytes(12_000_000), "uint8_hwc", "UINT8", [1, 1, 4_000_000, 3])

    def fire() -> None:
        for _ in range(3):
            expect(target, CLASSIFY, v1_png, grpc.StatusCode.INVALID_ARGUMENT, "aspect ratio")
        expect(target, CLASSIFY, v1_raw, grpc.StatusCode.INVALID_ARGUMENT, "aspect ratio")
        expect(target, MODEL_INFER, oip_raw, grpc.StatusCode.INVALID_ARGUMENT, "aspect ratio")

    return fire


def millions_of_elements(target: Target) -> Callable[[], None]:
    """Defect 3: ~16 MB requests that are millions of tiny elements, each once stalling the loop for seconds."""
    raw_bytes = _infer(bytes(16_000_000), "encoded", "BYTES", [1, 1])  # 4M zero-length elements
    r = oip.ModelInferRequest(model_name="tiny")
    r.inputs.add(name="uint8_hwc", datatype="UINT8", shape=[1, 1, 1, 3]).contents.uint_contents.extend(
        np.zeros(4_000_000, np.uint32).tolist())
    uint_contents = r.SerializeToString()
    r = oip.ModelInferRequest(model_name="tiny")
    r.inputs.add(name="encoded", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.extend([b""] * 4_000_000)
    bytes_contents = r.SerializeToString()
    v1_shape = pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8,
                                                   shape=[1] * 15_000_000)).SerializeToString()

    def fire() -> None:
        for method, payload in ((MODEL_INFER, raw_bytes), (MODEL_INFER, uint_contents),
                                (MODEL_INFER, bytes_contents), (CLASSIFY, v1_shape)):
            expect(target, method, payload, grpc.StatusCode.INVALID_ARGUMENT)

    return fire


def decode_backlog(target: Target) -> Callable[[], None]:
    """Defect 8: 40 concurrent 8 MB images, and a 38 KB PNG that decodes to 40 Mpx; each answered OK or refused
    at once, never queued outside the limits."""
    noise = np.random.default_rng(2).integers(0, 256, (1600, 1700, 3), dtype=np.uint8)
    big = pb.ClassifyRequest(encoded=encode(noise)).SerializeToString()
    assert len(big) > 8 * 1000 * 1000
    bomb = pb.ClassifyRequest(encoded=encode(np.zeros((6300, 6300), np.uint8))).SerializeToString()

    def fire() -> None:
        futures = [target.unary(CLASSIFY).future(big, metadata=AUTH, timeout=120) for _ in range(40)]
        expect(target, CLASSIFY, bomb, grpc.StatusCode.INVALID_ARGUMENT, "over the limit")
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes

    return fire


# The main port's health, during this attack only, gets a larger budget; the dedicated health port keeps 100 ms.
# While 320 MB arrive at once, main-port health checks wait behind the burst's message callbacks (grpc.aio turns
# each message into Python bytes on the event loop, ~10 ms per 8 MB, and an admitted one is copied twice more:
# parse, field access) and for CPU taken by gRPC's receiving threads and the decode threads; asyncio's debug mode
# reports no callback over 100 ms. That work is grpc.aio's, on the one loop that also answers the main port's
# health: no admission check can run before it, and its time scales with the CPU share the front gets. Measured
# on the shared 2-core test machine: 150-470 ms (load 1.4); 0.6-1.6 s with two busy-loop processes beside the test
# suite (load 4), while the reference server (test_attack) stayed under 35 ms: the delay is CPU work, not
# scheduling noise. Orchestrators therefore probe the health port (server/resnet_serve/server/health_port.py),
# answered by threads of its own; the main port's budget here only catches a loop that stops for good.
decode_backlog.main_port_health_budget_s = 5.0  # type: ignore[attr-defined]


def bad_oip_parameters(target: Target) -> Callable[[], None]:
    """Defect 9: integers that are not ASCII integers."""
    payloads = []
    for name, value in (("top_k", "--3"), ("top_k", "²"), ("timeout", "--1")):
        r = oip.ModelInferRequest.FromString(_infer(b"", "encoded", "BYTES", [1, 1], encoded=[_png()]))
        r.parameters[name].string_param = value
        payloads.append(r.SerializeToString())

    def fire() -> None:
        for p in payloads:
            expect(target, MODEL_INFER, p, grpc.StatusCode.INVALID_ARGUMENT, "must be an integer")

    return fire


def echoed_client_text(target: Target) -> Callable[[], None]:
    """Defect 10: a 100,000-dimension shape, a 100,000-character id, a 20,000-character model name, and a
    request_id that would make the answer 5 MB (on a unary call, and mid-stream)."""
    shape = pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8,
                                                shape=list(range(1, 100_001)))).SerializeToString()
    long_id = _infer(b"", "encoded", "BYTES", [1, 1], encoded=[_png()], id="é" * 100_000)
    long_name = oip.ModelInferRequest.FromString(_infer(b"", "encoded", "BYTES", [1, 1], encoded=[_png()]))
    long_name.model_name = "m" * 20_000
    huge_id = pb.ClassifyRequest(encoded=_png(), request_id="i" * (5 * MB)).SerializeToString()
    ok = [pb.ClassifyRequest(encoded=_png(), request_id=str(i)).SerializeToString() for i in range(2)]

    def fire() -> None:
        expect(target, CLASSIFY, shape, grpc.StatusCode.INVALID_ARGUMENT)
        expect(target, MODEL_INFER, long_id, grpc.StatusCode.INVALID_ARGUMENT, "request id is 100000 characters")
        expect(target, MODEL_INFER, long_name.SerializeToString(), grpc.StatusCode.NOT_FOUND)
        expect(target, CLASSIFY, huge_id, grpc.StatusCode.INVALID_ARGUMENT, "request id is")
        stream = target.channel.stream_stream(CLASSIFY_STREAM)
        answers = [pb.ClassifyResponse.FromString(a)
                   for a in stream(iter([ok[0], huge_id, ok[1]]), metadata=AUTH, timeout=60)]
        assert sorted((a.request_id, a.error.code) for a in answers) == [
            ("", grpc.StatusCode.INVALID_ARGUMENT.value[0]), ("0", 0), ("1", 0)]

    return fire


def garbage_flood(target: Target) -> Callable[[], None]:
    """Defect 12: 200 non-protobuf requests without a token and 200 with one, over several methods: refused
    before parsing or INVALID_ARGUMENT, and a few log lines in all (once a 7-line traceback each)."""
    garbage = b"\xff\xff\xff\xff not a protobuf"
    methods = [CLASSIFY, "/classifier.v1.Classifier/GetModelInfo", MODEL_INFER,
               "/inference.GRPCInferenceService/ModelMetadata"]

    def fire() -> None:
        logged = len(target.log_lines)
        for i in range(200):
            expect(target, methods[i % 4], garbage, grpc.StatusCode.UNAUTHENTICATED, metadata=())
            expect(target, methods[i % 4], garbage, grpc.StatusCode.INVALID_ARGUMENT, "not a valid protobuf")
        assert len(target.log_lines) - logged <= 3, target.log_lines[logged:logged + 20]
        # An image that is garbage after its PNG signature: the error names no memory address (defect 13).
        corrupt = pb.ClassifyRequest(encoded=b"\x89PNG\r\n\x1a\n" + bytes(64)).SerializeToString()
        code, details = target.code_of(CLASSIFY, corrupt)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "cannot decode PNG" in details and "0x" not in details

    return fire


def stream_that_never_reads(target: Target) -> Callable[[], None]:
    """Defect 2: a ClassifyStream client sends 2,000 items and reads no answer. The server holds at most
    --max-stream-in-flight (128) of them, unsent answers included, then stops reading (HTTP/2 flow control holds
    the client): seen on /metrics as 128 items held while far fewer than 2,000 were answered. Once the client
    reads, every item is answered exactly once (each is a bad tensor, answered in-stream; the stream goes on)."""
    items, window = 2000, 128
    bad = pb.ClassifyRequest(request_id="x" * 1000, tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[32, 32, 3],
                                                                      data=b"\0" * 3000)).SerializeToString()

    def requests():
        for _ in range(items):
            yield bad

    def fire() -> None:
        def answered() -> float:
            return target.metric("resnet_serve_requests_total", method="ClassifyStream")

        before = answered()
        # A fixed 64 KB receive window on this client: its transport fills after some 60 answers.
        with grpc.insecure_channel(target.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            call = channel.stream_stream(CLASSIFY_STREAM)(requests(), metadata=AUTH, timeout=300)
            try:
                held = 0.0
                for _ in range(1200):  # polled gently (a scrape takes the server's GIL): up to about 60 s
                    if (held := target.metric("resnet_serve_stream_items_held")) == window:
                        break
                    time.sleep(0.05)
                assert held == window, f"the server holds {held} stream items, not a full window of {window}"
                assert answered() - before < items // 2  # it stopped reading
                answers = [pb.ClassifyResponse.FromString(r) for r in call]
            finally:
                call.cancel()
        assert len(answers) == items
        assert {a.error.code for a in answers} == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
        assert target.metric("resnet_serve_stream_items_held") == 0  # every answer sent: nothing held

    return fire


ATTACKS: list[Callable[[Target], Callable[[], None]]] = [
    extreme_aspect_ratios, millions_of_elements, decode_backlog, bad_oip_parameters, echoed_client_text,
    garbage_flood, stream_that_never_reads,
]


# --- the tests ---------------------------------------------------------------------------------------------------
REFERENCE = """
import sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(4))
servicer = health.HealthServicer()
servicer.set("", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def reference() -> Iterator[str]:
    """An unattacked health server in a process of its own: its slowest check during an attack is what the machine
    (CPU contention, scheduling) added at that moment, which no server could have avoided."""
    proc = subprocess.Popen([sys.executable, "-c", REFERENCE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        yield f"127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.communicate("", timeout=60)


PROBE = """
import sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
with grpc.insecure_channel(sys.argv[1]) as channel:
    check = health_pb2_grpc.HealthStub(channel).Check
    check(health_pb2.HealthCheckRequest(), timeout=30)
    print("ready", flush=True)
    while not stop.is_set():
        t0 = time.perf_counter()
        check(health_pb2.HealthCheckRequest(), timeout=30)
        print(time.perf_counter() - t0, flush=True)
        stop.wait(0.005)
"""


SPEED = """
import sys, threading, time
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
while not stop.is_set():
    wall, cpu = time.perf_counter(), time.thread_time()
    while time.thread_time() - cpu < 0.005:
        pass
    print((time.perf_counter() - wall) / (time.thread_time() - cpu), flush=True)
    stop.wait(0.045)
"""


@dataclass
class Probes:
    """What the probers saw during one attack."""

    latencies: dict[str, list[float]]  # address -> every health check's seconds
    slowdown: float  # how much longer than its CPU time a fixed CPU-bound step took meanwhile (median; 1.0 idle)


def probed(addresses: list[str], fire: Callable[[], None]) -> Probes:
    """Run `fire` while health is checked again and again, back to back, at each address, each from a process of
    its own (so the latency is the server's, not this process's: building and sending 8 MB messages holds this
    process's GIL), and while another process gauges the machine's speed: 5 ms of CPU work every 50 ms, timed."""
    procs = {a: subprocess.Popen([sys.executable, "-c", PROBE, a], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True) for a in addresses}
    procs["speed"] = subprocess.Popen([sys.executable, "-c", SPEED], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True)
    outs: dict[str, str] = {}
    try:
        for proc in procs.values():
            assert proc.stdout.readline().strip() == "ready"
        fire()
    finally:
        for a, proc in procs.items():
            outs[a], _ = proc.communicate("", timeout=60)
    failed = {a: p.returncode for a, p in procs.items() if p.returncode != 0}
    assert not failed, f"a health check failed or timed out (30 s) during the attack: {failed}"
    ratios = [float(line) for line in outs.pop("speed").split()]
    return Probes({a: [float(line) for line in out.split()] for a, out in outs.items()},
                  max(1.0, statistics.median(ratios)) if ratios else 1.0)


def over_budget(probes: Probes, budgets: dict[str, float], reference: str) -> dict[str, str]:
    """The addresses whose slowest check reached their budget, with what each took. A budget is CPU work the
    server may do before answering, so it stretches with the machine's slowdown at that moment (1.0 when idle:
    the budget itself); to it is added the reference server's slowest check of the same moment, the delay any
    process saw then."""
    noise = max(probes.latencies[reference], default=0.0)
    return {a: f"{max(ls) * 1000:.0f} ms of {len(ls)} checks (budget {budgets[a] * 1000:.0f} ms x slowdown "
               f"{probes.slowdown:.2f} + reference {noise * 1000:.0f} ms)"
            for a, ls in probes.latencies.items()
            if a in budgets and max(ls, default=0) >= budgets[a] * probes.slowdown + noise}


def test_a_budget_stretches_with_the_machines_slowdown_and_the_reference_servers_delay_only() -> None:
    """over_budget is what the attacks are judged by: on an idle machine (slowdown 1, reference ~0), 100 ms."""
    budgets = {"health": 0.1}
    assert over_budget(Probes({"health": [0.05, 0.099], "ref": []}, 1.0), budgets, "ref") == {}
    assert list(over_budget(Probes({"health": [0.101], "ref": []}, 1.0), budgets, "ref")) == ["health"]
    assert over_budget(Probes({"health": [0.05, 0.12], "ref": [0.001, 0.03]}, 1.0), budgets, "ref") == {}
    assert list(over_budget(Probes({"health": [0.2], "ref": [0.03]}, 1.0), budgets, "ref")) == ["health"]
    assert over_budget(Probes({"health": [0.2], "ref": [0.03]}, 2.0), budgets, "ref") == {}
    assert list(over_budget(Probes({"health": [0.25], "ref": [0.03]}, 2.0), budgets, "ref")) == ["health"]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.__name__ for a in ATTACKS])
def test_attack(target: Target, baseline: Baseline, reference: str, attack) -> None:
    fire = attack(target)
    budgets = {target.health_address: HEALTH_BUDGET_S,  # the health port: 100 ms, whatever the attack
               target.address: getattr(attack, "main_port_health_budget_s", HEALTH_BUDGET_S)}
    probes = probed([*budgets, reference], fire)
    first = over_budget(probes, budgets, reference)
    if first:
        # Once more: a stall the attack causes comes back every time, one scheduling hiccup of this shared
        # 2-core machine does not (seen at load 5: one probe of 600 ms in an otherwise quiet run).
        probes = probed([*budgets, reference], fire)
        assert not over_budget(probes, budgets, reference), \
            f"slowest health checks {first}, then {over_budget(probes, budgets, reference)} (budgets {budgets})"
    assert all(probes.latencies.values()), f"no health check ran during the attack: {probes.latencies}"
    assert health_status(target.channel) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(target.health_address) as health_port:
        assert health_status(health_port) == health_pb2.HealthCheckResponse.SERVING


def test_after_every_attack_the_server_is_whole(target: Target, baseline: Baseline) -> None:
    assert target.proc.poll() is None
    assert health_status(target.channel) == health_pb2.HealthCheckResponse.SERVING
    answer = classify(target)
    assert answer == baseline.answer
    # Memory at rest: the server collects and returns what a burst freed within a second or two of its end
    # (server/resnet_serve/server/memory.py), so this waits for that, boundedly.
    grew = []
    try:
        wait_for(lambda: grew.append(rss_bytes(target.proc.pid) - baseline.rss) or grew[-1] < RSS_BUDGET,
                 timeout=30, what="the server's RSS back within budget")
    except AssertionError:
        raise AssertionError(f"RSS of the server and its workers grew {grew[-1] / MB:.0f} MB") from None
