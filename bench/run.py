"""`make bench`: The benchmark protocol (docs/BENCHMARKS.md) in one run on one machine.

1. limit      the predictor called in-process (bench/limit.py) at each batch size: best images/s
2. batched    the server with dynamic batching under the load generator: unary and stream, raw uint8 tensors,
              concurrency sweep, and one JPEG run
3. unbatched  the same server with max_batch_size 1
4. ceiling    the same server path with a 'null' model (compute negligible): what the Python front can feed
5. fast_limits   the in-process limit of the CPU fast paths: fp32 legacy (oneDNN), INT8 (oneDNN VNNI; calibrated on
                 upscaled digits, random weights: speed only), fp32 legacy on the OpenVINO engine
6. fast_servers  the batched server (stream, raw) serving the INT8 model and the OpenVINO engine
7. front_cost    issue 17: CPU per image of the front process, of the workers and of the load generator, from
                 /proc, with the null model under request-bounded stream load (bench/front_cost.py)
8. simulated     issue 17: the server over the simulated engine (a + c*b ms per batch; default 5 + 0.1*b, max batch
                 32): images/s at concurrency 256 over the engine's capacity, and p50 at concurrency 1 minus (a + c)
9. normalisation issue 17: ResNet-50 in-process, the pixel program (normalised in the graph) against the float
                 program plus numpy normalisation (bench/limit.py)
10. fronts       issue 17: --front-processes 2 against 1 (simulated engine)
11. grpc_floor   issue 17: front_cost's load and measurement against bench/grpc_floor.py (grpcio, resnet-serve's
                 request parsing, a fixed answer): what any Python gRPC front spends per image
Each fast path is reported as a ratio to fp32 (the PIR model of 1 and 2) taken within the round.
--configs runs a subset (e.g. --configs front_cost,simulated). --baseline REV adds REV's server (bench/baseline.py)
as config front_cost@base, alternated with the current one in every round, and reports the current figures over
REV's from the same round (the simulated engine is new, so it has no baseline config).
Smoke run (seconds, figures meaningless): python -m bench.run --configs front_cost,simulated --rounds 1 --size 32
--requests 50 --no-docs --out /tmp/bench-smoke
Timings here drift +-15% run to run, so the configurations alternate within each round, rounds repeat (3 by
default), every ratio is taken within a round, and the table shows medians with min-max. Writes
bench/results/<date>-<commit>.json and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from resnet_serve.client.errors import ClassifierError
from resnet_serve.client.sync import ClassifierClient
from resnet_serve.client.tools.loadgen import LoadConfig
from resnet_serve.client.tools.loadgen import run as run_load
from resnet_serve.server.batcher import default_buckets

from . import baseline, front_cost
from .models import ensure_int8_model, ensure_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOCS = ROOT / "docs" / "BENCHMARKS.md"
CONFIGS = ("limit", "batched", "unbatched", "ceiling", "fast_limits", "fast_servers", "front_cost", "simulated",
           "normalisation", "fronts", "grpc_floor")
BASE = "@base"  # suffix of a config run on the --baseline server
# the models each config needs (exported once)
NEEDS = {"limit": ("resnet",), "batched": ("resnet",), "unbatched": ("resnet",), "ceiling": ("null",),
         "fast_limits": ("legacy", "int8"), "fast_servers": ("legacy", "int8"), "front_cost": ("null",),
         "simulated": ("null",), "normalisation": ("resnet",), "fronts": ("null",), "grpc_floor": ("null",)}
# variant -> (model, --engine): the CPU fast paths beside fp32 (docs/precision.md)
FAST = {"fp32_legacy": ("legacy", "onednn"), "int8": ("int8", "paddle"), "openvino": ("legacy", "openvino")}


# What docs/BENCHMARKS.md says of the issue 17 configs; kept here so `make bench`, which rewrites that file, keeps it.
DOC_NOTES = """## Issue 17: the front's cost and a simulated GPU

