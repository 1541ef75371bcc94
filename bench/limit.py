"""The in-process limit: the predictor a worker builds (resnet_serve.server.predictor), called directly at each
batch size.

Run as a subprocess by bench/run.py (so the benchmark's own process never imports Paddle); prints JSON.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def measure(version_dir: str, threads: int, sizes: list[int], seconds: float, engine: str = "paddle") -> dict:
    from resnet_serve.common.modeldir import load_manifest
    from resnet_serve.server.predictor import build_predictor
    from resnet_serve.server.predictor_config import PredictorSettings, effective_engine, effective_precision

    manifest = load_manifest(version_dir)
    precision, engine = effective_precision("fp32", manifest), effective_engine(engine, manifest)
    predictor = build_predictor(version_dir, manifest, PredictorSettings(
        precision=precision, threads=threads, max_batch_size=max(sizes), engine=engine))
    h, w = manifest.input_size
    out: dict = {"threads": threads, "precision": precision, "engine": engine, "format": manifest.format,
                 "batches": {}}
    for n in sizes:
        rng = np.random.default_rng(0)  # the program's own input: pixels, or float model input for older exports
        x = (rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8) if manifest.takes_pixels
             else rng.standard_normal((n, 3, h, w)).astype(np.float32))
        times = []
        for i in range(10_000):
            t0 = time.perf_counter()
            predictor.run(x)
            if i > 0:  # the first run of a shape is the slow warm-up
                times.append(time.perf_counter() - t0)
            if sum(times) > seconds and len(times) >= 3:
                break
        med = float(np.median(times))
        out["batches"][str(n)] = {"images_per_s": n / med, "batch_ms": 1000 * med, "runs": len(times)}
    out["best_images_per_s"] = max(b["images_per_s"] for b in out["batches"].values())
    out["batch1_ms"] = out["batches"]["1"]["batch_ms"]
    return out


if __name__ == "__main__":
    version_dir, threads, sizes, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    engine = sys.argv[5] if len(sys.argv) > 5 else "paddle"
    print(json.dumps(measure(version_dir, threads, [int(s) for s in sizes.split(",")], seconds, engine)))
