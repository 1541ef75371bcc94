"""Test harness: a real server (in this process, its own event loop thread, or as a subprocess) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from resnet_serve.protos import classifier_pb2_grpc as pb_grpc
from resnet_serve.server.app import Server
from resnet_serve.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TINY_INPUT = 32
TINY_CLASSES = 10


def make_tiny_model_dir(out: Path, version: int = 1, seed: int = 0, fmt: str = "pir", pixels: bool = False) -> Path:
    """Export a random-weight ResNet-18 (10 classes, 32x32) into out/<version> in a subprocess.

    Default: a folder as exports before manifest schema 2 wrote them (float32 NCHW program, no `input_format` in
    its manifest), so every server test also proves that older folders still serve. ``pixels``: what resnet-export
    writes now (resnet_serve.export.exporter.save_programs: a uint8 NHWC program that normalises in the graph and a
    float program over the same parameters); the same ``seed`` gives the same weights either way.

    A subprocess keeps Paddle (and its SIGTERM handler) out of the test process where that matters,
    and lets FLAGS_enable_pir_api be chosen per format.
    """
    code = f"""
import json, time
from pathlib import Path
import paddle
from paddle.vision.models import resnet18
from resnet_serve.common.modeldir import Manifest, sha256_file
paddle.seed({seed})
m = resnet18(num_classes={TINY_CLASSES}); m.eval()
d = Path({str(out)!r}) / "{version}"; d.mkdir(parents=True, exist_ok=True)
mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
extra = {{}}
if {pixels}:
    from resnet_serve.export.exporter import save_programs
    model_file, float_model_file = save_programs(m, d, {TINY_INPUT}, mean, std, "{fmt}")
    extra = dict(input_format="uint8_nhwc", float_model_file=float_model_file)
else:
    spec = [paddle.static.InputSpec([None, 3, {TINY_INPUT}, {TINY_INPUT}], "float32", "image")]
    paddle.jit.save(paddle.jit.to_static(m, input_spec=spec, full_graph=True), str(d / "inference"))
    model_file = "inference.json" if (d / "inference.json").exists() else "inference.pdmodel"
(d / "labels.txt").write_text("\\n".join(f"digit_{{i}}" for i in range({TINY_CLASSES})) + "\\n")
man = Manifest(name="tiny", version={version}, architecture="resnet18", num_classes={TINY_CLASSES},
               input_size=[{TINY_INPUT}, {TINY_INPUT}], mean=mean, std=std, format="{fmt}", model_file=model_file,
               **extra)
man.files = {{p.name: sha256_file(p) for p in d.iterdir()}}
data = json.loads(man.to_json())
if not {pixels}:  # the manifest of an export made before schema 2
    del data["input_format"], data["float_model_file"]
    data["schema_version"] = 1
(d / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\\n")
"""
    env = dict(os.environ)
    if fmt == "legacy":
        env["FLAGS_enable_pir_api"] = "0"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return out


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the project's console commands as a user would, capturing its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([str(Path(sys.executable).parent / args[0]), *args[1:]], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """A user's mistake as every command reports it: exit 2, one `error:` line on stderr, no traceback."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]



def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Wait for a state change we cannot be notified of (another thread's or process's state); bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def scrape(metrics_port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a server's /metrics by (name, sorted labels), parsed with prometheus_client's own parser."""
    from urllib.request import urlopen

    text = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


class InProcessServer:
    """The real Server on 127.0.0.1, driven from a background event loop so tests can use blocking clients and
    still reach the server's parts (the batches handed to workers, batcher) directly."""

    def __init__(self, wait_ready: bool = True, wrap_runner=None, **settings):
        self.wrap_runner = wrap_runner
        # (instance, batch size) of every batch handed to a worker, through the Engine's on_dispatch (any version).
        self.call_log: list[tuple[int, int]] = []
        self.settings = Settings(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "health_port": 0,
                                     **settings})
        self.settings.validate()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Server = self.call(self._make())
        self.call(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        self.call(self.server.ready.wait(), timeout=300)
        if self.server.failed:
            raise RuntimeError(f"server failed to start: {self.server.failed}")

    async def _make(self) -> Server:
        return Server(self.settings, wrap_runner=self.wrap_runner,
                      on_dispatch=lambda i, n: self.call_log.append((i, n)))

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def engine(self):
        return self.server.engine

    def metrics(self) -> dict[tuple[str, tuple], float]:
        return scrape(self.server.metrics_port)

    def task_count(self) -> int:
        """asyncio tasks alive on the server's loop (leak checks)."""

        async def count() -> int:
            return len(asyncio.all_tasks())

        return self.call(count())

    def close(self) -> None:
        self.channel.close()
        try:
            self.call(self.server.stop(5), timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class WorkerGate:
    """Holds every batch inside the worker process until released: a FIFO the worker reads one byte from
    before each run (RESNET_SERVE_TEST_WORKER_GATE). Deterministic 'a batch is computing' without sleeps."""

    def __init__(self, path: Path):
        self.path = Path(path)
        os.mkfifo(self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)  # keeps the FIFO open for writing

    @property
    def env(self) -> dict[str, str]:
        return {"RESNET_SERVE_TEST_WORKER_GATE": str(self.path)}

    def release(self, n: int = 1) -> None:
        """Let n more batches finish."""
        os.write(self._fd, b"x" * n)

    def open(self) -> None:
        """Let every batch through until hold()."""
        self.release(4096)

    def hold(self) -> None:
        """Take back the tokens nobody used: from now on batches wait again."""
        try:
            while os.read(self._fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._fd)


@contextlib.contextmanager
def gated_workers(fifo: Path) -> Iterator[WorkerGate]:
    """A WorkerGate whose variable is set for every worker process spawned while the context is open."""
    import pytest

    gate = WorkerGate(fifo)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in gate.env.items():
                mp.setenv(k, v)
            yield gate
    finally:
        gate.close()


def start_subprocess_server(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """`resnet-serve ...` as users run it; returns the process and its 'listening' event (ports)."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "resnet-serve"), "--host", "127.0.0.1",
                             "--port", "0", "--metrics-port", "0", "--health-port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"server exited: {proc.stderr.read()}")
    return proc, json.loads(line)
