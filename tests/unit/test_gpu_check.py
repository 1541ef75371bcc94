"""bench/gpu_check.py (`make gpu-check`): its agreement gates and its report table, on made-up figures (the
measuring half, on CPU with the tiny model: tests/integration/test_gpu_check.py)."""

from __future__ import annotations

import numpy as np

from bench import gpu_check


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
