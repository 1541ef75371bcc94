"""The one place that builds and feeds a Paddle Inference predictor.

Used by the engine worker (server/resnet_serve/server/worker.py), export verification and INT8 calibration
(resnet_serve.export) and the benchmarks (bench/limit.py, bench/gpu_check.py), so every one of them measures and
checks the configuration the server runs: the plan of ``predictor_config`` (CPU) or the TensorRT build of
``trt_cache`` (GPU). Paddle is imported only inside ``build_predictor``: importing this module leaves the front
process (and a worker that has yet to choose its GPU) free of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from resnet_serve.common.cli import framework_output
from resnet_serve.common.imaging import Normaliser
from resnet_serve.common.modeldir import Manifest, load_manifest

from .predictor_config import Plan, PredictorSettings, apply_plan, model_files


@dataclass
class Predictor:
    """A built predictor and what was built (on GPU: engine, precision actually built, cache; see trt_cache).

    ``float_program`` (pixel-input models only): builds the predictor of the export's float program, called the
    first time float32 model input arrives (docs/architecture.md, "Where normalisation happens")."""

    paddle_predictor: Any  # paddle.inference.Predictor
    manifest: Manifest
    build_info: dict[str, Any] = field(default_factory=dict)
    float_program: Callable[[], Predictor] | None = None

    def __post_init__(self) -> None:
        self.input_name: str = self.paddle_predictor.get_input_names()[0]
        self.output_name: str = self.paddle_predictor.get_output_names()[0]
        self._input = self.paddle_predictor.get_input_handle(self.input_name)
        self._output = self.paddle_predictor.get_output_handle(self.output_name)
        self._normalise = Normaliser(self.manifest.mean, self.manifest.std)
        self._float: Predictor | None = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 pixels [n, H, W, 3] or float32 model input [n, 3, H, W] -> float32 logits [n, C].

        A model that takes pixels (manifest ``input_format`` uint8_nhwc) is fed them as they are, and float input
        goes to its float program, built on first use; an older float model gets pixels normalised here as the
        server always normalised them (the manifest's mean and std). A contiguous batch of the program's own dtype
        is fed without a copy."""
        batch = np.asarray(batch)
        if self.manifest.takes_pixels:
            if batch.dtype != np.uint8:
                return self._float_predictor().run(batch)
            return self._feed(np.ascontiguousarray(batch))
        if batch.dtype == np.uint8:
            n, h, w, c = batch.shape
            batch = self._normalise(batch, np.empty((n, c, h, w), np.float32))
        return self._feed(np.ascontiguousarray(batch, dtype=np.float32))

    def _float_predictor(self) -> Predictor:
        if self._float is None:
            if self.float_program is None:
                raise ValueError(f"{self.manifest.name} v{self.manifest.version} takes uint8 pixels only: no float "
                                 "program for float32 model input")
            self._float = self.float_program()
        return self._float

    def _feed(self, batch: np.ndarray) -> np.ndarray:
        self._input.reshape(list(batch.shape))
        self._input.copy_from_cpu(batch)
        self.paddle_predictor.run()
        return np.ascontiguousarray(self._output.copy_to_cpu(), dtype=np.float32)


def float_program_builder(version_dir: Path, manifest: Manifest,
                          settings: PredictorSettings) -> Callable[[], Predictor] | None:
    """How to build the float program of a pixel-input export (None when there is none to build): the same
    settings, planned for the float program's own input. On GPU it runs on Paddle's CUDA kernels, never TensorRT:
    it is built inside the first batch that needs it, and a TensorRT build there would outlast the batch time
    limit (docs/gpu.md)."""
    if not manifest.takes_pixels or not manifest.float_model_file:
        return None
    float_manifest = manifest.float_program()
    float_settings = replace(settings, engine="cuda") if settings.device == "gpu" else settings
    return lambda: build_predictor(version_dir, float_manifest, float_settings)


def build_predictor(version_dir: Path | str, manifest: Manifest | None = None,
                    settings: PredictorSettings | None = None, plan: Plan | None = None) -> Predictor:
    """A predictor for the model in ``version_dir`` configured by ``settings`` (default: CPU, fp32, 2 threads).

    ``plan``: the settings' plan when the caller computed it already (the engine front does, once, for all its
    workers); computed here otherwise. On GPU the TensorRT cache directory depends on the GPU, which only the
    worker can ask, so trt_cache re-plans into its keyed cache directory.
    """
    version_dir = Path(version_dir)
    manifest = manifest if manifest is not None else load_manifest(version_dir)
    settings = settings if settings is not None else PredictorSettings()
    if settings.engine == "simulated":  # benchmarks only: no Paddle, a + c*b ms per batch
        from .simulated_engine import SimulatedPredictor

        return SimulatedPredictor(manifest, settings.simulated_cost_ms)  # type: ignore[return-value]
    plan = plan if plan is not None else settings.plan(version_dir, manifest)
    if settings.device == "gpu":
        from .trt_cache import build_gpu_predictor  # the TensorRT conversion and its cache live there

        predictor, info = build_gpu_predictor(version_dir, manifest, settings, plan)
        return Predictor(predictor, manifest, info, float_program_builder(version_dir, manifest, settings))
    import paddle.inference as paddle_infer

    config = paddle_infer.Config(*model_files(version_dir, manifest, plan))
    apply_plan(config, plan)
    with framework_output():  # oneDNN INT8 passes print to stderr even with glog info off
        return Predictor(paddle_infer.create_predictor(config), manifest,
                         float_program=float_program_builder(version_dir, manifest, settings))
