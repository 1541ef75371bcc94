"""One served model version: its engine workers, batcher and pipeline, built, warmed and retired together.

A reload builds the next LoadedModel beside the current one, switches traffic by replacing one reference, and
retires the old one once the calls inside it are done, so no request is dropped across the switch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from resnet_serve.common.modeldir import load_manifest

from .admission import PreprocessPool
from .batcher import Batcher, BatcherObserver, BatchPolicy
from .engine import Engine, EngineConfig
from .pipeline import ModelDescription, Pipeline
from .predictor_config import effective_engine, effective_precision
from .preprocess import Preprocessor
from .settings import Settings

log = logging.getLogger(__name__)
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class LoadedModel:
    version_dir: Path
    engine: Engine
    batcher: Batcher
    pipeline: Pipeline

    @property
    def version(self) -> str:
        return self.pipeline.model.version

    def info_labels(self) -> dict[str, str]:
        m = self.pipeline.model
        return {"name": m.name, "version": m.version, "precision": m.precision, "device": m.device,
                "engine": m.engine, "architecture": m.architecture}

    async def retire(self, timeout: float | None = None) -> None:
        """Let every call that entered finish, then stop the batcher and the workers. After `timeout` seconds
        (shutdown), stop waiting: what is still queued or computing fails, and the workers are killed at once,
        so a hung worker never holds up the exit."""
        try:
            await asyncio.wait_for(self._drain(), timeout)
            grace = None
        except asyncio.TimeoutError:
            log.warning("retiring version %s: calls still running after %.1f s; killing its workers",
                        self.version, timeout)
            grace = 0.0
        await self.batcher.stop()
        close = self.engine.close if grace is None else partial(self.engine.close, grace)
        await asyncio.get_running_loop().run_in_executor(None, close)

    async def _drain(self) -> None:
        await self.pipeline.wait_idle()
        await self.batcher.drain()


def log_build(info: dict, asked: str) -> str:
    """Log what a GPU worker built and return the precision actually built (reported by GetModelInfo and the info
    metric): PIR-TensorRT silently builds fp32 on GPUs without fast fp16."""
    if not info:
        return asked
    log.info("GPU engine %s on %s: precision %s (asked %s), %s TensorRT engine(s), %s cache %s",
             info.get("engine"), info.get("gpu", "?"), info.get("precision_built"), info.get("precision_asked"),
             info.get("engines", 0), "reused" if info.get("cached") else "new", info.get("cache", "-"))
    if info.get("precision_built") != info.get("precision_asked"):
        log.warning("asked for %s but the GPU lacks fast %s: TensorRT built %s", info.get("precision_asked"),
                    info.get("precision_asked"), info.get("precision_built"))
    if info.get("engine") != "cuda" and not info.get("engines"):
        log.warning("TensorRT built no engine: the model runs on Paddle's GPU kernels (cache %s)", info.get("cache"))
    return str(info.get("precision_built") or asked)


async def load(settings: Settings, version_dir: Path, observer: BatcherObserver, pool: PreprocessPool, metrics,
               on_worker_event: Callable[[str, int], None] | None = None,
               wrap_runner: Callable[[Runner], Runner] | None = None,
               on_dispatch: Callable[[int, int], None] | None = None, worker_sockets: bool = False,
               attach_to: Path | None = None) -> LoadedModel:
    """Spawn and warm the workers (off the event loop), then build batcher and pipeline. Raises on failure,
    leaving no worker behind."""
    s = settings
    # What actually computes the answers (an int8 export runs int8; --engine overrides the manifest's engine):
    # the same values configure the workers and are reported by GetModelInfo and the info metric.
    loop = asyncio.get_running_loop()
    # Hashing the parameters takes a while: off the event loop. A mismatch raises ModelDirError (refused).
    manifest = await loop.run_in_executor(None, partial(load_manifest, version_dir, verify_checksums=True))
    precision, engine_name = (effective_precision(s.precision, manifest),
                              effective_engine(s.engine, manifest, s.device))
    engine = Engine(EngineConfig(version_dir=version_dir, instances=s.instances,
                                 threads_per_instance=s.threads_per_instance, device=s.device, precision=precision,
                                 engine=engine_name, max_batch_size=s.max_batch_size, buckets=s.bucket_sizes(),
                                 trt_cache_dir=Path(s.trt_cache_dir) if s.trt_cache_dir else None,
                                 start_timeout_s=s.worker_start_timeout_s, gpus=s.gpu_ids(),
                                 batch_time_limit_s=s.batch_time_limit_s, batches_in_flight=s.batches_in_flight,
                                 simulated_cost_ms=s.simulated_cost(), normalise=s.normalise,
                                 worker_sockets=worker_sockets, attach_to=attach_to),
                    manifest=manifest, on_worker_event=on_worker_event, on_dispatch=on_dispatch)
    try:
        await loop.run_in_executor(None, engine.start)
    except BaseException:
        await loop.run_in_executor(None, engine.close)
        raise
    m = engine.manifest
    if engine_name == "simulated":
        log.warning("engine simulated (benchmarks only): no model runs; a batch of b takes %g + %g*b ms and its "
                    "answers are a function of the pixels", *s.simulated_cost())
    precision = log_build(engine.build_info, precision)
    runners = engine.runners()
    if wrap_runner is not None:
        runners = [wrap_runner(r) for r in runners]
    batcher = Batcher(runners, BatchPolicy(s.max_batch_size, s.max_queue_delay_us, s.max_queue_size,
                                           s.bucket_sizes()), observer)
    await batcher.start()
    model = ModelDescription(
        name=m.name, version=str(m.version), architecture=m.architecture, input_shape=engine.input_shape,
        num_classes=m.num_classes, precision=precision, max_batch_size=s.max_batch_size, device=s.device,
        engine=engine_name,
        mean=tuple(m.mean), std=tuple(m.std))
    preprocessor = Preprocessor(tuple(m.input_size), s.max_pixels, s.max_aspect_ratio)
    pipeline = Pipeline(batcher, preprocessor, engine.labels, model, metrics, pool)
    log.info("loaded %s v%s (%s) from %s: load %.2f s, warm-up %.2f s of buckets %s; batch time limit %.1f s; "
             "pixels normalised by the %s", m.name, m.version, m.architecture, version_dir, engine.load_seconds,
             engine.warmup_seconds, list(s.bucket_sizes()), engine.batch_time_limit_s,
             "exported program" if engine.normalised_by == "graph" else "worker (numpy)")
    return LoadedModel(version_dir, engine, batcher, pipeline)
