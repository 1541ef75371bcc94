"""The seam between transports and models: all a gRPC servicer (classifier.v1 or the Open Inference Protocol) may
know of the server. app.py builds one ServingHandle over its live state and hands it to every servicer; the
servicers import this module, never app.py, so there is no circle and no reach into the server's insides.

Members: what is served (`model`, `labels`, `require_model()`, `state()`), ready or not (`ready()`),
`submit()` (images -> answers), the error table (`to_error()`), metrics recording for a request (`record()`,
`stream_items`, `statistics()`), and the serving limits a transport enforces or reports (`config`). Knows gRPC
status codes; nothing of protobuf or Paddle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from resnet_serve.common.modeldir import load_manifest

from .errors import NOT_LOADED, ErrorTable, RequestError
from .metrics import Metrics
from .pipeline import Answers, ImageInput, ModelDescription, Pipeline
from .streams import HeldGauge

# The methods that carry images, whichever transport: what `statistics` counts as inference requests.
IMAGE_METHODS = ("Classify", "ClassifyStream", "ModelInfer", "ModelStreamInfer")


@dataclass(frozen=True)
class ServingConfig:
    """The server's settings a transport enforces (request ids, stream windows) or reports (OIP ModelConfig)."""

    max_request_id_length: int = 1024
    max_stream_in_flight: int = 128
    instances: int = 1
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 0


@dataclass(frozen=True)
class ModelState:
    """The model this server serves or is loading: what a repository index lists."""

    name: str
    version: str
    loaded: bool  # a version is published (it may still be not serving: draining, workers down)
    serving: bool
    failure: str | None  # why the first version failed to load


@dataclass(frozen=True)
class Statistics:
    """Cumulative counts since the server started, over every version served."""

    images: int  # images inferred (the sum of batch sizes)
    batches: int
    succeeded: int  # image requests answered OK, any transport
    failed: int
    queued: int  # images that waited in the queue
    queue_seconds: float  # their total wait


class ServingHandle:
    """A narrow view of one server for its transports. Everything is read at call time, so a hot reload switches
    every transport at once and each call sees one version."""

    def __init__(self, metrics: Metrics, config: ServingConfig, errors: ErrorTable, *,
                 pipeline: Callable[[], Pipeline | None], serving: Callable[[], bool],
                 failure: Callable[[], BaseException | None] = lambda: None,
                 loading: Callable[[], Path] | None = None):
        """`pipeline`: the serving version's (None until the first is published); `serving`: the health rule;
        `failure`: why the first version failed to load; `loading`: the version folder being loaded."""
        self.metrics, self.config, self.errors = metrics, config, errors
        self._pipeline, self._serving, self._failure, self._loading = pipeline, serving, failure, loading

    # --- what is served ------------------------------------------------------------------------------------
    @property
    def model(self) -> ModelDescription | None:
        """The serving version's description; None while the first version loads."""
        pipeline = self._pipeline()
        return pipeline.model if pipeline is not None else None

    def require_model(self) -> ModelDescription:
        """The serving version's description; RequestError UNAVAILABLE while the first version loads."""
        model = self.model
        if model is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, NOT_LOADED)
        return model

    @property
    def labels(self) -> list[str]:
        """The serving version's class labels, by class id ([] while loading)."""
        pipeline = self._pipeline()
        return pipeline.labels if pipeline is not None else []

    def ready(self) -> bool:
        """Ready to answer: the same rule grpc.health.v1, /readyz and OIP ServerReady report."""
        return self._serving()

    async def state(self) -> ModelState:
        """The served model, or before one is published the one being loaded (its manifest, read off the loop)."""
        pipeline, serving, failure = self._pipeline(), self._serving(), self._failure()
        if pipeline is not None:
            name, version = pipeline.model.name, pipeline.model.version
        elif self._loading is not None:
            manifest = await asyncio.to_thread(load_manifest, self._loading())
            name, version = manifest.name, str(manifest.version)
        else:
            name, version = "", ""
        return ModelState(name, version, pipeline is not None, serving, str(failure) if failure else None)

    # --- submit --------------------------------------------------------------------------------------------
    async def submit(self, images: Sequence[ImageInput], top_k: int, deadline: float | None) -> Answers:
        """Every image's answer, in order, all from the version serving at the call (read before any await). On
        the first failure the other images are cancelled (they leave the queue) and it is raised as the error
        table's RequestError. `top_k` 0 means the default; `deadline` is time.monotonic() based."""
        pipeline = self._pipeline()
        if pipeline is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, NOT_LOADED)
        if not images:
            return Answers.of([], pipeline.labels, pipeline.model.version)
        try:
            return await pipeline.classify_all(images, top_k, deadline)
        except (RequestError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise self.errors.to_error(e) from e

    # --- errors --------------------------------------------------------------------------------------------
    def to_error(self, exc: BaseException) -> RequestError:
        """The one table both transports answer with: same exception, same code, same message."""
        return self.errors.to_error(exc)

    # --- metrics -------------------------------------------------------------------------------------------
    def record(self, method: str, code: grpc.StatusCode, started: float | None = None,
               version: str | None = None) -> None:
        """Count one finished request; `started` (time.perf_counter() at its start) also observes its latency,
        `version` is the model version that answered it."""
        seconds = None if started is None else time.perf_counter() - started
        self.metrics.record_request(method, code.name, seconds, version)

    @property
    def stream_items(self) -> HeldGauge:
        """Counts stream items held (read and not yet answered) over every stream of every transport."""
        return self.metrics.stream_items

    def statistics(self) -> Statistics:
        m = self.metrics
        batches, queue, requests = (_sample_values(x) for x in (m.batch_size, m.queue_wait, m.requests))
        image_requests = [(dict(labels)["code"], v) for (name, labels), v in requests.items()
                          if name == "resnet_serve_requests_total" and dict(labels)["method"] in IMAGE_METHODS]
        return Statistics(
            images=int(batches[("resnet_serve_batch_size_sum", ())]),
            batches=int(batches[("resnet_serve_batch_size_count", ())]),
            succeeded=int(sum(v for code, v in image_requests if code == "OK")),
            failed=int(sum(v for code, v in image_requests if code != "OK")),
            queued=int(queue[("resnet_serve_queue_wait_seconds_count", ())]),
            queue_seconds=queue[("resnet_serve_queue_wait_seconds_sum", ())])


def call_deadline(time_remaining: float | None) -> float | None:
    """A call's time remaining (gRPC's context.time_remaining()) as a time.monotonic() deadline."""
    return None if time_remaining is None else time.monotonic() + time_remaining


def _sample_values(metric) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in metric.collect() for s in fam.samples}
