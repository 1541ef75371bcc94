"""`make gpu-check`: the GPU acceptance run, in one command, for a machine with an NVIDIA GPU (docs/gpu.md).

Needs only Paddle's GPU wheel (with TensorRT's `tensorrt-cu12` at the version it was built with) and this project
installed beside it with --no-deps. Without a usable GPU it stops at once with one line (exit 2).

1. models     ResNet-50 224 (random weights) exported as PIR and as legacy; a ResNet-18 trained on the digits
              (3 epochs, 32x32), exported as PIR and as legacy, with its held-out split
2. configs    for each of: plain GPU fp32 and fp16 (Paddle's kernels, no TensorRT), PIR-TensorRT fp32/fp16,
              classic TensorRT fp32/fp16, each model in its own short-lived process:
              - proof TensorRT ran (pd_op.tensorrt_engine ops in the converted program, or engine files in the cache)
              - agreement with CPU fp32: fp32 max|d| <= 1e-3 max|logit| (ResNet-50), fp16 >= 99% top-1 (digits)
              - images/s per batch size (ResNet-50, in process), cold start (empty cache) and cached start
              - TensorRT configs: two instances starting at once on an empty cache (digits): conversions, times
3. server     resnet-serve --device gpu (PIR-TensorRT fp16, the GPU image's default) on ResNet-50 over gRPC at
              concurrency 1, 16 and 64: images/s and its ratio to the in-process images/s of the same engine
Writes bench/results/gpu-<date>-<commit>.json and prints a short table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# name -> (engine, precision, model format)
CONFIGS = {
    "gpu_fp32": ("cuda", "fp32", "pir"),
    "gpu_fp16": ("cuda", "fp16", "pir"),
    "pir_trt_fp32": ("tensorrt", "fp32", "pir"),
    "pir_trt_fp16": ("tensorrt", "fp16", "pir"),
    "classic_trt_fp32": ("tensorrt", "fp32", "legacy"),
    "classic_trt_fp16": ("tensorrt", "fp16", "legacy"),
}
DEVICE = "gpu"
BATCHES = (1, 8, 32)
SERVER_CONFIG = "pir_trt_fp16"
SERVER_CONCURRENCY = (1, 16, 64)
FP32_RTOL = 1e-3
FP16_TOP1 = 0.99


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ preflight


def gpu_problem() -> str | None:
    """One line saying why this machine cannot run the check, or None. The first test reads Paddle's version file
    (no import), so a CPU-only install answers at once."""
    from resnet_serve.server.trt_cache import gpu_support_problem, tensorrt_install_hint

    problem = gpu_support_problem("tensorrt")
    if problem:
        return problem
    if importlib.util.find_spec("tensorrt") is None:
        return f"PIR-TensorRT needs the `tensorrt` Python module: {tensorrt_install_hint()}"
    r = subprocess.run([sys.executable, "-c", "import paddle; print(paddle.device.cuda.device_count())"],
                       capture_output=True, text=True, timeout=300)
    count = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode != 0 or not count.isdigit():
        return f"paddle could not query the GPUs: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    if int(count) == 0:
        return ("paddlepaddle-gpu is installed but sees no GPU (driver, container --gpus, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return None


# ------------------------------------------------------------------ one configuration in one process


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the predictor a worker would build, time the start (to the first answer), save the logits of the given
    inputs, and optionally measure images/s per batch size. Runs in its own process (a fresh GPU context)."""
    t0 = time.perf_counter()
    from resnet_serve.common.modeldir import load_manifest
    from resnet_serve.server.predictor import build_predictor
    from resnet_serve.server.predictor_config import PredictorSettings

    vdir = Path(spec["model_dir"])
    manifest = load_manifest(vdir)
    predictor = build_predictor(vdir, manifest, PredictorSettings(
        device=spec["device"], precision=spec["precision"], engine=spec["engine"], max_batch_size=spec["max_batch"],
        trt_cache_dir=spec.get("cache"), threads=spec.get("threads", 2)))
    info, run = predictor.build_info, predictor.run

    inputs = np.load(spec["inputs"])
    run(inputs[:1])
    start_s = time.perf_counter() - t0
    b = spec["max_batch"]
    logits = np.concatenate([run(inputs[i:i + b]) for i in range(0, len(inputs), b)])
    np.save(spec["logits"], logits.astype(np.float32))
    result: dict[str, Any] = {"start_s": round(start_s, 3), "build": info, "trt_proof": trt_proof(info)}
    if spec.get("throughput_s"):
        result["images_per_s"] = {}
        h, w = manifest.input_size
        for n in spec["batches"]:
            rng = np.random.default_rng(0)  # the program's own input (a float batch would run the float program)
            x = (rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8) if manifest.takes_pixels
                 else rng.standard_normal((n, 3, h, w)).astype(np.float32))
            run(x)  # first run of a shape
            times: list[float] = []
            while sum(times) < spec["throughput_s"] or len(times) < 3:
                t = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - t)
            result["images_per_s"][str(n)] = round(n / float(np.median(times)), 1)
    return result