- `front_cost`: the null-model server under request-bounded stream load (raw uint8): CPU (utime + stime from
  /proc) per image answered of the front process, of its worker processes and of the load generator, and
  images/s (bench/front_cost.py). The null model ('null-sampled', bench/models.py) takes uint8 NHWC pixels as
  resnet-export's models do, but reads only every 8th row and column of them: its compute, normalisation included
  (which a GPU engine runs on the GPU), is negligible, so what the workers spend is the serving path around an
  engine (pixels copied in, logits out, the pipe); the server runs it with `--normalise graph`, as a GPU worker
  runs its pixel program. With `--front-batch N` (default 32: a client that batches to the server's max batch
  size, as perf_analyzer's -b does) the same is measured over the Open Inference Protocol with N images per stream
  message (`oip_batchN`), where the front's per-message costs are paid once per N images. From the medians, the
  "feeding a GPU" table gives the cores this CPU per image would take at 5,000 and 20,000 images/s.
- `simulated`: the server over `--engine simulated --simulated-cost-ms A,C` (benchmarks only: a batch of b takes
  A + C*b ms, answers are a function of the pixels; server/resnet_serve/server/simulated_engine.py). By default
  A,C = 5,0.1 and max batch 32: images/s at concurrency 256 over the engine's capacity (32 / (A + 32*C)), and the
  p50 at concurrency 1 minus (A + C); with `--front-batch N` the throughput again with the same images in flight as
  OIP stream messages of N images (`sim_oip_batchN`).
- `normalisation`: ResNet-50 in-process at batch `--max-batch`, `--threads` threads: the exported pixel program
  (uint8 in, normalised in the graph) against the same network's float program plus the numpy normalisation the
  worker did before, timed in turn (bench/limit.py `normalisation`); `norm_now_over_before` < 1 means the
  in-graph normalisation costs the CPU path nothing.
- `fronts`: the simulated-engine server (as `simulated`) with `--front-processes 1` and then 2, under the same stream
  load from `--fronts-processes` load generator processes (one connection each: the kernel spreads connections,
  not requests, over the fronts); images/s of each, `fronts2_over_1`, and the largest share of the requests one
  front answered with 2 (from the merged /metrics: 0.5 is an even spread, 1.0 all on one front).
- `grpc_floor`: `front_cost`'s load and measurement against bench/grpc_floor.py, a grpc.aio server that parses each
  request as resnet-serve does and answers it at once with a fixed response of the right shape (no batching, no
  engine, no metrics): what grpcio itself costs per image, the floor of any Python gRPC front.
  `*_front_over_floor` is resnet-serve's front CPU per image over the floor's, in the same round;
  `floor_c1_p50_ms` the floor's median latency at concurrency 1 (the step `simulated` measures `sim_c1_added_ms`
  with): the round trip of one image through the load generator and grpcio, which no server can go below.
  `floor_c1_held_added_ms`: the same step against the floor holding each answer for the simulated engine's
  A + C ms on a thread (`--hold-ms`), minus A + C: what a server that adds only a hop to a thread and back adds
  at concurrency 1 when every request finds the machine idle (the number `sim_c1_added_ms` compares with).
- `--configs front_cost,simulated` runs only these; `--requests N` sets the measured requests per step;
  `--baseline REV` also runs `front_cost` on REV's server (a cached git worktree and venv under bench/.baseline/),
  alternated with the current one in every round, and adds `_over_base` ratios (REV has no simulated engine).
- Smoke run (seconds; figures meaningless): `python -m bench.run --configs front_cost,simulated --rounds 1 --size 32
  --requests 50 --no-docs --out /tmp/bench-smoke`. A subset run rewrites this file only if `--docs` names it.
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip())
    paddle = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('paddlepaddle'))"],
                            capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
            "paddlepaddle": paddle, "commit": commit + ("-dirty" if dirty else ""),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


