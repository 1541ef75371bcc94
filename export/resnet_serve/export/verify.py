"""Numerical check of an export: the dygraph model and a fresh Paddle Inference predictor on the same inputs.

The bound is relative (docs/paddle.md): random-init ResNet logits reach thousands and oneDNN differs by ~3e-6
relative, so max|dygraph - predictor| <= rtol * max(1, max|dygraph|), and top-1 must agree on every input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle

DEFAULT_RTOL = 1e-3
N_INPUTS = 8
SEED = 1234


def fixed_inputs(input_size: list[int], n: int = N_INPUTS, seed: int = SEED) -> np.ndarray:
    """Normalised-looking inputs, identical on every run (standard normal, like a normalised image)."""
    h, w = input_size
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


def dygraph_logits(model: paddle.nn.Layer, x: np.ndarray) -> np.ndarray:
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def predictor_logits(model_file: Path, params_file: Path, x: np.ndarray, threads: int = 2) -> np.ndarray:
    config = paddle.inference.Config(str(model_file), str(params_file))
    config.disable_glog_info()
    config.set_cpu_math_library_num_threads(threads)
    predictor = paddle.inference.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(x.shape))
    handle.copy_from_cpu(x)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def compare(reference: np.ndarray, candidate: np.ndarray, rtol: float = DEFAULT_RTOL) -> dict:
    """Figures recorded in the manifest; `passed` is the gate."""
    max_diff = float(np.abs(reference - candidate).max())
    max_ref = float(np.abs(reference).max())
    tolerance = rtol * max(1.0, max_ref)
    agreement = float((reference.argmax(1) == candidate.argmax(1)).mean())
    return {"max_abs_diff": max_diff, "max_abs_reference": max_ref, "tolerance": tolerance, "rtol": rtol,
            "top1_agreement": agreement, "n_inputs": int(reference.shape[0]),
            "passed": bool(max_diff <= tolerance and agreement == 1.0)}
