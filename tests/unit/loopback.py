"""A real grpc.aio server on loopback for the unit tests of interceptors and client helpers: generic handlers of
raw bytes (no protobuf service, no Paddle), the interceptors under test in front of them."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import grpc


def _bytes(request) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


async def echo(request, context: grpc.aio.ServicerContext) -> bytes:
    """b"echo:" and the request (as bytes, re-serialised when it was parsed)."""
    return b"echo:" + _bytes(request)


async def echo_each(request, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"echo:" + _bytes(request)


def handlers(service: str, deserializer=None, **methods) -> grpc.GenericRpcHandler:
    """A generic handler for `service` with unary-unary (a coroutine) or unary-stream (an async generator)
    methods; requests arrive as bytes unless `deserializer` is given."""
    table = {}
    for name, fn in methods.items():
        streaming = inspect.isasyncgenfunction(fn)
        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        table[name] = make(fn, request_deserializer=deserializer)
    return grpc.method_handlers_generic_handler(service, table)


@asynccontextmanager
async def started(generic: Sequence[grpc.GenericRpcHandler], interceptors: Sequence = (),
                  servicers: Sequence = ()) -> AsyncIterator[str]:
    """A started server on 127.0.0.1, as its target; `servicers` are (add_function, servicer) pairs."""
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers(tuple(generic))
    for add, servicer in servicers:
        add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@asynccontextmanager
async def serving(generic: Sequence[grpc.GenericRpcHandler], interceptors: Sequence = (),
                  servicers: Sequence = ()) -> AsyncIterator[grpc.aio.Channel]:
    """A started server (see `started`) and a channel to it."""
    async with started(generic, interceptors, servicers) as target, grpc.aio.insecure_channel(target) as channel:
        yield channel


async def call(channel: grpc.aio.Channel, method: str, request: bytes = b"",
               metadata: Sequence[tuple[str, str]] = ()) -> bytes:
    return await channel.unary_unary(method)(request, metadata=tuple(metadata), timeout=30)


async def call_stream(channel: grpc.aio.Channel, method: str, request: bytes = b"",
                      metadata: Sequence[tuple[str, str]] = ()) -> list[bytes]:
    return [r async for r in channel.unary_stream(method)(request, metadata=tuple(metadata), timeout=30)]
