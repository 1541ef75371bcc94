"""`resnet-serve` as users run it (a subprocess): SIGTERM under load drains and exits 0; the demo path works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np

from resnet_serve.client.sync import ClassifierClient
from resnet_serve.export.exporter import ExportOptions, export
from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc
from tests.harness import WorkerGate, scrape, start_subprocess_server, wait_for


def request(i: int) -> pb.ClassifyRequest:
    arr = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[32, 32, 3], data=arr.tobytes()),
                              request_id=str(i))


def in_flight(metrics_port: int) -> float:
    return scrape(metrics_port)[("resnet_serve_in_flight_requests", ())]


def test_sigterm_under_load_answers_everything_accepted_and_exits_0(tiny_model_dir: Path, tmp_path: Path) -> None:
    gate = WorkerGate(tmp_path / "gate")
    gate.open()  # warm-up passes
    proc, ports = start_subprocess_server("--model-dir", str(tiny_model_dir), "--max-batch-size", "4",
                                          "--threads-per-instance", "1", "--grace-period-s", "60", env=gate.env)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['port']}")
        stub = pb_grpc.ClassifierStub(channel)
        client = ClassifierClient(f"127.0.0.1:{ports['port']}")
        client.wait_until_ready(300)
        gate.hold()
        accepted = [stub.Classify.future(request(i), timeout=120) for i in range(20)]
        wait_for(lambda: in_flight(ports["metrics_port"]) == 20, what="20 requests inside the server")
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:  # the server has begun draining: new calls are turned away
            try:
                stub.Classify(request(99), timeout=10)
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.UNAVAILABLE
            return False

        wait_for(refused, what="new requests refused with UNAVAILABLE")
        gate.open()
        assert sorted(int(f.result().request_id) for f in accepted) == list(range(20))
        assert proc.wait(timeout=120) == 0
        assert "signal received: draining" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        gate.close()


def test_demo_path_classifies_held_out_digits(trained_checkpoint: Path, tmp_path: Path) -> None:
    """What `make demo` runs after training: export -> serve -> client over the held-out digits -> SIGTERM."""
    export(ExportOptions(checkpoint=trained_checkpoint, out=tmp_path / "models" / "digits"))
    r = subprocess.run([sys.executable, "-m", "resnet_serve.client.tools.demo", "--model-dir", str(tmp_path / "models" /
                        "digits"), "--images", str(tmp_path / "holdout"), "--port", "0", "--metrics-port", "0",
                        "--min-accuracy", "0"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo: 359 held-out digit images" in r.stdout and "held-out accuracy" in r.stdout
    assert 'resnet_serve_requests_total{code="OK",method="ClassifyStream",model="digits",version="1"} 359.0' in r.stdout
    assert "exited with code 0" in r.stdout
