"""Numerical check of an export: the dygraph model and a fresh Paddle Inference predictor on the same inputs.

The predictor is the server's own (resnet_serve.server.predictor, configured by the plan a server worker uses), so
an export passes only if what the server will run agrees with the model that was trained.

A pixel-input export (manifest ``input_format`` uint8_nhwc) is checked on uint8 pixels against the network fed
the same pixels normalised in numpy, as the server normalised them before the graph did; its float program on
those normalised pixels against the same reference.

The bound is relative (docs/paddle.md): random-init ResNet logits reach thousands and oneDNN differs by ~3e-6
relative, so max|dygraph - predictor| <= rtol * max(1, max|dygraph|), and top-1 must agree on every input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import paddle

from resnet_serve.common.imaging import IMAGENET_MEAN, IMAGENET_STD, normalise
from resnet_serve.common.modeldir import Manifest
from resnet_serve.server.predictor import build_predictor
from resnet_serve.server.predictor_config import PredictorSettings

DEFAULT_RTOL = 1e-3
N_INPUTS = 8
SEED = 1234


def fixed_inputs(input_size: list[int], n: int = N_INPUTS, seed: int = SEED) -> np.ndarray:
    """Normalised-looking inputs, identical on every run (standard normal, like a normalised image)."""
    h, w = input_size
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


def fixed_pixels(input_size: list[int], n: int = N_INPUTS, seed: int = SEED) -> np.ndarray:
    """uint8 pixels [n, H, W, 3] over the whole 0..255 range, identical on every run: what a pixel-input program
    is fed."""
    h, w = input_size
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def dygraph_logits(model: paddle.nn.Layer, x: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """The trained network's logits for float model input, or for uint8 pixels normalised by the server's numpy
    normaliser (resnet_serve.common.imaging.normalise, with ``mean``/``std``): the reference a pixel-input program
    must match, its in-graph normalisation included."""
    if x.dtype == np.uint8:
        x = normalise(x, mean, std)
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def predictor_logits(version_dir: Path, manifest: Manifest, *inputs: np.ndarray, threads: int = 2) -> np.ndarray:
    """Logits of the model in ``version_dir`` (described by ``manifest``) from a predictor built as a CPU server
    worker builds it, for each of ``inputs`` in turn (uint8 pixels or float model input; float input to a
    pixel-input model runs its float program, as in serving), stacked: [len(inputs), n, C], or [n, C] for one."""
    predictor = build_predictor(version_dir, manifest, PredictorSettings(threads=threads))
    out = np.stack([predictor.run(x) for x in inputs])
    return out[0] if len(inputs) == 1 else out


def compare(reference: np.ndarray, candidate: np.ndarray, rtol: float = DEFAULT_RTOL) -> dict:
    """Figures recorded in the manifest; `passed` is the gate."""
    max_diff = float(np.abs(reference - candidate).max())
    max_ref = float(np.abs(reference).max())
    tolerance = rtol * max(1.0, max_ref)
    agreement = float((reference.argmax(1) == candidate.argmax(1)).mean())
    return {"max_abs_diff": max_diff, "max_abs_reference": max_ref, "tolerance": tolerance, "rtol": rtol,
            "top1_agreement": agreement, "n_inputs": int(reference.shape[0]),
            "passed": bool(max_diff <= tolerance and agreement == 1.0)}
