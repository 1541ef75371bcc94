"""The in-process limit: the predictor a CPU worker builds (resnet_serve.server.predictor, the program
predictor_config.program_served picks), called directly at each batch size with that program's own input.

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
    from resnet_serve.server.predictor_config import (
        PredictorSettings,
        effective_engine,
        effective_precision,
        program_served,
    )

    manifest = load_manifest(version_dir)
    precision, engine = effective_precision("fp32", manifest), effective_engine(engine, manifest)
    manifest = program_served(manifest, "cpu", engine)  # the program a CPU worker runs (--normalise auto)
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


def normalisation(version_dir: str, threads: int, n: int, seconds: float) -> dict:
    """Issue 17's no-regression check at the in-process limit, for a pixel-input export: one batch of n through the
    pixel program (normalised in the graph) against the same network's float program fed float input plus the
    numpy normalisation the worker did before (resnet_serve.common.imaging.Normaliser). The three are timed in
    turn, run after run, so drift hits them alike; medians in ms per image."""
    from resnet_serve.common.imaging import Normaliser
    from resnet_serve.common.modeldir import load_manifest
    from resnet_serve.server.predictor import build_predictor
    from resnet_serve.server.predictor_config import PredictorSettings

    manifest = load_manifest(version_dir)
    if not manifest.takes_pixels:
        raise SystemExit(f"{version_dir} takes float input: there is no in-graph normalisation to compare")
    predictor = build_predictor(version_dir, manifest, PredictorSettings(threads=threads, max_batch_size=n))
    h, w = manifest.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    normalise, floats = Normaliser(manifest.mean, manifest.std), np.empty((n, 3, h, w), np.float32)
    steps = {"pixel_program": lambda: predictor.run(pixels), "numpy_normalise": lambda: normalise(pixels, floats),
             "float_program": lambda: predictor.run(floats)}
    for step in steps.values():  # first runs of each shape and program are warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times["pixel_program"]) < 3:
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    ms = {k: 1000 * float(np.median(v)) / n for k, v in times.items()}
    before = ms["float_program"] + ms["numpy_normalise"]
    return {"batch": n, "threads": threads, "runs": len(times["pixel_program"]), "ms_per_image": ms,
            "in_graph_ms_per_image": ms["pixel_program"] - ms["float_program"],
            "before_ms_per_image": before, "now_over_before": ms["pixel_program"] / before}


if __name__ == "__main__":
    if sys.argv[1] == "normalisation":
        _, _, version_dir, threads, n, seconds = sys.argv
        print(json.dumps(normalisation(version_dir, int(threads), int(n), float(seconds))))
        sys.exit(0)
    version_dir, threads, sizes, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    engine = sys.argv[5] if len(sys.argv) > 5 else "paddle"
    print(json.dumps(measure(version_dir, threads, [int(s) for s in sizes.split(",")], seconds, engine)))
