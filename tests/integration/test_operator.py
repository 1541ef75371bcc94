"""What an operator meets around the server: ports in use, where /metrics listens, its HTTP probes, the warning
when serving every interface without auth."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

import pytest
import tritonclient.grpc as tc

from tests.harness import InProcessServer, gated_workers, run_cli

WARNING_TEXT = "without authentication"


def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    try:
        with urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other program is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def assert_one_line_exit_2(r, *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0]


def test_grpc_port_in_use_is_one_line_naming_port_and_setting(tiny_model_dir: Path, busy_port: int) -> None:
    r = run_cli("resnet-serve", "--model-dir", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(busy_port),
                "--metrics-port", "0", env={"RESNET_SERVE_LOG_LEVEL": "WARNING"}, timeout=120)
    assert_one_line_exit_2(r, f"127.0.0.1:{busy_port}", "gRPC", "Address already in use", "--port")


def test_metrics_port_in_use_is_one_line_naming_port_and_setting(tiny_model_dir: Path, busy_port: int) -> None:
    r = run_cli("resnet-serve", "--model-dir", str(tiny_model_dir), "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", str(busy_port), env={"RESNET_SERVE_LOG_LEVEL": "WARNING"}, timeout=120)
    assert_one_line_exit_2(r, f"127.0.0.1:{busy_port}", "/metrics", "Address already in use", "--metrics-port")


def test_health_port_in_use_is_one_line_naming_port_and_setting(tiny_model_dir: Path, busy_port: int) -> None:
    r = run_cli("resnet-serve", "--model-dir", str(tiny_model_dir), "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "0", "--health-port", str(busy_port), env={"RESNET_SERVE_LOG_LEVEL": "WARNING"},
                timeout=120)
    assert_one_line_exit_2(r, f"127.0.0.1:{busy_port}", "health port", "Address already in use", "--health-port")


@pytest.mark.parametrize("args,needles", [
    (["--host", "10.255.255.254"], ["10.255.255.254:0", "gRPC", "Cannot assign requested address", "--host"]),
    (["--metrics-port", "70000"], ["metrics_port must be 0..65535"]),
    (["--health-port", "-2"], ["health_port must be 0..65535 (0: a free one, -1: off)"]),
    (["--port", "-5"], ["port must be 0..65535"]),
    (["--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"], ["cannot read /no/", "--tls-cert"]),
    (["--auth-token-file", "/no/tokens"], ["/no/tokens", "No such file"]),
], ids=["host not here", "metrics port out of range", "health port out of range", "negative port",
         "tls files missing", "token file missing"])
def test_other_listen_and_file_mistakes_are_one_line(tiny_model_dir: Path, args: list[str],
                                                     needles: list[str]) -> None:
    r = run_cli("resnet-serve", "--model-dir", str(tiny_model_dir), "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "-1", *args, env={"RESNET_SERVE_LOG_LEVEL": "WARNING"}, timeout=120)
    assert_one_line_exit_2(r, *needles)


def test_metrics_http_paths_and_bind_host(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    """/healthz is live from the start, /readyz follows gRPC health (503 while warm-up is held at the gate, 200
    once SERVING), /metrics is the exposition, anything else 404. The OIP repository index says LOADING, then
    READY, on the same transitions."""
    caplog.set_level(logging.WARNING)
    with gated_workers(tmp_path / "fifo") as gate:
        srv = InProcessServer(wait_ready=False, model_dir=str(tiny_model_dir), max_batch_size=2)
        try:
            port = srv.server.metrics_port
            assert http_get(port, "/healthz") == (200, "ok\n")
            assert http_get(port, "/readyz")[0] == 503
            status, text = http_get(port, "/metrics")
            assert status == 200 and "resnet_serve_requests_total" in text
            for path in ("/", "/metrics/extra", "/health", "/favicon.ico"):
                assert http_get(port, path)[0] == 404
            triton = tc.InferenceServerClient(srv.address)
            (loading,) = triton.get_model_repository_index(as_json=True)["models"]
            assert (loading["name"], loading["version"], loading["state"]) == ("tiny", "1", "LOADING")
            gate.open()
            srv.wait_ready()
            assert http_get(port, "/readyz") == (200, "ready\n")
            assert triton.get_model_repository_index(as_json=True)["models"] == [
                {"name": "tiny", "version": "1", "state": "READY"}]
            triton.close()
            assert http_get(port, "/metrics?name[]=x")[0] == 200
        finally:
            srv.close()
    assert not [r for r in caplog.records if WARNING_TEXT in r.getMessage()]


def test_metrics_listen_on_the_grpc_host_by_default(tiny_model_dir: Path) -> None:
    """Issue 13 #11: with --host 127.0.0.1 and no metrics host, /metrics is on 127.0.0.1 only (it was on every
    interface): another loopback address, 127.0.0.2, is refused."""
    srv = InProcessServer(model_dir=str(tiny_model_dir), host="127.0.0.1", max_batch_size=1, wait_ready=False)
    try:
        port = srv.server.metrics_port
        assert srv.server.metrics_host == "127.0.0.1"
        assert srv.server.health_host == "127.0.0.1" and srv.server.health_port > 0  # the health port too
        assert http_get(port, "/metrics")[0] == 200
        with pytest.raises(URLError):
            http_get(port, "/metrics", host="127.0.0.2")
        srv.wait_ready()
    finally:
        srv.close()


def test_every_interface_without_auth_warns_and_metrics_host_is_a_setting(tiny_model_dir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    srv = InProcessServer(model_dir=str(tiny_model_dir), host="0.0.0.0", metrics_host="127.0.0.1",
                          max_batch_size=1)
    try:
        assert srv.server.metrics_host == "127.0.0.1"
        assert http_get(srv.server.metrics_port, "/readyz")[0] == 200
    finally:
        srv.close()
    warnings = [r for r in caplog.records if WARNING_TEXT in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "--host 127.0.0.1" in warnings[0].getMessage() and "--auth-token-file" in warnings[0].getMessage()


def test_make_installs_once_until_pyproject_changes(tmp_path: Path) -> None:
    """Every target depends on `install`: up to date (nothing run) while the stamp is newer than every
    pyproject.toml (the root's and each part's), a reinstall once one is newer. `make -q` asks without running
    anything."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    stamp = venv / ".installed"
    stamp.write_text("")
    pyproject = max(p.stat().st_mtime for p in [root / "pyproject.toml", *root.glob("*/pyproject.toml")])

    def up_to_date() -> bool:
        r = subprocess.run(["make", "-q", "install", f"VENV={venv}"], cwd=root, capture_output=True, timeout=60)
        assert r.returncode in (0, 1), r.stderr
        return r.returncode == 0

    os.utime(stamp, (pyproject + 10, pyproject + 10))
    assert up_to_date()
    os.utime(stamp, (pyproject - 10, pyproject - 10))
    assert not up_to_date()
    dry = subprocess.run(["make", "-n", "test", f"VENV={venv}"], cwd=root, capture_output=True, text=True, timeout=60)
    assert "pip install" in dry.stdout
    os.utime(stamp, (pyproject + 10, pyproject + 10))
    dry = subprocess.run(["make", "-n", "test", f"VENV={venv}"], cwd=root, capture_output=True, text=True, timeout=60)
    assert "pip install" not in dry.stdout and "pytest" in dry.stdout


def test_project_license_is_an_spdx_expression() -> None:
    """A `license = {text = ...}` table makes setuptools print a deprecation banner on every install."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    for path in [root / "pyproject.toml", *root.glob("*/pyproject.toml")]:
        project = tomllib.loads(path.read_text())
        assert project["project"]["license"] == "Apache-2.0", path
        assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", [])), path
