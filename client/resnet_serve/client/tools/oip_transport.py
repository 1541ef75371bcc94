"""The load generator's Open Inference Protocol (KServe v2) calls: the same steps, pictures and accounting as
classifier.v1 (load_steps, payloads), sent through tritonclient.grpc.aio, so one tool measures resnet-serve and a
Triton server alike. Imported only for `--protocol oip`: tritonclient is the client's optional `oip` extra."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio
from tritonclient.grpc import InferInput, InferResult
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from resnet_serve.client.channel import ChannelOptions
from resnet_serve.client.errors import ClassifierError

from .load_steps import LoadConfig, StreamFailed
from .payloads import batches

# The tensor a request carries, by --input (docs/oip.md): UINT8 [N, H, W, 3] or BYTES [N, 1], N = --batch.
INPUTS = {"raw": ("uint8_hwc", "UINT8"), "jpeg": ("encoded", "BYTES")}
# resnet-serve's in-stream errors: "[request id: <id>] <CODE>: <message>" (Triton's own only name the id).
_STREAM_ERROR = re.compile(r"^\[request id: (?P<id>[^\]]*)\] (?:(?P<code>[A-Z_]+): )?")


def new_client(target: str, options: ChannelOptions) -> InferenceServerClient:
    """tritonclient's aio client on the same channel settings (TLS, message sizes, balancing) as ours."""
    return InferenceServerClient(target, creds=options.credentials(), channel_args=options.grpc_options())


def code_of(error: InferenceServerException) -> str:
    """A failed call's gRPC code name: tritonclient keeps it as 'StatusCode.NAME'."""
    return (error.status() or "").rpartition(".")[2] or "UNKNOWN"


def infer_inputs(kind: str, hw: tuple[int, int], seed: int = 0, data: Sequence[bytes] = (),
                 batch: int = 1) -> list[InferInput]:
    """The classifier.v1 benchmark's pictures (same generator, same seed, or the same files) as OIP inputs of
    `batch` images each (payloads.batches)."""
    name, datatype = INPUTS[kind]
    out = []
    for arr in batches(kind, hw, batch=batch, seed=seed, data=data):
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


class OIPTransport:
    """A load_steps.Transport for the Open Inference Protocol: ModelInfer and ModelStreamInfer calls."""

    def __init__(self, config: LoadConfig, seed: int = 0):
        self.model = config.model
        self.timeout_s = config.timeout_s
        self.inputs = infer_inputs(config.input, config.input_hw, seed=seed, data=config.input_data,
                                   batch=config.batch)
        self.client = new_client(config.target, config.options)
        self.headers = dict(config.options.metadata) or None
        self.parameters = {"top_k": config.top_k} if config.top_k else None

    async def close(self) -> None:
        await self.client.close()

    def _input(self, n: int) -> InferInput:
        return self.inputs[n % len(self.inputs)]

    async def unary(self, n: int) -> str | None:
        try:
            await self.client.infer(self.model, [self._input(n)], parameters=self.parameters,
                                    client_timeout=self.timeout_s, headers=self.headers)
        except InferenceServerException as e:
            return code_of(e)
        return None

    async def stream(self, items: AsyncIterator[int]) -> AsyncIterator[tuple[str | None, str | None]]:
        responses = self.client.stream_infer(self._requests(items), headers=self.headers)
        try:
            async for result, error in responses:
                yield _answer(result, error)
        except (grpc.aio.AioRpcError, InferenceServerException, asyncio.InvalidStateError) as e:
            responses.cancel()
            raise StreamFailed(e.code().name if isinstance(e, grpc.aio.AioRpcError) else
                               code_of(e) if isinstance(e, InferenceServerException) else "CANCELLED") from e

    async def _requests(self, items: AsyncIterator[int]) -> AsyncIterator[dict[str, Any]]:
        """What tritonclient's stream_infer sends: one request per item."""
        async for n in items:
            yield {"model_name": self.model, "inputs": [self._input(n)], "request_id": str(n),
                   "parameters": self.parameters}


def _answer(result: InferResult | None, error: InferenceServerException | None) -> tuple[str | None, str | None]:
    """(request id, error code or None) of one stream response; the id None when an error names none."""
    if error is None:
        return result.get_response().id, None
    m = _STREAM_ERROR.match(error.message() or "")
    return (m["id"] if m else None), (m["code"] if m and m["code"] else "UNKNOWN")
