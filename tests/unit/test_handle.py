"""handle: the seam every transport uses (the error table and message rules it applies: test_errors.py). A
ServingHandle over a real Pipeline (tests/unit/serving_parts.py: real Batcher, Preprocessor, PreprocessPool,
Metrics; the engine's workers are a numpy runner)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from resnet_serve.server.errors import ErrorTable, RequestError
from resnet_serve.server.handle import IMAGE_METHODS, ServingConfig, ServingHandle
from resnet_serve.server.metrics import Metrics
from resnet_serve.server.pipeline import ImageInput, Pipeline
from tests.unit.serving_parts import ClassPickingRunner, Parts, fake_version, run, uint8_image

Code = grpc.StatusCode


# --- the handle ----------------------------------------------------------------------------------------------
class ServerState:
    """What app.py's Server gives the handle: its current pipeline, health, load failure, folder being loaded."""

    def __init__(self, loading: Path | None = None):
        self.pipeline: Pipeline | None = None
        self.serving = False
        self.failure: BaseException | None = None
        self.loading = loading

    def handle(self, metrics: Metrics, config: ServingConfig | None = None) -> ServingHandle:
        return ServingHandle(metrics, config or ServingConfig(), ErrorTable(), pipeline=lambda: self.pipeline,
                             serving=lambda: self.serving, failure=lambda: self.failure,
                             loading=(lambda: self.loading) if self.loading else None)


def test_before_a_version_is_published_the_handle_is_unavailable_and_names_what_is_loading(tmp_path: Path) -> None:
    async def body() -> None:
        state = ServerState(loading=fake_version(tmp_path, 3))
        handle = state.handle(Metrics())
        assert handle.model is None and handle.labels == [] and not handle.ready()
        with pytest.raises(RequestError) as raised:
            handle.require_model()
        assert (raised.value.code, raised.value.message) == (Code.UNAVAILABLE, "model is loading, not serving yet")
        with pytest.raises(RequestError) as raised:
            await handle.submit([uint8_image(1)], 1, None)
        assert raised.value.code == Code.UNAVAILABLE
        s = await handle.state()
        assert (s.name, s.version, s.loaded, s.serving, s.failure) == ("tiny", "3", False, False, None)
        state.failure = RuntimeError("checksum mismatch for model.json")
        assert (await handle.state()).failure == "checksum mismatch for model.json"

    run(body())


def test_the_handle_reads_the_serving_version_at_call_time() -> None:
    async def body() -> None:
        async with Parts(version="1") as one, Parts(version="2") as two:
            state = ServerState()
            handle = state.handle(one.metrics)
            state.pipeline, state.serving = one.pipeline, True
            assert handle.model.version == "1" and handle.ready()
            assert handle.labels == one.pipeline.labels
            (a,) = await handle.submit([uint8_image(1)], 1, None)
            state.pipeline = two.pipeline  # a reload publishes version 2
            (b,) = await handle.submit([uint8_image(1)], 1, None)
            assert (a.model_version, b.model_version) == ("1", "2")
            s = await handle.state()
            assert (s.name, s.version, s.loaded, s.serving) == ("tiny", "2", True, True)

    run(body())


def test_submit_answers_every_image_in_order() -> None:
    async def body() -> None:
        async with Parts() as parts:
            state = ServerState()
            state.pipeline = parts.pipeline
            answers = await state.handle(parts.metrics).submit([uint8_image(v) for v in (3, 1, 2, 0)], 1, None)
            assert [a.predictions[0].class_id for a in answers] == [3, 1, 2, 0]

    run(body())


def test_submit_raises_the_first_failure_through_the_table_and_cancels_the_other_images() -> None:
    async def body() -> None:
        async with Parts(runner=ClassPickingRunner(held=True)) as parts:
            state = ServerState()
            state.pipeline = parts.pipeline
            handle = state.handle(parts.metrics)
            # The good images are queued or computing behind the held runner when the bad one fails.
            with pytest.raises(RequestError) as raised:
                await handle.submit([uint8_image(1), uint8_image(2), ImageInput("encoded", b"")], 1, None)
            assert (raised.value.code, raised.value.message) == (Code.INVALID_ARGUMENT, "image is empty")
            await asyncio.wait_for(parts.pipeline.wait_idle(), 30)  # the others were cancelled, none answered
            assert parts.batcher.queue_depth == 0

    run(body())


def test_submit_maps_a_batcher_refusal_through_the_table() -> None:
    async def body() -> None:
        async with Parts() as parts:
            state = ServerState()
            state.pipeline = parts.pipeline
            await parts.batcher.drain()  # draining: accepts no more work
            with pytest.raises(RequestError) as raised:
                await state.handle(parts.metrics).submit([uint8_image(1)], 1, None)
            assert (raised.value.code, raised.value.message) == (Code.UNAVAILABLE, "server is shutting down")

    run(body())


def test_requests_recorded_through_the_handle_are_what_statistics_count() -> None:
    metrics = Metrics()
    metrics.model_published("tiny", "1")
    handle = ServerState().handle(metrics, ServingConfig(max_stream_in_flight=7))
    for method in IMAGE_METHODS:
        handle.record(method, Code.OK, started=0.0, version="1")
    handle.record("ModelInfer", Code.INVALID_ARGUMENT, started=0.0)
    handle.record("GetModelInfo", Code.OK)  # not an image request
    handle.record("GetModelInfo", Code.UNAVAILABLE)
    metrics.batch_size.observe(3)
    metrics.queue_wait.observe(0.5)
    s = handle.statistics()
    assert (s.succeeded, s.failed, s.images, s.batches, s.queued, s.queue_seconds) == (4, 1, 3, 1, 1, 0.5)
    assert metrics.registry.get_sample_value("resnet_serve_requests_total", {
        "method": "ModelInfer", "code": "INVALID_ARGUMENT", "model": "tiny", "version": "1"}) == 1
    assert metrics.registry.get_sample_value("resnet_serve_request_duration_seconds_count", {
        "method": "GetModelInfo", "model": "tiny", "version": "1"}) is None  # counted, not timed
    assert handle.stream_items is metrics.stream_items and handle.config.max_stream_in_flight == 7


def test_the_transports_know_the_handle_not_the_server_nor_paddle() -> None:
    """Importing both servicers loads neither app.py (the server that builds the handle) nor the engine or Paddle."""
    import subprocess
    import sys

    code = ("import sys, resnet_serve.server.service, resnet_serve.server.oip_service; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'paddle' or m in "
            "('resnet_serve.server.app', 'resnet_serve.server.engine', 'resnet_serve.server.serving_model')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
