"""The load generator over the Open Inference Protocol (KServe v2): the same steps, pictures and accounting as
classifier.v1 (resnet_serve.client.loadgen), sent through tritonclient.grpc.aio, so one tool measures resnet-serve and a
Triton server alike. Imported only for `--protocol oip` (tritonclient stays off the classifier.v1 path)."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio
import numpy as np
from tritonclient.grpc import InferInput, InferResult
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from resnet_serve.protos import classifier_pb2 as pb

from .common import ChannelOptions, ClassifierError
from .loadgen import LoadConfig, Recorder, StepRunner, payloads

# The tensors a request carries, by --input (docs/oip.md): one image per request, batch dimension 1.
INPUTS = {"raw": ("uint8_hwc", "UINT8"), "jpeg": ("encoded", "BYTES")}
# resnet-serve's in-stream errors: "[request id: <id>] <CODE>: <message>" (Triton's own only name the id).
_STREAM_ERROR = re.compile(r"^\[request id: (?P<id>[^\]]*)\] (?:(?P<code>[A-Z_]+): )?")


def new_client(target: str, options: ChannelOptions) -> InferenceServerClient:
    """tritonclient's aio client on the same channel settings (TLS, message sizes, balancing) as ours."""
    return InferenceServerClient(target, creds=options.credentials(), channel_args=options.grpc_options())


def code_of(error: InferenceServerException) -> str:
    """A failed call's gRPC code name: tritonclient keeps it as 'StatusCode.NAME'."""
    return (error.status() or "").rpartition(".")[2] or "UNKNOWN"


def infer_inputs(kind: str, hw: tuple[int, int], seed: int = 0, data: Sequence[bytes] = ()) -> list[InferInput]:
    """The classifier.v1 benchmark's pictures (same generator, same seed, or the same files) as OIP inputs of one
    image each."""
    name, datatype = INPUTS[kind]
    out = []
    for blob in payloads(kind, hw, seed=seed, data=data):
        req = pb.ClassifyRequest.FromString(blob)
        if kind == "raw":
            arr = np.frombuffer(req.tensor.data, dtype=np.uint8).reshape(1, *req.tensor.shape)
        else:
            arr = np.array([[req.encoded]], dtype=np.object_)
        tensor = InferInput(name, list(arr.shape), datatype)
        tensor.set_data_from_numpy(arr)
        out.append(tensor)
    return out


async def model_facts(target: str, model: str, options: ChannelOptions) -> tuple[dict[str, Any], tuple[int, int]]:
    """ModelMetadata: the model's description and its input (H, W), from the FP32 [N, 3, H, W] input (224x224
    when no input states it)."""
    client = new_client(target, options)
    try:
        meta = await client.get_model_metadata(model, headers=dict(options.metadata) or None, client_timeout=30)
    except InferenceServerException as e:  # the CLI reports it like any failed call: code and message, exit 1
        raise ClassifierError(getattr(grpc.StatusCode, code_of(e), grpc.StatusCode.UNKNOWN), e.message()) from e
    finally:
        await client.close()
    hw = (224, 224)
    for t in meta.inputs:
        if len(t.shape) == 4 and t.shape[1] == 3 and min(t.shape[2:]) > 0:
            hw = (int(t.shape[2]), int(t.shape[3]))
    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform}, hw


class OIPStepRunner(StepRunner):
    """StepRunner's steps (closed loop, open loop, streams) with ModelInfer / ModelStreamInfer calls."""

    def __init__(self, config: LoadConfig, seed: int = 0, requests: int = 0):  # no super().__init__: no v1 channel
        self.config = config
        self.requests = requests
        self.inputs = infer_inputs(config.input, config.input_hw, seed=seed, data=config.input_data)
        self.rng = random.Random(seed)
        self.client = new_client(config.target, config.options)
        self.headers = dict(config.options.metadata) or None
        self.parameters = {"top_k": config.top_k} if config.top_k else None
        self._n = 0

    async def close(self) -> None:
        await self.client.close()

    def _input(self) -> InferInput:
        self._n += 1
        return self.inputs[self._n % len(self.inputs)]

    async def _one_unary(self, rec: Recorder, t0: float) -> None:
        rec.sent(t0)
        code = None
        try:
            await self.client.infer(self.config.model, [self._input()], parameters=self.parameters,
                                    client_timeout=self.config.timeout_s, headers=self.headers)
        except InferenceServerException as e:
            code = code_of(e)
        rec.done(t0, time.perf_counter(), code)

    async def _stream(self, rec: Recorder, next_send: Callable[[], Awaitable[float | None]],
                      on_answer: Callable[[], None]) -> None:
        """Items over one ModelStreamInfer call until next_send() says stop; a stream that fails counts its
        unanswered items as errors of its code and is replaced while the step lasts."""
        more = True
        while more:
            sent_at: dict[str, float] = {}
            responses = self.client.stream_infer(self._requests(rec, sent_at, next_send), headers=self.headers)
            try:
                async for result, error in responses:
                    rid, code = _answer(result, error, sent_at)
                    rec.done(sent_at.pop(rid), time.perf_counter(), code)
                    on_answer()
                more = False
            except (grpc.aio.AioRpcError, InferenceServerException, asyncio.InvalidStateError) as e:
                responses.cancel()
                code = (e.code().name if isinstance(e, grpc.aio.AioRpcError) else
                        code_of(e) if isinstance(e, InferenceServerException) else "CANCELLED")
                now = time.perf_counter()
                for t0 in sent_at.values():
                    rec.done(t0, now, code)
                    on_answer()
                more = rec.open(now)

    async def _requests(self, rec: Recorder, sent_at: dict[str, float],
                        next_send: Callable[[], Awaitable[float | None]]) -> AsyncIterator[dict[str, Any]]:
        """What tritonclient's stream_infer sends: one request per send time next_send() gives."""
        while (t := await next_send()) is not None:
            tensor = self._input()
            rid = str(self._n)
            sent_at[rid] = t
            rec.sent(t)
            yield {"model_name": self.config.model, "inputs": [tensor], "request_id": rid,
                   "parameters": self.parameters}


def _answer(result: InferResult | None, error: InferenceServerException | None,
            sent_at: dict[str, float]) -> tuple[str, str | None]:
    """(request id, error code or None) of one stream response. An error that names no id we sent is put on
    the oldest unanswered request, so counts stay exact."""
    if error is None:
        return result.get_response().id, None
    m = _STREAM_ERROR.match(error.message() or "")
    rid = m["id"] if m and m["id"] in sent_at else next(iter(sent_at))
    return rid, (m["code"] if m and m["code"] else "UNKNOWN")