class ServerProcess:
    """resnet-serve as a subprocess on free loopback ports, ready (health SERVING) on entry."""

    def __init__(self, model_dir: Path, *flags: str, exe: Path | None = None):
        """``exe``: another build's `resnet-serve` (bench/baseline.py); this environment's by default."""
        exe = exe if exe is not None else Path(sys.executable).parent / "resnet-serve"
        self.proc = subprocess.Popen([str(exe), "--model-dir",
                                      str(model_dir), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
                                      "--health-port", "-1", *flags], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("server did not start")
        event = json.loads(line)
        self.target = f"127.0.0.1:{event['port']}"
        self.metrics_port = int(event.get("metrics_port", -1))
        self.pid = self.proc.pid
        deadline = time.monotonic() + 600
        with ClassifierClient(self.target) as client:
            while True:  # in short waits, so a server that exits (its model failed to load) is not waited for
                try:
                    client.wait_until_ready(5)
                    break
                except ClassifierError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.close()
                        raise RuntimeError(f"server exited with code {self.proc.returncode} before it was "
                                           f"ready: {' '.join(flags)}") from None

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class FloorProcess:
    """bench/grpc_floor.py as a subprocess on a free loopback port (with its ``flags``), listening on entry."""

    def __init__(self, *flags: str):
        self.flags = flags

    def __enter__(self) -> FloorProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", *self.flags], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"bench.grpc_floor exited with code {self.proc.returncode} before it listened")
        self.target, self.pid = f"127.0.0.1:{json.loads(line)['port']}", self.proc.pid
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(target: str, hw: tuple[int, int], mode: str, concurrency: list[int], args, input_: str = "raw",
         processes: int = 1, requests: int = 0) -> list[dict]:
    """One sweep; ``requests`` > 0 measures exactly that many requests per step instead of a duration."""
    cfg = LoadConfig(target=target, mode=mode, input=input_, concurrency=tuple(concurrency), warmup_s=args.warmup,
                     duration_s=args.duration, input_hw=hw, processes=processes, streams=1, requests=requests)
    return run_load(cfg)


def model_name(model_dir: Path) -> str:
    """The name a model folder's version 1 serves under (what an OIP request names)."""
    return json.loads((model_dir / "1" / "manifest.json").read_text())["name"]


def run_config(name: str, models: dict[str, Path], args) -> dict:
    hw = (args.size, args.size)
    threads = str(args.threads)
    if name.split("@")[0] == "front_cost":
        exe = args.baseline_exe if name.endswith(BASE) else None
        # The pixel program, as a GPU worker runs it; the baseline too where it has --normalise (its default on
        # CPU is the float program plus numpy), while a build older than the flag always ran it.
        graph = ("--normalise", "graph") if not name.endswith(BASE) or args.baseline_normalise else ()
        server = ServerProcess(models["null"], "--max-batch-size", "32", "--max-queue-delay-us", "0",
                               "--threads-per-instance", "1", "--max-queue-size", "4096",
                               "--max-stream-in-flight", "1024", *graph, exe=exe)
        try:
            return front_cost.front_cost(server.target, server.pid, hw, args.front_concurrency, args.requests,
                                         oip_model=model_name(models["null"]), batch=args.front_batch)
        finally:
            server.close()
    if name == "grpc_floor":
        with FloorProcess() as floor:
            out = front_cost.front_cost(floor.target, floor.pid, hw, args.front_concurrency, args.requests,
                                        oip_model=model_name(models["null"]), batch=args.front_batch,
                                        has_workers=False)
            # simulated's concurrency-1 step, against the floor: the round trip no server can go below
            out["c1"] = front_cost.stream_load(floor.target, hw, 1, max(1, args.requests // 4))[0]
        a, c = args.sim_cost_ms
        with FloorProcess("--hold-ms", f"{a},{c}") as held:  # the same, each answer held for the engine's a + c
            out["c1_held"] = front_cost.stream_load(held.target, hw, 1, max(1, args.requests // 4))[0]
        return out
    if name == "simulated":
        a, c = args.sim_cost_ms
        server = ServerProcess(models["null"], "--engine", "simulated", "--simulated-cost-ms", f"{a},{c}",
                               "--max-batch-size", str(args.sim_max_batch), "--max-queue-delay-us", "0",
                               "--threads-per-instance", "1", "--max-queue-size", "4096",
                               "--max-stream-in-flight", "1024")
        try:
            return front_cost.simulated(server.target, hw, args.sim_cost_ms, args.sim_max_batch,
                                        args.sim_concurrency, args.requests,
                                        oip_model=model_name(models["null"]), batch=args.front_batch)
        finally:
            server.close()
    if name == "normalisation":
        r = subprocess.run([sys.executable, "-m", "bench.limit", "normalisation", str(models["resnet"] / "1"), threads,
                            str(args.max_batch), str(args.duration)], capture_output=True, text=True, cwd=ROOT,
                           check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])
    if name == "limit":
        sizes = ",".join(str(b) for b in default_buckets(args.max_batch))
        r = subprocess.run([sys.executable, "-m", "bench.limit", str(models["resnet"] / "1"), threads, sizes,
                            str(args.duration)], capture_output=True, text=True, cwd=ROOT, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])
    if name == "fast_limits":
        sizes = ",".join(str(b) for b in default_buckets(args.max_batch))
        return {v: json.loads(subprocess.run(
            [sys.executable, "-m", "bench.limit", str(models[model] / "1"), threads, sizes, str(args.duration), engine],
            capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip().splitlines()[-1])
            for v, (model, engine) in FAST.items()}
    if name == "fast_servers":
        out = {}
        for v in ("int8", "openvino"):
            model, engine = FAST[v]
            server = ServerProcess(models[model], "--max-batch-size", str(args.max_batch), "--max-queue-delay-us",
                                   str(args.delay_us), "--threads-per-instance", threads, "--max-queue-size", "1024",
                                   "--engine", engine)
            try:
                out[v] = load(server.target, hw, "stream", args.stream_concurrency, args)
            finally:
                server.close()
        return out
    if name == "fronts":
        a, c = args.sim_cost_ms  # the simulated engine (as `simulated`): the fronts, not a model, are measured
        out = {}
        for n in (1, 2):
            server = ServerProcess(models["null"], "--engine", "simulated", "--simulated-cost-ms", f"{a},{c}",
                                   "--max-batch-size", str(args.sim_max_batch), "--max-queue-delay-us", "0",
                                   "--threads-per-instance", "1", "--max-queue-size", "4096",
                                   "--max-stream-in-flight", "1024", "--front-processes", str(n),
                                   "--metrics-port", "0")
            try:
                steps = load(server.target, hw, "stream", [args.ceiling_concurrency], args,
                             processes=args.fronts_processes, requests=args.requests)
                out[f"fronts{n}"] = {"stream_raw": steps, "answered_by_front": answered_by_front(server.metrics_port)}
            finally:
                server.close()
        return out
    if name == "ceiling":
        server = ServerProcess(models["null"], "--max-batch-size", "32", "--max-queue-delay-us", "0",
                               "--threads-per-instance", "1", "--max-queue-size", "4096",
                               "--max-stream-in-flight", "1024", "--normalise", "graph")
        try:
            return {"stream_raw": load(server.target, hw, "stream", [args.ceiling_concurrency], args,
                                       processes=args.ceiling_processes)}
        finally:
            server.close()
    max_batch = args.max_batch if name == "batched" else 1
    server = ServerProcess(models["resnet"], "--max-batch-size", str(max_batch), "--max-queue-delay-us",
                           str(args.delay_us), "--threads-per-instance", threads, "--max-queue-size", "1024")
    try:
        out = {"unary_raw": load(server.target, hw, "unary", args.unary_concurrency, args),
               "stream_raw": load(server.target, hw, "stream", args.stream_concurrency, args)}
        if name == "batched":
            out["stream_jpeg"] = load(server.target, hw, "stream", [args.stream_concurrency[-1]], args, "jpeg")
        return out
    finally:
        server.close()


def answered_by_front(metrics_port: int) -> dict[str, float]:
    """Requests each front answered (OK, any method), from the server's /metrics (merged over its fronts)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "resnet_serve_requests_total" and sample.labels.get("code") == "OK":
                front = sample.labels.get("front", "0")
                out[front] = out.get(front, 0.0) + sample.value
    return out


def step(results: list[dict], concurrency: int) -> dict:
    return next(s for s in results if s.get("concurrency") == concurrency)


def headline(r: dict, args) -> dict:
    """The ratios of one round (each from that round's own numbers), for the configs that ran."""
    out: dict = {}
    if all(k in r for k in CONFIGS[:6]):
        out.update(protocol_headline(r, args))
    if "front_cost" in r:
        cur = r["front_cost"]
        base_run = r.get("front_cost" + BASE)
        parts = [("front_cost", cur, base_run)]
        if "oip_batch" in cur:
            parts.append((f"front_cost_oip_batch{cur['oip_batch']['batch']}", cur["oip_batch"],
                          base_run.get("oip_batch") if base_run else None))
        for prefix, now, then in parts:
            for key in ("images_per_s", "front_cpu_us_per_image", "workers_cpu_us_per_image",
                        "loadgen_cpu_us_per_image"):
                out[f"{prefix}_{key}"] = now[key]
                if then is not None:
                    out[f"{prefix}_{key}_over_base"] = now[key] / then[key] if then[key] else float("nan")
    if "grpc_floor" in r:
        floor = r["grpc_floor"]
        parts = [("floor", floor, "front_cost", r.get("front_cost"))]
        if "oip_batch" in floor:
            batch = floor["oip_batch"]["batch"]
            mine = r.get("front_cost", {}).get("oip_batch")
            parts.append((f"floor_oip_batch{batch}", floor["oip_batch"], f"front_cost_oip_batch{batch}", mine))
        for prefix, now, ours_prefix, ours in parts:
            for key in ("images_per_s", "front_cpu_us_per_image", "loadgen_cpu_us_per_image"):
                out[f"{prefix}_{key}"] = now[key]
            if ours is not None:  # resnet-serve's front above the floor, in this round
                floor_us = now["front_cpu_us_per_image"]
                out[f"{ours_prefix}_front_over_floor"] = \
                    ours["front_cpu_us_per_image"] / floor_us if floor_us else float("nan")
        if floor.get("c1", {}).get("latency_ms", {}).get("p50") is not None:
            out["floor_c1_p50_ms"] = floor["c1"]["latency_ms"]["p50"]
        if floor.get("c1_held", {}).get("latency_ms", {}).get("p50") is not None:
            a, c = args.sim_cost_ms
            out["floor_c1_held_added_ms"] = floor["c1_held"]["latency_ms"]["p50"] - (a + c)
    if "normalisation" in r:
        norm = r["normalisation"]
        out["norm_pixel_program_ms_per_image"] = norm["ms_per_image"]["pixel_program"]
        out["norm_float_program_plus_numpy_ms_per_image"] = norm["before_ms_per_image"]
        out["norm_in_graph_ms_per_image"] = norm["in_graph_ms_per_image"]
        out["norm_numpy_ms_per_image"] = norm["ms_per_image"]["numpy_normalise"]
        out["norm_now_over_before"] = norm["now_over_before"]
    if "simulated" in r:
        out["sim_ratio_to_capacity"] = r["simulated"]["ratio_to_capacity"]
        out["sim_images_per_s"] = r["simulated"]["images_per_s"]
        if "oip_batch" in r["simulated"]:
            many = r["simulated"]["oip_batch"]
            out[f"sim_oip_batch{many['batch']}_ratio_to_capacity"] = many["ratio_to_capacity"]
            out[f"sim_oip_batch{many['batch']}_images_per_s"] = many["images_per_s"]
        if r["simulated"]["c1_added_ms"] is not None:
            out["sim_c1_added_ms"] = r["simulated"]["c1_added_ms"]
    if "fronts" in r:
        one, two = (r["fronts"][f"fronts{n}"]["stream_raw"][0]["images_per_s"] for n in (1, 2))
        shares = r["fronts"]["fronts2"]["answered_by_front"]
        out["fronts1_images_per_s"] = one
        out["fronts2_images_per_s"] = two
        out["fronts2_over_1"] = two / one if one else float("nan")
        out["fronts2_largest_share_ratio"] = max(shares.values()) / sum(shares.values()) if shares else float("nan")
    return out


def protocol_headline(r: dict, args) -> dict:
    """The headline of the whole protocol (configs 1-6)."""
    limit, batched, unbatched = r["limit"], r["batched"], r["unbatched"]
    best_stream = max(s["images_per_s"] for s in batched["stream_raw"])
    best_any = max(s["images_per_s"] for k in ("unary_raw", "stream_raw") for s in batched[k])
    c1 = step(batched["unary_raw"], 1)
    c16 = args.unary_concurrency[-1]
    return {
        "limit_images_per_s": limit["best_images_per_s"],
        "limit_batch1_ms": limit["batch1_ms"],
        "server_best_images_per_s": best_any,
        "server_best_stream_raw_images_per_s": best_stream,
        "ratio_stream_raw_to_limit": best_stream / limit["best_images_per_s"],
        "unary_c1_p50_ms": c1["latency_ms"]["p50"],
        "added_ms_at_c1": c1["latency_ms"]["p50"] - limit["batch1_ms"],
        f"batched_over_unbatched_unary_c{c16}": step(batched["unary_raw"], c16)["images_per_s"]
        / step(unbatched["unary_raw"], c16)["images_per_s"],
        "jpeg_stream_images_per_s": batched["stream_jpeg"][0]["images_per_s"],
        "front_ceiling_images_per_s": r["ceiling"]["stream_raw"][0]["images_per_s"],
        **fast_headline(r, limit["best_images_per_s"], best_stream),
    }


def fast_headline(r: dict, fp32_limit: float, fp32_stream: float) -> dict:
    """The fast paths as images/s and as ratios to fp32 (PIR, oneDNN) of the same round."""
    out = {}
    for v, lim in r["fast_limits"].items():
        out[f"limit_{v}_images_per_s"] = lim["best_images_per_s"]
        out[f"limit_{v}_over_fp32"] = lim["best_images_per_s"] / fp32_limit
    for v, steps in r["fast_servers"].items():
        best = max(s["images_per_s"] for s in steps)
        out[f"server_{v}_best_stream_raw_images_per_s"] = best
        out[f"server_{v}_over_fp32"] = best / fp32_stream
    return out


def summarize(rounds: list[dict]) -> dict:
    keys = rounds[0]["headline"].keys()
    return {k: {"median": statistics.median(r["headline"][k] for r in rounds),
                "min": min(r["headline"][k] for r in rounds), "max": max(r["headline"][k] for r in rounds)}
            for k in keys}


def sweep_table(rounds: list[dict]) -> list[str]:
    """Median images/s and p50/p99 per (config, mode, concurrency) across rounds."""
    rows: dict[tuple, list[dict]] = {}
    for r in rounds:
        for config in ("batched", "unbatched", "ceiling"):
            for kind, steps in r.get(config, {}).items():
                for s in steps:
                    rows.setdefault((config, kind, s["concurrency"]), []).append(s)
    lines = ["| server | mode / input | concurrency | images/s (median, min–max) | p50 ms | p99 ms | errors |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (config, kind, conc), steps in rows.items():
        ips = [s["images_per_s"] for s in steps]
        p50 = statistics.median(s["latency_ms"]["p50"] or 0 for s in steps)
        p99 = statistics.median(s["latency_ms"]["p99"] or 0 for s in steps)
        errors = sum(sum(s["errors"].values()) for s in steps)
        lines.append(f"| {config} | {kind.replace('_', ' ')} | {conc} | {statistics.median(ips):.1f} "
                     f"({min(ips):.1f}–{max(ips):.1f}) | {p50:.1f} | {p99:.1f} | {errors} |")
    return lines


def fast_table(report: dict) -> list[str]:
    """fp32 beside the CPU fast paths: best images/s in-process and through the server, medians over rounds, with
    the median of the per-round ratios to fp32 (PIR, oneDNN)."""
    s = report["summary"]
    rows = [("fp32, PIR, oneDNN", "limit_images_per_s", None, "server_best_stream_raw_images_per_s", None),
            ("fp32, legacy, oneDNN", "limit_fp32_legacy_images_per_s", "limit_fp32_legacy_over_fp32", None, None),
            ("int8, legacy, oneDNN VNNI", "limit_int8_images_per_s", "limit_int8_over_fp32",
             "server_int8_best_stream_raw_images_per_s", "server_int8_over_fp32"),
            ("fp32, legacy, OpenVINO", "limit_openvino_images_per_s", "limit_openvino_over_fp32",
             "server_openvino_best_stream_raw_images_per_s", "server_openvino_over_fp32")]
    lines = ["| precision, format, engine | in-process best images/s | / fp32 | server best stream raw images/s "
             "| / fp32 |", "| --- | ---: | ---: | ---: | ---: |"]

    def cell(key: str | None, pattern: str) -> str:
        if key is None:
            return "1" if pattern == "ratio" else "–"
        v = s[key]
        fmt = "{:.2f}" if pattern == "ratio" else "{:.1f}"
        return f"{fmt.format(v['median'])} ({fmt.format(v['min'])}–{fmt.format(v['max'])})"

    for label, lim, lim_ratio, srv, srv_ratio in rows:
        lines.append(f"| {label} | {cell(lim, 'images')} | {cell(lim_ratio, 'ratio')} | "
                     f"{cell(srv, 'images') if srv else '–'} | {cell(srv_ratio, 'ratio') if srv else '–'} |")
    return lines


def gpu_feeding_table(report: dict) -> list[str]:
    """Feeding a GPU, on paper: the cores of this machine that the server's CPU per image (front + workers, medians
    of front_cost) would take at 5,000 and 20,000 images/s. The GPU's compute is not CPU; what the workers spend
    here around the null model (copying pixels in, logits out, the pipe) is what a GPU worker spends around its
    engine."""
    s, batch = report["summary"], report["args"].get("front_batch", 1)
    paths = [("classifier.v1 stream, 1 image per message", "front_cost")]
    if f"front_cost_oip_batch{batch}_front_cpu_us_per_image" in s:
        paths.append((f"OIP stream, {batch} images per message", f"front_cost_oip_batch{batch}"))
    lines = ["Feeding a GPU, on paper (cores = images/s x CPU µs per image / 10^6):", "",
             "| path | front µs/image | workers µs/image | total µs/image | cores at 5,000/s | cores at 20,000/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, prefix in paths:
        front, workers = (s[f"{prefix}_{k}_cpu_us_per_image"]["median"] for k in ("front", "workers"))
        total = front + workers
        lines.append(f"| {label} | {front:.0f} | {workers:.0f} | {total:.0f} | {5000 * total / 1e6:.1f} | "
                     f"{20000 * total / 1e6:.1f} |")
    return lines


def render(report: dict) -> str:
    m, s, a = report["machine"], report["summary"], report["args"]
    fmt = {"ratio": "{:.3f}", "over": "{:.2f}", "ms": "{:.2f}", "_us_": "{:.1f}", "images": "{:.1f}"}

    def f(key: str, v: float) -> str:
        for tag, pattern in fmt.items():
            if tag in key:
                return pattern.format(v)
        return f"{v:.3f}"

    ran = report["rounds"][0]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
             f"paddlepaddle {m['paddlepaddle']}; commit {m['commit']}; {m['date']}."]
    if "limit" in ran:
        lines.append(f"Model: ResNet-50 {a['size']}x{a['size']}, random weights, fp32 PIR, oneDNN, {a['threads']} "
                     f"threads; server max batch {a['max_batch']}, max queue delay {a['delay_us']} µs, 1 worker. "
                     f"{a['rounds']} rounds of {a['warmup']} s warm-up + {a['duration']} s per step.")
    if "front_cost" in ran:
        base = f"; `_over_base`: over commit {a['baseline_sha']} in the same round" if a.get("baseline") else ""
        lines.append(f"front_cost: null model {a['size']}x{a['size']}, stream, raw uint8, concurrency "
                     f"{a['front_concurrency']}, {a['requests']} requests per step, max batch 32, 1 worker; CPU "
                     f"from /proc per image answered{base}."
                     + (f" `oip_batch{a['front_batch']}`: the same over the Open Inference Protocol, "
                        f"{a['front_batch']} images per stream message." if a.get("front_batch", 1) > 1 else ""))
    if "simulated" in ran:
        cost = a["sim_cost_ms"]
        lines.append(f"simulated: engine of {cost[0]} + {cost[1]}*b ms per batch of b, max batch {a['sim_max_batch']}, "
                     f"1 worker; images/s at concurrency {a['sim_concurrency']} over {a['sim_max_batch']} / "
                     f"({cost[0]} + {a['sim_max_batch']}*{cost[1]}) ms; p50 at concurrency 1 minus ({cost[0]} + "
                     f"{cost[1]}) ms; {a['requests']} requests per step."
                     + (f" `sim_oip_batch{a['front_batch']}`: the same images in flight as OIP stream messages of "
                        f"{a['front_batch']} images." if a.get("front_batch", 1) > 1 else ""))
    if "fronts" in ran:
        cost = a["sim_cost_ms"]
        lines.append(f"fronts: simulated engine of {cost[0]} + {cost[1]}*b ms, {a['size']}x{a['size']}, stream, "
                     f"raw uint8, concurrency {a['ceiling_concurrency']} over {a['fronts_processes']} load generator "
                     f"processes (one connection each), max batch {a['sim_max_batch']}, 1 worker, {a['requests']} "
                     f"requests per step; `--front-processes` 1, then 2.")
    if "grpc_floor" in ran:
        lines.append("grpc_floor: front_cost's load against bench/grpc_floor.py (grpcio, resnet-serve's request "
                     "parsing, a fixed answer of 5 classes per image; no batching, no engine); the CPU of its one "
                     "process per image; `_front_over_floor`: resnet-serve's front over it in the same round; "
                     "`floor_c1_p50_ms`: its p50 at concurrency 1 (classifier.v1 stream), the round trip under "
                     "`sim_c1_added_ms`; `floor_c1_held_added_ms`: the same with each answer held for the "
                     f"simulated engine's {a['sim_cost_ms'][0]} + {a['sim_cost_ms'][1]} ms on a thread, minus "
                     "that.")
    if "normalisation" in ran:
        lines.append(f"normalisation: ResNet-50 {a['size']}x{a['size']} in-process, batch {a['max_batch']}, "
                     f"{a['threads']} threads; ms per image (medians of runs timed in turn).")
    lines += [f"{a['rounds']} round(s).", "", "| headline | median | min–max |", "| --- | ---: | ---: |"]
    for key, v in s.items():
        lines.append(f"| {key} | {f(key, v['median'])} | {f(key, v['min'])}–{f(key, v['max'])} |")
    if "front_cost" in ran:
        lines += ["", *gpu_feeding_table(report)]
    if "limit_fp32_legacy_images_per_s" in s:
        lines += ["", *fast_table(report)]
    if any(c in report["rounds"][0] for c in ("batched", "unbatched", "ceiling")):
        lines += ["", *sweep_table(report["rounds"])]
    if "limit" not in report["rounds"][0]:
        return "\n".join(lines)
    limit = [r["limit"]["batches"] for r in report["rounds"]]
    lines += ["", "| in-process limit: batch size | images/s (median) | batch ms (median) |", "| ---: | ---: | ---: |"]
    for n in limit[0]:
        lines.append(f"| {n} | {statistics.median(b[n]['images_per_s'] for b in limit):.1f} | "
                     f"{statistics.median(b[n]['batch_ms'] for b in limit):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--delay-us", type=int, default=2000)
    p.add_argument("--unary-concurrency", default="1,4,16")
    p.add_argument("--stream-concurrency", default="4,16")
    p.add_argument("--ceiling-concurrency", type=int, default=128)
    p.add_argument("--ceiling-processes", type=int, default=1)
    p.add_argument("--fronts-processes", type=int, default=4,
                   help="fronts: load generator processes (connections) spread over the fronts")
    p.add_argument("--models", type=Path, default=ROOT / "bench" / "models")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS)
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--requests", type=int, default=4000,
                   help="front_cost, simulated and fronts: requests per measured step (request-bounded, not timed)")
    p.add_argument("--front-concurrency", type=int, default=128, help="front_cost: stream items in flight")
    p.add_argument("--front-batch", type=int, default=32,
                   help="front_cost: also measure OIP stream messages of this many images (1: skip)")
    p.add_argument("--sim-cost-ms", default="5,0.1", help="simulated: A,C, a batch of b takes A + C*b ms")
    p.add_argument("--sim-max-batch", type=int, default=32)
    p.add_argument("--sim-concurrency", type=int, default=256)
    p.add_argument("--baseline", metavar="REV", help="also run front_cost on REV's server (bench/baseline.py), "
                   "alternated within each round, and report ratios to it (e.g. HEAD~1)")
    args = p.parse_args(argv)
    args.unary_concurrency = [int(c) for c in args.unary_concurrency.split(",")]
    args.stream_concurrency = [int(c) for c in args.stream_concurrency.split(",")]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or not configs:
        p.error(f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGS)}")
    if set(configs) & set(CONFIGS[:6]) and not set(CONFIGS[:6]) <= set(configs):
        p.error(f"--configs: {', '.join(CONFIGS[:6])} go together (their headline needs every one)")
    if args.requests < 1:
        p.error("--requests must be at least 1")
    if not 1 <= args.front_batch <= 32:
        p.error("--front-batch must be 1..32 (the front_cost server's max batch size)")
    from resnet_serve.server.simulated_engine import parse_cost_ms

    try:
        args.sim_cost_ms = parse_cost_ms(args.sim_cost_ms)
        args.baseline_exe = None
        if args.baseline:
            args.baseline_sha, args.baseline_exe = baseline.prepare(args.baseline, log)
            args.baseline_normalise = baseline.knows_flag(args.baseline_exe, "--normalise")
    except (ValueError, subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as e:
        p.error(str(e))
    if args.baseline and "front_cost" in configs:
        configs.insert(configs.index("front_cost") + 1, "front_cost" + BASE)

    t0 = time.perf_counter()
    log(f"exporting models under {args.models} (once)")
    needed = {m for c in configs for m in NEEDS[c.split("@")[0]]}
    makers = {"resnet": lambda: ensure_model("resnet50", args.models, args.size),
              "null": lambda: ensure_model("null-sampled", args.models, args.size),
              "legacy": lambda: ensure_model("resnet50", args.models, args.size, legacy=True),
              "int8": lambda: ensure_int8_model(args.models, args.size)}
    models = {name: make() for name, make in makers.items() if name in needed}
    rounds = []
    for i in range(args.rounds):
        order = configs[i % len(configs):] + configs[:i % len(configs)]  # alternate who goes first
        if "front_cost" + BASE in order:  # and current and baseline swap places every round
            a, b = order.index("front_cost"), order.index("front_cost" + BASE)
            if (a < b) == bool(i % 2):
                order[a], order[b] = order[b], order[a]
        result: dict = {"order": list(order)}
        for name in order:
            log(f"round {i + 1}/{args.rounds}: {name}")
            result[name] = run_config(name, models, args)
        result["headline"] = headline(result, args)
        log("round {}: {}".format(i + 1, ", ".join(f"{k} {v:.3g}" for k, v in result["headline"].items())))
        rounds.append(result)
    report = {"machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rounds": rounds, "summary": summarize(rounds), "elapsed_s": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y-%m-%d')}-{report['machine']['commit']}.json"
    path.write_text(json.dumps(report, indent=1))
    table = render(report)
    print(table)
    partial = not set(CONFIGS) <= {c.split("@")[0] for c in configs}
    if partial and not args.no_docs and args.docs == DEFAULT_DOCS:
        log(f"not rewriting {DEFAULT_DOCS.relative_to(ROOT)}: only {', '.join(configs)} ran (its tables need every "
            "config; --docs PATH writes this run elsewhere)")
    elif not args.no_docs:
        args.docs.write_text("# Benchmarks\n\nProduced by `make bench` (bench/run.py; protocol in its docstring). "
                             "Rerun it to reproduce; raw numbers: `" + str(path.relative_to(ROOT)) +
                             "`.\n\n" + DOC_NOTES + "\n" + table + "\n")
    log(f"done in {report['elapsed_s'] / 60:.1f} min; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
