"""bench/gpu_check.py (`make gpu-check`): what can be checked without a GPU. Its one-line refusal here, and its
measuring, comparing and reporting code run on CPU with the tiny model (the GPU runs are a GPU owner's job)."""

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


def test_agreement_gates() -> None:
    ref = np.array([[1000.0, 2.0], [3.0, 4.0]])
    close = gpu_check.agreement(ref, ref + 0.5)
    far = gpu_check.agreement(ref, ref + np.array([[2.0, 0.0], [0.0, 0.0]]))
    assert gpu_check.verdict("fp32", "resnet50", close) is True  # 0.5 <= 1e-3 * 1000
    assert gpu_check.verdict("fp32", "resnet50", far) is False
    flipped = gpu_check.agreement(ref, ref[:, ::-1])
    assert flipped["top1_agreement"] == 0.0 and gpu_check.verdict("fp16", "digits", flipped) is False
    assert gpu_check.verdict("fp16", "resnet50", close) is None  # fp16 is judged on labelled digits only


def test_table_has_one_row_per_configuration() -> None:
    model = {"trt_proof": {"tensorrt_engine_ops": 2, "engine_files": 2}, "build": {"precision_built": "fp16"},
             "agreement": {"rel_max_abs_diff": 1e-4, "top1_agreement": 1.0}, "images_per_s": {"1": 100.0},
             "start_s": 60.0, "cached_start_s": 3.0, "pass": True}
    report = {"configs": {name: {"resnet50": model, "digits": {**model, "two_at_once": {"builds": 1}}}
                          for name in gpu_check.CONFIGS},
              "server": {"config": "pir_trt_fp16", "in_process_best_images_per_s": 100.0,
                         "steps": [{"concurrency": 1, "images_per_s": 80.0, "p99_ms": 5.0,
                                    "server_over_in_process": 0.8}]}}
    text = gpu_check.table(report)
    assert all(f"\n{name} " in text for name in gpu_check.CONFIGS)
    assert "server/in-process 0.8" in text
