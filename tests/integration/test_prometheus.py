"""A real Prometheus (Debian's `prometheus` package) scrapes a real server on loopback; the tests read the answers
back through Prometheus's HTTP API, run every PromQL expression of the Grafana dashboard, and lint the exposition
and the shipped scrape config with `promtool`. Without the binaries these tests skip, except under CI (CI set),
where they fail: .ci/run installs the package."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urlencode
from urllib.request import urlopen

import grpc
import numpy as np
import pytest

from resnet_serve.protos import classifier_pb2 as pb
from tests.harness import InProcessServer, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/resnet-serve.json"
SCRAPE_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
SIZE = 32
# What Grafana substitutes for its built-in interval variables; the window covers the whole test run.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1m"}
# The dashboard's variables, set to "All" (Grafana's allValue), or bound to one server (bound_variables()).
DASHBOARD_VARIABLES = {"$job": ".*", "$instance": ".*", "$model": ".*"}


def binary(name: str) -> str:
    """The binary's path; skip without it, unless under CI where its absence is a failure."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"`{name}` not found but CI is set: .ci/run must install Debian's prometheus package")
    pytest.skip(f"`{name}` not installed (apt-get install prometheus); set CI to make this a failure")


def job_name() -> str:
    """The scrape job of deploy/prometheus/prometheus.yml: the dashboard filters process metrics by it."""
    return re.search(r"job_name:\s*\"?([\w-]+)", SCRAPE_CONFIG.read_text()).group(1)


def dashboard_expressions(bound: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows included, Grafana's interval variables and the
    dashboard's own ($job, $instance, $model: each a regex, as Grafana formats them) substituted."""
    def panels(items: list[dict]) -> Iterator[dict]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    out = []
    for p in panels(json.loads(DASHBOARD.read_text())["panels"]):
        for t in p.get("targets", []):
            expr = t["expr"]
            for var, value in {**GRAFANA_VARIABLES, **(DASHBOARD_VARIABLES if bound is None else bound)}.items():
                expr = expr.replace(var, value)
            assert bound == {} or "$" not in expr, f"unknown Grafana variable in {p['title']!r}: {t['expr']}"
            out.append((p["title"], expr))
    return out


def uint8(i: int) -> pb.ClassifyRequest:
    arr = np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE, 3], data=arr.tobytes()),
                              request_id=str(i))


INVALID = [pb.ClassifyRequest(), pb.ClassifyRequest(encoded=b"not an image"),
           pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=[3, 8, 8], data=b""))]