def trt_proof(info: dict[str, Any]) -> dict[str, Any]:
    """What shows TensorRT ran: tensorrt_engine ops in the converted program, engine files in the cache."""
    cache = info.get("cache")
    if not cache or not Path(cache).is_dir():
        return {"tensorrt_engine_ops": 0, "engine_files": 0}
    from resnet_serve.server.trt_cache import tensorrt_engine_ops

    program = Path(cache) / "inference.json"
    ops = tensorrt_engine_ops(program.read_text(errors="replace")) if program.is_file() else 0
    files = [p for p in Path(cache).rglob("*") if p.is_file() and (p.suffix == ".trt" or "trt_serialized" in p.name)]
    return {"tensorrt_engine_ops": ops, "engine_files": len(files)}


def child(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    return json.loads(start_child(spec).communicate(timeout=timeout)[0].strip().splitlines()[-1])


def start_child(spec: dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "--child", json.dumps(spec)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


# ------------------------------------------------------------------ comparison


def agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max|d| relative to max|ref| (the fp32 gate) and top-1 agreement (the fp16 gate)."""
    return {"max_abs_diff": float(np.max(np.abs(ref - got))),
            "rel_max_abs_diff": float(np.max(np.abs(ref - got)) / max(1.0, float(np.max(np.abs(ref))))),
            "top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1)))}


def verdict(precision: str, model: str, agree: dict[str, float]) -> bool | None:
    if precision == "fp32" and model == "resnet50":
        return agree["rel_max_abs_diff"] <= FP32_RTOL
    if precision == "fp16" and model == "digits":
        return agree["top1_agreement"] >= FP16_TOP1
    return None


# ------------------------------------------------------------------ the run


def prepare_models(root: Path) -> dict[str, Path]:
    """Version directories: resnet50 / resnet50-legacy (224) and digits / digits-legacy (trained, 32)."""
    from .models import ensure_model

    models = {"resnet50": ensure_model("resnet50", root, 224) / "1",
              "resnet50-legacy": ensure_model("resnet50", root, 224, legacy=True) / "1"}
    ckpt = root / "digits-checkpoints"
    if not ckpt.is_dir():
        log("training the digits model (ResNet-18, 32x32, the default 5 epochs)")
        subprocess.run([sys.executable, "-m", "resnet_serve.train.cli", "--arch", "resnet18", "--input-size", "32",
                        "--epochs", "5", "--out", str(ckpt), "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    for name, fmt in (("digits", "pir"), ("digits-legacy", "legacy")):
        if not (root / name / "1" / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "resnet_serve.export.cli", "--checkpoint", str(ckpt),
                            "--out", str(root / name), "--name", "digits", "--format", fmt], check=True,
                            stdout=subprocess.DEVNULL)
        models[name] = root / name / "1"
    return models


def inputs_for(models: dict[str, Path], work: Path) -> dict[str, Path]:
    """Fixed model inputs: 32 seeded normal images for ResNet-50; the held-out digits (normalised for a float
    program)."""
    from resnet_serve.common.imaging import Normaliser
    from resnet_serve.common.modeldir import load_manifest
    from resnet_serve.train.data import load_digits

    rn = work / "resnet50-inputs.npy"
    np.save(rn, np.random.default_rng(1).standard_normal((32, 3, 224, 224)).astype(np.float32))
    m = load_manifest(models["digits"])
    _, held = load_digits(m.input_size[0])
    x = held.images  # a pixel-input export normalises them itself (its float program would run a float batch)
    if not m.takes_pixels:
        x = np.empty((len(held.images), 3, *m.input_size), np.float32)
        Normaliser(m.mean, m.std)(held.images, x)
    dg = work / "digits-inputs.npy"
    np.save(dg, x)
    return {"resnet50": rn, "digits": dg}


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    from resnet_serve.server.trt_cache import paddle_build

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    models = prepare_models(args.models)
    inputs = inputs_for(models, work)
    report: dict[str, Any] = {"machine": machine(paddle_build() or {}), "configs": {}, "server": {}}
    refs = {}
    for model in ("resnet50", "digits"):
        log(f"CPU fp32 reference: {model}")
        logits = work / f"cpu-{model}.npy"
        child({"model_dir": str(models[model]), "device": "cpu", "engine": "paddle", "precision": "fp32",
               "max_batch": max(BATCHES), "inputs": str(inputs[model]), "logits": str(logits)})
        refs[model] = np.load(logits)
    for name, (engine, precision, fmt) in CONFIGS.items():
        entry: dict[str, Any] = {"engine": engine, "precision": precision, "format": fmt}
        for model in ("resnet50", "digits"):
            vdir = models[model if fmt == "pir" else model + "-legacy"]
            cache = work / "cache" / f"{name}-{model}"
            shutil.rmtree(cache, ignore_errors=True)
            spec = {"model_dir": str(vdir), "device": DEVICE, "engine": engine, "precision": precision,
                    "max_batch": max(BATCHES), "cache": str(cache), "inputs": str(inputs[model]),
                    "logits": str(work / f"{name}-{model}.npy")}
            log(f"{name} {model}: cold start")
            cold = child({**spec, "batches": list(BATCHES), "throughput_s": args.seconds if model == "resnet50" else 0})
            agree = agreement(refs[model], np.load(spec["logits"]))
            log(f"{name} {model}: cached start")
            cached = child(spec)
            entry[model] = {**cold, "cached_start_s": cached["start_s"], "cache_reused": cached["build"].get("cached"),
                            "agreement": agree, "pass": verdict(precision, model, agree)}
            if engine == "tensorrt" and model == "digits":
                entry[model]["two_at_once"] = two_at_once(spec, work / "cache" / f"{name}-{model}-pair")
        report["configs"][name] = entry
    report["server"] = server_run(models["resnet50"], work / "cache" / f"{SERVER_CONFIG}-resnet50", args,
                                  report["configs"][SERVER_CONFIG]["resnet50"].get("images_per_s", {}))
    return report


def two_at_once(spec: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Two instances on one empty cache at the same moment: one converts/builds, the other reuses its output."""
    shutil.rmtree(cache, ignore_errors=True)
    procs = [start_child({**spec, "cache": str(cache), "logits": str(cache.parent / f"pair{i}.npy")})
             for i in range(2)]
    results = [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1]) for p in procs]
    return {"start_s": [r["start_s"] for r in results],
            "builds": sum(1 for r in results if not r["build"].get("cached"))}


