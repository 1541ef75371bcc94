"""deploy/: `make deploy-check` passes on the repository and fails on broken copies, each kustomization rendered by
`kubectl kustomize`; the rendered overlays hold what they claim; the container's entrypoint, run with the
environment the Kubernetes Deployment sets, serves and passes the image's own health check."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resnet_serve.client.sync import ClassifierClient
from tests.harness import ROOT, wait_for

DEPLOY = ROOT / "deploy"
DOCKERFILE_CPU = DEPLOY / "docker" / "Dockerfile.cpu"
DOCKERFILE_GPU = DEPLOY / "docker" / "Dockerfile.gpu"
VENV = Path(sys.executable).parent.parent  # the venv running the tests (make's VENV)


def load_check():
    spec = importlib.util.spec_from_file_location("deploy_check", DEPLOY / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = load_check()


def make_deploy_check(root: Path) -> subprocess.CompletedProcess:
    """`make deploy-check` in `root`, with the tests' venv; `-o install`: the suite already runs installed."""
    return subprocess.run(["make", "--no-print-directory", "-C", str(root), "-o", "install", "deploy-check",
                           f"VENV={VENV}"], capture_output=True, text=True, timeout=300)


def run_check(deploy_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """deploy/check.py in-process (no interpreter start per case): exit status, output, its FAIL lines."""
    rc = check.main(["--deploy-dir", str(deploy_dir)])
    out = capsys.readouterr().out
    return rc, out, [line for line in out.splitlines() if line.startswith("FAIL")]


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    """A copy of what `make deploy-check` reads (Makefile, the pyproject.toml files, deploy/) to break."""
    for name in ("Makefile", "pyproject.toml", "server/pyproject.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_make_deploy_check_passes() -> None:
    r = make_deploy_check(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "== deploy-check: all passed" in r.stdout
    assert "FAIL" not in r.stdout
    for where in ("base", "overlays/gpu", "overlays/keda"):
        assert f"ok    {where}: `kubectl kustomize` renders" in r.stdout, where
    for what in ("Deployment/resnet-serve against Kubernetes", "PodMonitor/resnet-serve against",
                 "ScaledObject/resnet-serve against", "hadolint: clean", "overlays/gpu: device gpu requests"):
        assert what in r.stdout, what


def test_make_deploy_check_fails_on_a_broken_manifest(deploy_copy: Path) -> None:
    deployment = deploy_copy / "deploy" / "k8s" / "base" / "deployment.yaml"
    deployment.write_text(deployment.read_text().replace("readinessProbe:", "readinesProbe:"))
    r = make_deploy_check(deploy_copy)
    assert r.returncode != 0, r.stdout
    assert "'readinesProbe' was unexpected" in r.stdout
    assert "== deploy-check: FAILED" in r.stdout


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


# A kustomization kustomize cannot build: (file, old, new, the kustomization, what kustomize's message says)
BROKEN_KUSTOMIZATIONS = {
    "patch target missing": ("k8s/overlays/gpu/hpa-gpu.yaml", "name: resnet-serve", "name: resnet-server",
                             "overlays/gpu", 'no resource matches strategic merge patch '
                             '"HorizontalPodAutoscaler.v2.autoscaling/resnet-server'),
    "unknown resource": ("k8s/overlays/keda/kustomization.yaml", "  - scaledobject.yaml\n",
                         "  - scaledobject.yaml\n  - gone.yaml\n", "overlays/keda", "keda/gone.yaml: no such file"),
    "duplicate key in a manifest": ("k8s/base/deployment.yaml", "failureThreshold: 6\n",
                                    "failureThreshold: 6\n            grpc:\n              port: 50052\n", "base",
                                    'mapping key "grpc" already defined'),
    "unknown kustomization field": ("k8s/base/kustomization.yaml", "\nresources:", "\nresourcez:", "base",
                                    'invalid Kustomization: json: unknown field "resourcez"'),
}


@pytest.mark.parametrize("name", BROKEN_KUSTOMIZATIONS)
def test_kustomize_reports_a_broken_kustomization_on_one_failing_line(
        name: str, deploy_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, old, new, where, message = BROKEN_KUSTOMIZATIONS[name]
    edit(deploy_copy / "deploy" / file, old, new)
    rc, out, fails = run_check(deploy_copy / "deploy", capsys)
    assert rc == 1, out
    broken = [line for line in fails if line.startswith(f"FAIL  {where}: kubectl kustomize: ")]
    assert len(broken) == 1 and message in broken[0], out
    # a broken overlay does not stop the others being rendered and checked (the overlays include a broken base)
    others = {"base", "overlays/gpu", "overlays/keda"} - {where} if where != "base" else set()
    for other in others:
        assert f"ok    {other}: `kubectl kustomize` renders" in out, other
    assert "hadolint: clean" in out


BREAKAGES = {
    # schema: a wrong type in a built-in kind, an unknown field in a CRD, a CRD field with a bad value
    "replicas as text": ("k8s/base/deployment.yaml", "replicas: 3", "replicas: three", "replicas"),
    "PodMonitor typo": ("k8s/base/podmonitor.yaml", "podMetricsEndpoints:", "podMetricEndpoints:",
                        "'podMetricEndpoints' was unexpected"),
    "ScaledObject threshold not a string": ("k8s/overlays/keda/scaledobject.yaml", 'threshold: "16"',
                                            "threshold: 16", "16 is not of type 'string'"),
    # a manifest kustomize would never read
    "manifest not listed": ("k8s/base/kustomization.yaml", "  - pdb.yaml\n", "",
                            "base/pdb.yaml holds manifests but no kustomization lists it"),
    # consistency with the server
    "drain longer than the termination grace": ("k8s/base/deployment.yaml", "terminationGracePeriodSeconds: 45",
                                                "terminationGracePeriodSeconds: 35",
                                                "terminationGracePeriodSeconds 35 >= preStop 10 s + drain 30 s"),
    "unknown setting": ("k8s/base/deployment.yaml", "RESNET_SERVE_MAX_QUEUE_SIZE", "RESNET_SERVE_MAX_QUEUE",
                        "unknown: ['RESNET_SERVE_MAX_QUEUE']"),
    # the probes ask the dedicated health port (answered off the event loop), not the main port
    "probe on the main port": ("k8s/base/deployment.yaml",
                               "livenessProbe:\n            grpc:\n              port: 50052",
                               "livenessProbe:\n            grpc:\n              port: 50051",
                               "FAIL  base: livenessProbe is a native gRPC health probe on the health port 50052"),
    "health port off": ("k8s/base/deployment.yaml", 'RESNET_SERVE_HEALTH_PORT\n              value: "50052"',
                        'RESNET_SERVE_HEALTH_PORT\n              value: "-1"',
                        "FAIL  base: the dedicated health port is on"),
    "health container port missing": ("k8s/base/deployment.yaml", "- name: health\n", "- name: healthz\n",
                                      "FAIL  base: container ports grpc/metrics/health 50051/8000/None"),
    "HPA on a metric the server lacks": ("k8s/base/hpa.yaml", "name: resnet_serve_queue_depth",
                                         "name: resnet_serve_queue_length", "resnet_serve_queue_length"),
    "adapter rule matches nothing": ("k8s/prometheus-adapter/values.yaml", "in_flight_requests|queue_depth",
                                     "in_flight|queue", "prometheus-adapter rule matches exported series []"),
    # Dockerfiles
    "hadolint finding": ("docker/Dockerfile.cpu", "apt-get install -y --no-install-recommends libgomp1",
                         "apt-get install -y libgomp1", "DL3015"),
    "health port not exposed": ("docker/Dockerfile.cpu", "EXPOSE 50051 8000 50052", "EXPOSE 50051 8000",
                                "FAIL  Dockerfile.cpu: the health port is on and EXPOSE [8000, 50051]"),
    "entrypoint not a project command": ("docker/Dockerfile.gpu", 'ENTRYPOINT ["resnet-serve"]',
                                         'ENTRYPOINT ["resnet-server"]', "ENTRYPOINT ['resnet-server']"),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_deploy_check_catches(name: str, deploy_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, old, new, expected = BREAKAGES[name]
    edit(deploy_copy / "deploy" / file, old, new)
    rc, out, _ = run_check(deploy_copy / "deploy", capsys)
    assert rc == 1, out
    assert expected in "\n".join(line for line in out.splitlines() if "FAIL" in line or line.startswith(" ")), out


def test_deploy_check_without_kubectl_fails_on_one_line_and_still_checks_the_dockerfiles(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # the venv's bin: hadolint, no kubectl
    rc, out, fails = run_check(DEPLOY, capsys)
    assert rc == 1, out
    assert fails == ["FAIL  kubectl not found on PATH: rendering deploy/k8s needs `kubectl kustomize` "
                     "(kustomize v5, kubectl >= 1.27); install kubectl"], out
    assert "hadolint: clean" in out


# `kubectl version --client -o json` of a kubectl that cannot build these kustomizations, and the one line it gets
OLD_KUBECTLS = {
    # Debian bookworm's kubernetes-client (the kubectl apt offers): 1.20.2 names no kustomize version, and its
    # `kubectl kustomize` fails on these kustomizations ("cannot unmarshal object into ... patchesStrategicMerge")
    "debian kubernetes-client 1.20": ('{"clientVersion": {"gitVersion": "v1.20.2"}}',
                                      "reports no kustomize version (`kubectl version --client -o json`): "
                                      "deploy-check needs kubectl >= 1.27 (kustomize v5)"),
    "kubectl 1.26, kustomize v4": ('{"clientVersion": {"gitVersion": "v1.26.0"}, "kustomizeVersion": "v4.5.7"}',
                                   "bundles kustomize v4.5.7; deploy-check needs kustomize v5 (kubectl >= 1.27)"),
}


@pytest.mark.parametrize("name", OLD_KUBECTLS)
def test_deploy_check_refuses_a_kubectl_without_kustomize_v5_on_one_line(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    version_json, message = OLD_KUBECTLS[name]
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f"#!/bin/sh\necho '{version_json}'\n")
    kubectl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{Path(sys.executable).parent}")
    rc, out, fails = run_check(DEPLOY, capsys)
    assert rc == 1, out
    assert fails == [f"FAIL  {kubectl} {message}"], out


@functools.cache
def rendered(kustomization: str) -> dict[str, dict]:
    """`kubectl kustomize deploy/k8s/<kustomization>`, through deploy/check.py, by kind/name."""
    kubectl, _ = check.find_kubectl()
    objs = {check.ident(o): o for o in check.render(kubectl, DEPLOY / "k8s" / kustomization)}
    assert "Deployment/resnet-serve" in objs, sorted(objs)
    return objs


def pod_spec(objs: dict[str, dict]) -> dict:
    return objs["Deployment/resnet-serve"]["spec"]["template"]["spec"]


def container(objs: dict[str, dict]) -> dict:
    [c] = pod_spec(objs)["containers"]
    return c


def hpa_targets(hpa: dict) -> dict[str, int]:
    return {m["pods"]["metric"]["name"]: int(m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"]}


BASE_OBJECTS = {"Deployment/resnet-serve", "Service/resnet-serve", "Service/resnet-serve-headless",
                "PersistentVolumeClaim/resnet-serve-models", "PodDisruptionBudget/resnet-serve",
                "PodMonitor/resnet-serve", "HorizontalPodAutoscaler/resnet-serve"}


def test_rendered_base_has_its_replicas_hpa_resources_and_labels() -> None:
    objs = rendered("base")
    assert set(objs) == BASE_OBJECTS
    assert objs["Deployment/resnet-serve"]["spec"]["replicas"] == 3
    c = container(objs)
    assert c["image"] == "resnet-serve:cpu"
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    assert check.env_of(c)["RESNET_SERVE_THREADS_PER_INSTANCE"] == "2"  # matches the CPU limit
    hpa = objs["HorizontalPodAutoscaler/resnet-serve"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    # targets: two batches in flight per pod, one queued
    assert hpa_targets(hpa) == {"resnet_serve_in_flight_requests": 16, "resnet_serve_queue_depth": 8}
    assert check.env_of(c)["RESNET_SERVE_MAX_BATCH_SIZE"] == "8"
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "resnet-serve" for o in objs.values())


def test_rendered_gpu_overlay_has_its_replicas_gpu_resources_and_hpa_on_top_of_the_base() -> None:
    objs = rendered("overlays/gpu")
    assert set(objs) == BASE_OBJECTS
    assert objs["Deployment/resnet-serve"]["spec"]["replicas"] == 2
    c = container(objs)
    assert c["image"] == "resnet-serve:gpu"
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "6Gi", "nvidia.com/gpu": "1"},
                              "limits": {"cpu": "4", "memory": "6Gi", "nvidia.com/gpu": "1"}}
    env = check.env_of(c)
    assert {k: env[k] for k in ("RESNET_SERVE_DEVICE", "RESNET_SERVE_PRECISION", "RESNET_SERVE_MAX_BATCH_SIZE",
                                "RESNET_SERVE_THREADS_PER_INSTANCE")} == {
        "RESNET_SERVE_DEVICE": "gpu", "RESNET_SERVE_PRECISION": "fp16", "RESNET_SERVE_MAX_BATCH_SIZE": "32",
        "RESNET_SERVE_THREADS_PER_INSTANCE": "1"}
    assert env["RESNET_SERVE_MODEL_DIR"] == "/models/digits"  # env merges by name: the base's settings stay
    # the longer startup window for TensorRT builds keeps the base's gRPC probe (of the health port)
    assert c["startupProbe"]["failureThreshold"] == 180 and c["startupProbe"]["grpc"] == {"port": 50052}
    volumes = {v["name"]: v for v in pod_spec(objs)["volumes"]}
    assert set(volumes) == {"models", "cache", "tmp", "dshm", "trt-cache"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["trt-cache"] == env["RESNET_SERVE_TRT_CACHE_DIR"]
    assert pod_spec(objs)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    hpa = objs["HorizontalPodAutoscaler/resnet-serve"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    # the targets scale with the batch size (32): two batches in flight per pod, one queued
    assert hpa_targets(hpa) == {"resnet_serve_in_flight_requests": 64, "resnet_serve_queue_depth": 32}
    assert hpa["spec"]["behavior"] == rendered("base")["HorizontalPodAutoscaler/resnet-serve"]["spec"]["behavior"]


@pytest.mark.parametrize("kustomization", ["base", "overlays/gpu", "overlays/keda"])
def test_rendered_probes_ask_the_dedicated_health_port(kustomization: str) -> None:
    """Every probe is a native gRPC probe of the health port the server is told to open (answered off its event
    loop, so a burst of large requests cannot fail a probe), which is a container port; the main port is not
    probed."""
    c = container(rendered(kustomization))
    env = check.env_of(c)
    health, main = int(env["RESNET_SERVE_HEALTH_PORT"]), int(env["RESNET_SERVE_PORT"])
    assert health > 0 and health != main
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["health"] == health
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[kind]["grpc"] == {"port": health}, kind


def test_rendered_keda_overlay_replaces_the_hpa_with_a_scaled_object() -> None:
    objs, base = rendered("overlays/keda"), rendered("base")
    assert set(objs) == BASE_OBJECTS - {"HorizontalPodAutoscaler/resnet-serve"} | {"ScaledObject/resnet-serve"}
    assert objs["Deployment/resnet-serve"] == base["Deployment/resnet-serve"]
    so = objs["ScaledObject/resnet-serve"]["spec"]
    assert so["scaleTargetRef"]["name"] == "resnet-serve"
    assert (so["minReplicaCount"], so["maxReplicaCount"], so["fallback"]["replicas"]) == (3, 20, 6)
    assert {t["metadata"]["threshold"] for t in so["triggers"]} == {"16", "8"}  # the base HPA's targets


# ---------------------------------------------------------------------------------------- the image, without Docker

def dockerfile_env(dockerfile: Path) -> dict[str, str]:
    """RESNET_SERVE_* values the image's ENV instructions set (the runtime defaults)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return dict(re.findall(r"\b(RESNET_SERVE_\w+)=(\S+)", text))


def deployment_env() -> dict[str, str]:
    """The env of the base Deployment's container, as the manifest sets it."""
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    dep = next(d for d in docs if d and d.get("kind") == "Deployment")
    return {e["name"]: str(e["value"]) for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def healthcheck_command(dockerfile: Path) -> list[str]:
    """The HEALTHCHECK CMD, with the path it names inside the image mapped back to the file COPY puts there."""
    text = dockerfile.read_text().replace("\\\n", " ")
    cmd = json.loads(re.search(r"^HEALTHCHECK .*?CMD\s+(\[.*\])\s*$", text, re.M).group(1))
    copies = {dst: src for src, dst in re.findall(r"^COPY\s+(?!--from)(deploy/\S+)\s+(\S+)\s*$", text, re.M)}
    assert cmd[0] in ("python", "python3")
    return [sys.executable, *(str(ROOT / copies[a]) if a in copies else a for a in cmd[1:])]


def test_entrypoint_with_the_deployment_env_serves_and_passes_the_image_health_check(tiny_model_dir: Path) -> None:
    entry = check.entrypoint(DOCKERFILE_CPU)
    assert entry == ["resnet-serve"]
    image_env, k8s_env = dockerfile_env(DOCKERFILE_CPU), deployment_env()
    assert {"RESNET_SERVE_MODEL_DIR", "RESNET_SERVE_PORT", "RESNET_SERVE_GRACE_PERIOD_S"} <= set(k8s_env)
    # What the container sees: the image's ENV, overridden by the Deployment's env; then only what a test must
    # change: the model (the tiny one) and free ports (0: the server picks and reports them).
    env = {**os.environ, **image_env, **k8s_env, "RESNET_SERVE_MODEL_DIR": str(tiny_model_dir),
           "RESNET_SERVE_PORT": "0", "RESNET_SERVE_METRICS_PORT": "0", "RESNET_SERVE_HEALTH_PORT": "0",
           "PYTHONUNBUFFERED": "1"}
    argv = [str(Path(sys.executable).parent / entry[0]), *entry[1:]]  # the image has the venv's bin on PATH
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        ports = json.loads(line)
        address = f"127.0.0.1:{ports['port']}"
        health = healthcheck_command(DOCKERFILE_CPU)
        # What the probe reads inside the container: the ports the server chose.
        probe_env = {**env, "RESNET_SERVE_PORT": str(ports["port"]),
                     "RESNET_SERVE_HEALTH_PORT": str(ports["health_port"])}

        def healthy() -> bool:
            assert proc.poll() is None, proc.stderr.read()
            r = subprocess.run(health, env=probe_env, capture_output=True, text=True, timeout=30)
            assert r.stdout.startswith(f"127.0.0.1:{ports['health_port']}: "), r.stdout  # the health port it asks
            return r.returncode == 0

        wait_for(healthy, timeout=120, what="the image's HEALTHCHECK to pass")
        with ClassifierClient(address) as client:
            assert client.health() == "SERVING"
            info = client.model_info()
        assert info.max_batch_size == int(k8s_env["RESNET_SERVE_MAX_BATCH_SIZE"])
        assert info.device == "cpu"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "draining" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_healthcheck_asks_the_health_port_the_env_names_or_the_grpc_port_when_it_is_off() -> None:
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "docker" / "healthcheck.py")
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    assert hc.default_address({}) == "127.0.0.1:50052"  # the server's default health port
    assert hc.default_address({"RESNET_SERVE_HEALTH_PORT": "6000", "RESNET_SERVE_PORT": "7000"}) == "127.0.0.1:6000"
    assert hc.default_address({"RESNET_SERVE_HEALTH_PORT": "-1", "RESNET_SERVE_PORT": "7000"}) == "127.0.0.1:7000"


def test_healthcheck_fails_without_a_server() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # a port nobody listens on once the socket closes
    r = subprocess.run([sys.executable, str(DEPLOY / "docker" / "healthcheck.py"), "--address", f"127.0.0.1:{port}",
                        "--timeout", "2"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "UNAVAILABLE" in r.stdout


def test_gpu_image_installs_everything_but_paddle() -> None:
    """Dockerfile.gpu installs the project with --no-deps, then the requirements this script prints."""
    out = subprocess.run([sys.executable, str(DEPLOY / "docker" / "runtime_requirements.py")], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in out}
    assert "paddlepaddle" not in names
    assert {"grpcio", "grpcio-health-checking", "numpy", "pillow", "prometheus-client"} <= names
    assert not {"pytest", "ruff"} & names  # no extras


def dockerfile_runs(path: Path) -> list[str]:
    """The RUN instructions of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line[4:].strip() for line in text.splitlines() if line.startswith("RUN ")]


def test_gpu_image_installs_the_package_providing_tensorrt_and_asserts_the_import_at_build() -> None:
    """`tensorrt-cu12` provides the `tensorrt` module (its sdist's top_level.txt is `tensorrt`, re-exporting
    `tensorrt_bindings`; checked on 10.5.0); `tensorrt-cu12-bindings` alone provides only `tensorrt_bindings`,
    which is what the image used to fall back to, building fine and failing at the first GPU start."""
    instructions = re.sub(r"(?m)^#.*$", "", DOCKERFILE_GPU.read_text())
    assert "tensorrt-cu12-bindings" not in instructions
    [run] = [r for r in dockerfile_runs(DOCKERFILE_GPU) if "tensorrt-cu12" in r]
    steps = [step.strip() for step in run.split("&&")]
    assert "||" not in run  # no fallback: any failing step fails the build
    version_step = next(i for i, st in enumerate(steps) if st.startswith("TRT_VERSION="))
    assert "paddle.version.tensorrt()" in steps[version_step]  # the version Paddle was built with
    install = next(i for i, st in enumerate(steps) if '"tensorrt-cu12==${TRT_VERSION}.*"' in st)
    check = steps.index('python3 -c "import tensorrt, paddle.tensorrt"')
    paddle_check = next(i for i, st in enumerate(steps) if "paddle.is_compiled_with_cuda()" in st)
    assert paddle_check < version_step < install < check


def test_gpu_image_tensorrt_version_step_fails_on_a_paddle_without_tensorrt() -> None:
    """The build's own version probe, run against this CPU wheel: it stops the build with one clear reason."""
    [run] = [r for r in dockerfile_runs(DOCKERFILE_GPU) if "tensorrt-cu12" in r]
    code = re.search(r"TRT_VERSION=\"\$\(python3 -c '([^']+)'\)\"", run).group(1)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "paddlepaddle-gpu built without TensorRT: None" in r.stderr


def test_gpu_image_base_and_paddle_follow_the_tested_paddle() -> None:
    """Paddle's own GPU image (the registry its 3.x install docs give) at the Paddle series we test, CUDA 12.6; the
    build checks that the base's paddle is that series and compiled with CUDA."""
    from importlib.metadata import version

    text = DOCKERFILE_GPU.read_text()
    base = re.search(r"^ARG PADDLE_GPU_IMAGE=(\S+)$", text, re.M).group(1)
    registry, tag = base.rsplit(":", 1)
    assert registry == "ccr-2vdh3abv-pub.cnc.bj.baidubce.com/paddlepaddle/paddle"
    assert tag.split(".")[:2] == version("paddlepaddle").split(".")[:2] and "-gpu-cuda12.6-" in tag
    series = re.search(r"^ARG PADDLE_SERIES=(\S+)$", text, re.M).group(1)
    assert tag.startswith(series + ".")
    assert "startswith('${PADDLE_SERIES}.')" in "\n".join(dockerfile_runs(DOCKERFILE_GPU))
    trusted = yaml.safe_load((DEPLOY / "docker" / "hadolint.yaml").read_text())["trustedRegistries"]
    assert registry.split("/")[0] in trusted
    env = dict(re.findall(r"\b(RESNET_SERVE_\w+)=(\S+)", text))
    start_period = int(re.search(r"--start-period=(\d+)s", text).group(1))
    assert env["RESNET_SERVE_DEVICE"] == "gpu" and float(env["RESNET_SERVE_WORKER_START_TIMEOUT_S"]) < start_period
