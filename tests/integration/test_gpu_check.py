"""bench/gpu_check.py (`make gpu-check`): what can be checked without a GPU. Its one-line refusal here, and its
measuring code run on CPU with the tiny model (the GPU runs are a GPU owner's job). Its comparing and reporting
code: tests/unit/test_gpu_check.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from bench import gpu_check
from tests.harness import ROOT


def test_without_a_gpu_it_stops_at_once_with_one_line() -> None:
    r = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "gpu-check", f"GPU_PYTHON={sys.executable}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    direct = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert direct.returncode == 2 and direct.stdout == ""
    lines = direct.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: ") and "paddlepaddle-gpu" in lines[0]
    assert lines[0] in r.stderr


def test_measure_child_on_cpu_saves_logits_and_rates(tiny_model_dir: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    out = gpu_check.measure({"model_dir": str(tiny_model_dir / "1"), "device": "cpu", "engine": "paddle",
                             "precision": "fp32", "max_batch": 2, "threads": 1, "inputs": str(tmp_path / "in.npy"),
                             "logits": str(tmp_path / "out.npy"), "batches": [1, 2], "throughput_s": 0.05})
    logits = np.load(tmp_path / "out.npy")
    assert logits.shape == (5, 10) and np.isfinite(logits).all()
    assert out["start_s"] > 0 and set(out["images_per_s"]) == {"1", "2"}
    assert out["trt_proof"] == {"tensorrt_engine_ops": 0, "engine_files": 0}  # no TensorRT on CPU: no proof