class Prometheus:
    """A Prometheus process on a free loopback port, with its own config and storage under a temp dir."""

    def __init__(self, exe: str, workdir: Path, targets: list[str], job: str):
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": job, "scrape_interval": "1s", "scrape_timeout": "1s",
                                      "static_configs": [{"targets": targets}]}]}
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = workdir / "prometheus.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [exe, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        wait_for(self._ready, timeout=30, what="Prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log.read_text()}")
        try:
            return urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict]:
        """Instant query; the result vector. A PromQL error fails the test with Prometheus's message."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?{urlencode({'query': expr})}"
        try:
            body = json.loads(urlopen(url, timeout=10).read())
        except HTTPError as e:
            body = json.loads(e.read())
        assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]["result"]

    def poll(self, expr: str, accept, what: str, timeout: float = 30) -> list[dict]:
        """Query until accept(result); Prometheus sees new data only at its next scrape."""
        box: list[list[dict]] = [[]]

        def check() -> bool:
            box[0] = self.query(expr)
            return accept(box[0])

        try:
            wait_for(check, timeout=timeout, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e} (last answer to {expr}: {box[0]})") from None
        return box[0]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path) -> Iterator[InProcessServer]:
    """A server with one answered and one refused request before Prometheus first scrapes it, so every
    histogram series has a sample from before the test traffic and rate() over the window is positive."""
    s = InProcessServer(model_dir=str(tiny_model_dir), max_batch_size=8, max_queue_delay_us=2000,
                        threads_per_instance=1)
    s.stub.Classify(uint8(0), timeout=30)
    with pytest.raises(grpc.RpcError):
        s.stub.Classify(INVALID[0], timeout=30)
    yield s
    s.close()


@pytest.fixture(scope="module")
def prom(srv: InProcessServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    p = Prometheus(binary("prometheus"), tmp_path_factory.mktemp("prometheus"),
                   [f"127.0.0.1:{srv.server.metrics_port}"], job_name())
    try:
        p.poll(f'up{{job="{job_name()}"}} == 1 and on (instance) resnet_serve_request_duration_seconds_count',
               bool, "a first scrape of the server")
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def traffic(srv: InProcessServer, prom: Prometheus) -> dict[tuple[str, str], int]:
    """Concurrent unary calls (so batches form), invalid input, a stream with bad items, model info.
    Returns the expected request counts by (method, code), the requests sent before Prometheus included."""
    futures = [srv.stub.Classify.future(uint8(i), timeout=60) for i in range(24)]
    assert [f.result().request_id for f in futures] == [str(i) for i in range(24)]
    for r in INVALID:
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Classify(r, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    items = [uint8(100 + i) for i in range(10)] + INVALID[1:]
    answers = list(srv.stub.ClassifyStream(iter(items), timeout=60))
    assert sum(a.HasField("error") for a in answers) == 2 and len(answers) == 12
    for _ in range(2):
        srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    return {("Classify", "OK"): 1 + 24, ("Classify", "INVALID_ARGUMENT"): 1 + len(INVALID),
            ("ClassifyStream", "OK"): 10, ("ClassifyStream", "INVALID_ARGUMENT"): 2, ("GetModelInfo", "OK"): 2,
            ("ModelInfer", "OK"): 0, ("ModelStreamInfer", "OK"): 0}  # every method's OK series exists from the start


def by_labels(result: list[dict], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1]) for r in result}


# ---- tests ----------------------------------------------------------------------------------------------------

def test_prometheus_sees_exactly_the_requests_sent(prom: Prometheus, traffic: dict) -> None:
    job = job_name()
    result = prom.poll(f'sum by (method, code) (resnet_serve_requests_total{{job="{job}"}})',
                       lambda r: by_labels(r, "method", "code") == traffic, "the request counts to arrive")
    assert by_labels(result, "method", "code") == traffic
    images = traffic[("Classify", "OK")] + traffic[("ClassifyStream", "OK")]
    assert by_labels(prom.query(f'sum(resnet_serve_batch_size_sum{{job="{job}"}})')) == {(): images}
    assert by_labels(prom.query(f'sum(resnet_serve_queue_wait_seconds_count{{job="{job}"}})')) == {(): images}
    assert by_labels(prom.query('sum(resnet_serve_request_duration_seconds_count)')) == {
        (): sum(n for (method, _), n in traffic.items() if method != "GetModelInfo")}


def test_histogram_quantile_answers(prom: Prometheus, traffic: dict) -> None:
    expr = "histogram_quantile(0.99, sum by (le) (rate(resnet_serve_request_duration_seconds_bucket[1m])))"
    result = prom.poll(expr, lambda r: len(r) == 1 and math.isfinite(float(r[0]["value"][1])),
                       "a finite p99")
    assert 0 < float(result[0]["value"][1]) <= 30.0  # within the histogram's finite buckets


def bound_variables(srv: InProcessServer) -> dict[str, str]:
    """$job, $instance and $model as Grafana substitutes them with this test server chosen (a single value: its
    regex metacharacters, here the dots, match themselves too)."""
    return {"$job": job_name(), "$instance": f"127.0.0.1:{srv.server.metrics_port}",
            "$model": srv.server.model.pipeline.model.name}


def test_every_dashboard_query_uses_the_job_instance_and_model_variables() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"job", "instance", "model"} <= set(variables)
    assert all(variables[v]["includeAll"] and variables[v]["allValue"] == ".*" for v in ("job", "instance", "model"))
    for title, expr in dashboard_expressions(bound={}):
        for var in ("$job", "$instance", "$model"):
            assert var in expr, f"{title!r} does not filter by {var}: {expr}"
        assert 'job="' not in expr, f"{title!r} hard-codes a job: {expr}"


def test_every_dashboard_query_with_the_variables_bound_returns_the_servers_data(
        srv: InProcessServer, prom: Prometheus, traffic: dict) -> None:
    expressions = dashboard_expressions(bound_variables(srv))
    assert len(expressions) >= 20
    for _, expr in expressions:
        prom.query(expr)  # parses (a syntax error fails at once, with Prometheus's message)
    for title, expr in expressions:
        prom.poll(expr, bool, f"data for panel {title!r}")
    # ... and the filters filter: another model or instance gives no data
    for other in ({"$model": "no-such-model"}, {"$instance": "127.0.0.1:1"}):
        for title, expr in dashboard_expressions({**bound_variables(srv), **other}):
            if "vector(0)" not in expr:
                assert prom.query(expr) == [], f"{title!r} ignores {other}: {expr}"


def test_model_version_and_worker_series(srv: InProcessServer, prom: Prometheus, traffic: dict) -> None:
    """Requests and latency by model and version (from what is loaded); CPU and memory of each worker process."""
    result = prom.poll('sum by (model, version) (resnet_serve_request_duration_seconds_count{method="Classify"})',
                       lambda r: by_labels(r, "model", "version") == {("tiny", "1"): traffic[("Classify", "OK")]
                                                                     + traffic[("Classify", "INVALID_ARGUMENT")]},
                       "Classify latency counts by model version")
    assert len(result) == 1
    cpu = prom.poll("resnet_serve_worker_cpu_seconds_total", bool, "worker CPU seconds")
    rss = prom.poll("resnet_serve_worker_resident_memory_bytes", bool, "worker memory")
    assert by_labels(cpu, "worker", "version").keys() == {("0", "1")} == by_labels(rss, "worker", "version").keys()
    assert float(cpu[0]["value"][1]) > 0 and float(rss[0]["value"][1]) > 20e6  # a Paddle predictor process


def test_every_dashboard_query_parses_and_returns_data(prom: Prometheus, traffic: dict) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    for _, expr in expressions:
        prom.query(expr)  # parses (a syntax error fails at once, with Prometheus's message)
    for title, expr in expressions:
        prom.poll(expr, bool, f"data for panel {title!r}")


def test_dashboard_uses_only_metrics_the_server_exports(srv: InProcessServer) -> None:
    text = urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10).read().decode()
    samples = set(re.findall(r"^([a-zA-Z_:][\w:]*)", text, re.M))
    used = {name for _, expr in dashboard_expressions()
            for name in re.findall(r"\b((?:resnet_serve|process|python)_\w+)", expr)}
    assert used and used <= samples, used - samples


def test_promtool_check_metrics_reports_nothing(srv: InProcessServer, traffic: dict) -> None:
    text = urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10).read()
    assert b"resnet_serve_preprocess_duration_seconds_bucket" in text  # every family has samples by now
    r = subprocess.run([binary("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_promtool_accepts_the_shipped_scrape_config() -> None:
    r = subprocess.run([binary("promtool"), "check", "config", str(SCRAPE_CONFIG)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_dashboard_and_provisioning_fit_together() -> None:
    """What Grafana would reject or silently misplace: duplicate ids, targets without a data source, a data
    source uid the provisioning does not create."""
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    datasources = (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    assert f"uid: {variables['datasource']['current']['value']}" in datasources
    assert "path:" in (ROOT / "deploy/grafana/provisioning/dashboards/resnet-serve.yml").read_text()
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for t in p["targets"])
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("throughput", "p50/p95/p99", "batch-size", "flush reasons", "queue depth", "errors by code",
                  "model"):
        assert topic in titles, topic


def test_make_observe_prints_the_url_and_scrapes_a_local_server(srv: InProcessServer, tmp_path: Path) -> None:
    """`make observe` as a user runs it (METRICS_PORT pointing at this test server): the URL it prints answers,
    and the shipped scrape config's job scrapes the server."""
    binary("prometheus")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["make", "-s", "observe", f"METRICS_PORT={srv.server.metrics_port}",
                             f"PROMETHEUS_PORT={port}", f"OBSERVE_DIR={tmp_path}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"Prometheus: http://localhost:{port} ") and "make serve" in line, line
        prom = Prometheus.__new__(Prometheus)  # the API helpers, on make's Prometheus
        prom.port, prom.proc, prom.log = port, proc, tmp_path / "none"
        wait_for(lambda: prom._ready(), timeout=30, what="make observe's Prometheus")
        up = prom.poll(f'up{{job="{job_name()}"}} == 1', bool, "the shipped job to scrape the test server")
        assert up[0]["metric"]["instance"] == f"localhost:{srv.server.metrics_port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