def server_run(vdir: Path, cache: Path, args: argparse.Namespace, in_process: dict[str, float]) -> dict[str, Any]:
    from resnet_serve.client.sync import ClassifierClient
    from resnet_serve.client.tools.loadgen import LoadConfig
    from resnet_serve.client.tools.loadgen import run as run_load

    engine, precision, _ = CONFIGS[SERVER_CONFIG]
    log(f"server end to end: {SERVER_CONFIG} on ResNet-50, unary at concurrency {list(SERVER_CONCURRENCY)}")
    # `python -m`, not the console script: it works whatever directory pip put the scripts in.
    server = subprocess.Popen([sys.executable, "-m", "resnet_serve.server.cli", "--model-dir", str(vdir.parent),
                               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--health-port", "-1",
                               "--device", DEVICE, "--engine", engine, "--precision", precision,
                               "--max-batch-size", str(max(BATCHES)), "--buckets", ",".join(map(str, BATCHES)),
                               "--max-queue-size", "1024",
                               "--trt-cache-dir", str(cache.parent / "server")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"resnet-serve exited with code {server.wait()} before listening")
        target = f"127.0.0.1:{json.loads(line)['port']}"
        with ClassifierClient(target) as client:
            client.wait_until_ready(1800)
        steps = run_load(LoadConfig(target=target, mode="unary", input="raw", concurrency=SERVER_CONCURRENCY,
                                    warmup_s=2.0, duration_s=args.seconds * 2, input_hw=(224, 224)))
    finally:
        server.terminate()  # SIGTERM: the server drains and exits
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
    best = max(in_process.values(), default=0.0)
    return {"config": SERVER_CONFIG, "in_process_best_images_per_s": best,
            "steps": [{"concurrency": s["concurrency"], "images_per_s": s["images_per_s"],
                       "p50_ms": s["latency_ms"].get("p50"), "p99_ms": s["latency_ms"].get("p99"),
                       "errors": s["errors"], "server_over_in_process": round(s["images_per_s"] / best, 3)
                       if best else None} for s in steps]}


def machine(build: dict[str, Any]) -> dict[str, Any]:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else "?"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    return {"gpu": gpu, "paddle": build.get("full_version"), "cuda": build.get("cuda_version"),
            "tensorrt": build.get("tensorrt_version"), "commit": commit,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def table(report: dict[str, Any]) -> str:
    """The short table: one row per configuration."""
    rows = [f"{'config':<18} {'TRT proof':>10} {'built':>6} {'fp32 rel|d|':>11} {'fp16 top1':>9} "
            f"{'img/s b1/b8/b32':>18} {'cold s':>7} {'cached s':>8} {'pair builds':>11} pass"]
    for name, e in report["configs"].items():
        rn, dg = e["resnet50"], e["digits"]
        proof = rn["trt_proof"]
        ips = rn.get("images_per_s", {})
        passed = [v for v in (rn["pass"], dg["pass"]) if v is not None]
        rows.append(f"{name:<18} {proof['tensorrt_engine_ops']:>4}op/{proof['engine_files']:<3}f "
                    f"{rn['build'].get('precision_built', '?'):>6} {rn['agreement']['rel_max_abs_diff']:>11.2e} "
                    f"{dg['agreement']['top1_agreement']:>9.3f} "
                    f"{'/'.join(str(ips.get(str(b), '-')) for b in BATCHES):>18} {rn['start_s']:>7.1f} "
                    f"{rn['cached_start_s']:>8.1f} {str(dg.get('two_at_once', {}).get('builds', '-')):>11} "
                    f"{'yes' if all(passed) else 'NO'}")
    server = report.get("server") or {}
    if server.get("steps"):
        rows.append(f"server {server['config']} (in-process best {server['in_process_best_images_per_s']} img/s):")
        rows += [f"  concurrency {s['concurrency']:>3}: {s['images_per_s']:>8.1f} img/s  p99 {s['p99_ms']} ms  "
                 f"server/in-process {s['server_over_in_process']}" for s in server["steps"]]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=ROOT / "bench" / "models", help="where models are exported")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "gpu-work", help="caches, inputs, logits")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the JSON report goes")
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per batch size")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    problem = gpu_problem()
    if problem:
        print(f"gpu-check: {problem}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report = run_check(args)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{dt.date.today().isoformat()}-{report['machine']['commit']}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"report: {path} ({report['total_s']} s)")
    failed = [n for n, e in report["configs"].items() if any(e[m]["pass"] is False for m in ("resnet50", "digits"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
