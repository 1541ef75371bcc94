"""The load generator's classifier.v1 calls on one grpc.aio channel, cheap enough not to be the bottleneck:
requests serialised once up front (payloads), unary answers not even parsed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from resnet_serve.client.channel import open_channel, target_string
from resnet_serve.client.errors import status_code
from resnet_serve.protos import classifier_pb2 as pb

from .load_steps import LoadConfig, StreamFailed
from .payloads import payloads, with_id

CLASSIFY = "/classifier.v1.Classifier/Classify"
CLASSIFY_STREAM = "/classifier.v1.Classifier/ClassifyStream"


class ClassifierTransport:
    """A load_steps.Transport for classifier.v1: Classify and ClassifyStream with bytes in (and out, for unary)."""

    def __init__(self, config: LoadConfig, seed: int = 0):
        self.timeout_s = config.timeout_s
        self.payloads = payloads(config.input, config.input_hw, config.top_k, seed=seed, data=config.input_data)
        self.channel: grpc.aio.Channel = open_channel(grpc.aio, target_string(config.target), config.options)
        self.unary_call = self.channel.unary_unary(CLASSIFY)  # bytes in, bytes out: nothing parsed
        self.bidi = self.channel.stream_stream(CLASSIFY_STREAM, response_deserializer=pb.ClassifyResponse.FromString)
        self.metadata = tuple(config.options.metadata)

    async def close(self) -> None:
        await self.channel.close()

    def _payload(self, n: int) -> bytes:
        return self.payloads[n % len(self.payloads)]

    async def unary(self, n: int) -> str | None:
        try:
            await self.unary_call(self._payload(n), timeout=self.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return None

    async def stream(self, items: AsyncIterator[int]) -> AsyncIterator[tuple[str | None, str | None]]:
        """Written by a task of its own while this reads the answers as they come."""
        call = self.bidi(metadata=self.metadata)
        writer = asyncio.create_task(self._write(call, items))
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                yield response.request_id, (status_code(response.error.code).name if response.HasField("error")
                                            else None)
            await writer
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            raise StreamFailed(e.code().name if isinstance(e, grpc.aio.AioRpcError) else "CANCELLED") from e
        finally:  # also when the reader stops early: the writer never outlives its stream
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer

    async def _write(self, call: Any, items: AsyncIterator[int]) -> None:
        async for n in items:
            await call.write(with_id(self._payload(n), str(n)))
        await call.done_writing()
