"""serving_model: a version is refused before any worker starts when its folder breaks the rules; a retired
version lets the calls inside it finish (or, past its timeout, kills its workers at once); what the GPU build
reports is logged and becomes the precision served. No predictor: the version folders hold placeholder files
(tests/unit/serving_parts.py) and the engine is a stand-in for its worker processes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from resnet_serve.common.modeldir import ModelDirError
from resnet_serve.server.batcher import BatcherObserver, ShuttingDown
from resnet_serve.server.serving_model import LoadedModel, load, log_build
from resnet_serve.server.settings import Settings
from tests.unit.serving_parts import ClassPickingRunner, Parts, fake_version, run, uint8_image

# --- refusal before any worker starts ------------------------------------------------------------------------
DIFFERS = "the file differs from what manifest.json lists"


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: fake_version(d, 1, tamper="inference.pdiparams"),
     f"checksum mismatch for {{dir}}/1/inference.pdiparams: {DIFFERS}"),
    (lambda d: fake_version(d, 1, tamper="labels.txt"), f"checksum mismatch for {{dir}}/1/labels.txt: {DIFFERS}"),
    (lambda d: fake_version(d, 1, unlisted="inference.json"),
     "{dir}/1/manifest.json lists no sha256 for inference.json (in `files`)"),
    (lambda d: (d / "1").mkdir(parents=True) or d / "1", "{dir}/1/manifest.json does not exist"),
])
def test_a_version_that_breaks_the_folder_rules_is_refused_before_any_worker_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make, message: str) -> None:
    import resnet_serve.server.serving_model as serving_model

    started: list[object] = []

    def engine_stand_in(config: object) -> None:  # the worker processes' boundary: recorded, never started
        started.append(config)
        raise AssertionError("a worker would start for a refused version")

    monkeypatch.setattr(serving_model, "Engine", engine_stand_in)
    version_dir = make(tmp_path / "models")
    parts = Parts()

    async def body() -> None:
        with pytest.raises(ModelDirError) as raised:
            await load(Settings(model_dir=str(tmp_path / "models")), version_dir, BatcherObserver(), parts.pool,
                       parts.metrics)
        assert str(raised.value) == message.format(dir=tmp_path / "models")

    try:
        run(body())
    finally:
        parts.pool.shutdown()
    assert started == []


# --- retire --------------------------------------------------------------------------------------------------
class EngineStandIn:
    """Stands in for the engine's worker processes (the boundary): records how it was closed."""

    def __init__(self):
        self.closed: list[tuple] = []

    def close(self, *grace: float) -> None:
        self.closed.append(grace)


def test_retire_waits_for_the_calls_inside_then_stops_the_workers_gracefully(tmp_path: Path) -> None:
    async def body() -> None:
        async with Parts(runner=ClassPickingRunner(held=True)) as parts:
            engine = EngineStandIn()
            model = LoadedModel(tmp_path, engine, parts.batcher, parts.pipeline)  # type: ignore[arg-type]
            call = asyncio.ensure_future(parts.pipeline.classify(uint8_image(2), 1, None))
            assert await asyncio.to_thread(parts.runner.entered.wait, 30)
            retiring = asyncio.ensure_future(model.retire())
            await asyncio.sleep(0)  # ordering only: let it start waiting
            assert not retiring.done() and engine.closed == []
            parts.runner.gate.set()
            assert (await call).predictions[0].class_id == 2  # the call inside was answered
            await retiring
            assert engine.closed == [()]  # close() with its own grace: workers stop cleanly

    run(body())


def test_retire_past_its_timeout_fails_what_is_computing_and_kills_the_workers_at_once(tmp_path: Path,
                                                                                     caplog) -> None:
    async def body() -> None:
        async with Parts(runner=ClassPickingRunner(held=True), version="4") as parts:
            engine = EngineStandIn()
            model = LoadedModel(tmp_path, engine, parts.batcher, parts.pipeline)  # type: ignore[arg-type]
            call = asyncio.ensure_future(parts.pipeline.classify(uint8_image(2), 1, None))
            assert await asyncio.to_thread(parts.runner.entered.wait, 30)
            with caplog.at_level(logging.WARNING, logger="resnet_serve.server.serving_model"):
                await model.retire(timeout=0.0)
            assert engine.closed == [(0.0,)]
            with pytest.raises(ShuttingDown):
                await call
            assert "retiring version 4: calls still running after 0.0 s; killing its workers" in caplog.text

    run(body())


def test_the_loaded_model_reports_its_version_and_info_labels(tmp_path: Path) -> None:
    parts = Parts(version="9")
    model = LoadedModel(tmp_path, EngineStandIn(), parts.batcher, parts.pipeline)  # type: ignore[arg-type]
    assert model.version == "9"
    assert model.info_labels() == {"name": "tiny", "version": "9", "precision": "fp32", "device": "cpu",
                                   "engine": "paddle", "architecture": "resnet18"}
    parts.pool.shutdown()


# --- log_build -----------------------------------------------------------------------------------------------
def test_a_cpu_build_reports_the_precision_asked() -> None:
    assert log_build({}, "int8") == "int8"


def test_a_gpu_build_reports_what_tensorrt_built_and_warns_when_it_differs(caplog) -> None:
    info = {"engine": "tensorrt", "gpu": "T4", "precision_asked": "fp16", "precision_built": "fp32", "engines": 2,
            "cached": True, "cache": "/cache/x"}
    with caplog.at_level(logging.INFO, logger="resnet_serve.server.serving_model"):
        assert log_build(info, "fp16") == "fp32"
    assert "GPU engine tensorrt on T4: precision fp32 (asked fp16), 2 TensorRT engine(s), reused cache /cache/x" \
        in caplog.text
    assert "asked for fp16 but the GPU lacks fast fp16: TensorRT built fp32" in caplog.text
    assert "TensorRT built no engine" not in caplog.text


def test_a_gpu_build_without_tensorrt_engines_is_called_out(caplog) -> None:
    info = {"engine": "tensorrt", "precision_asked": "fp32", "precision_built": "fp32", "engines": 0,
            "cache": "/cache/y"}
    with caplog.at_level(logging.WARNING, logger="resnet_serve.server.serving_model"):
        assert log_build(info, "fp32") == "fp32"
    assert caplog.messages == ["TensorRT built no engine: the model runs on Paddle's GPU kernels (cache /cache/y)"]


def test_the_precision_actually_built_is_logged_and_reported(caplog) -> None:
    from resnet_serve.server.serving_model import log_build

    info = {"engine": "pir_trt", "gpu": "GTX 1080 (sm 6.1)", "precision_asked": "fp16", "precision_built": "fp32",
            "engines": 2, "cached": False, "cache": "/c/k"}
    with caplog.at_level("INFO", logger="resnet_serve.server.serving_model"):
        assert log_build(info, "fp16") == "fp32"
    assert "precision fp32 (asked fp16), 2 TensorRT engine(s)" in caplog.text
    assert any(r.levelname == "WARNING" and "TensorRT built fp32" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("INFO", logger="resnet_serve.server.serving_model"):
        assert log_build({**info, "precision_built": "fp16", "engines": 0}, "fp16") == "fp16"
    assert any("TensorRT built no engine" in r.getMessage() for r in caplog.records)
    assert log_build({}, "fp32") == "fp32"  # CPU workers build nothing to report
