"""Bearer-token authentication for every RPC (a grpc.aio server interceptor) and TLS credentials.

Tokens come from a file (one per line) and/or the RESNET_SERVE_AUTH_TOKENS environment variable (comma
separated); they are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc

TOKENS_ENV = "RESNET_SERVE_AUTH_TOKENS"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
# The Open Inference Protocol's liveness/readiness probes: exempt exactly when health is.
OIP_PROBES = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")


def load_tokens(token_file: str = "", environ: dict[str, str] | None = None) -> list[str]:
    """Every configured token. A source that is configured but yields none raises ValueError: serving without
    auth because a file held only a comment (or was missing) would silently open every method."""
    environ = os.environ if environ is None else environ
    tokens = []
    if TOKENS_ENV in environ:
        tokens = [t.strip() for t in environ[TOKENS_ENV].split(",") if t.strip()]
        if not tokens:
            raise ValueError(f"{TOKENS_ENV} is set but holds no token; unset it to serve without auth")
    if token_file:
        try:
            text = Path(token_file).read_text()
        except OSError as e:
            raise ValueError(f"auth token file {token_file}: {e.strerror or e}") from e
        from_file = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise ValueError(f"auth token file {token_file} holds no token (one per line, # comments)")
        tokens += from_file
    return tokens


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS with the server's certificate; with client_ca, mutual TLS (clients must present a certificate)."""
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())], root_certificates=ca,
                                       require_client_auth=bool(ca))


def _unparsed(raw: bytes) -> None:
    return None


def _aborting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts."""

    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request_or_iterator, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    # The request is never parsed: a refused caller's bytes cost nothing (and garbage cannot fail the parse).
    kw = {"request_deserializer": _unparsed, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(streaming, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless `authorization: Bearer <token>` names a known token. Health checks (and
    reflection) may be exempted so that load balancers and Kubernetes probes need no secret."""

    def __init__(self, tokens: Iterable[str], exempt_health: bool = True):
        self._tokens = [t.encode() for t in tokens]
        self._exempt = (HEALTH_PREFIX, REFLECTION_PREFIX, *OIP_PROBES) if exempt_health else ()

    def _authorised(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, given = value.strip().partition(" ")
                if scheme.lower() != "bearer":  # RFC 7235: the scheme is case-insensitive
                    continue
                given_bytes = given.strip().encode()
                return any(hmac.compare_digest(given_bytes, t) for t in self._tokens)
        return False

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        if self._authorised(handler_call_details.invocation_metadata):
            return handler
        return _aborting(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


class AdminGuard(grpc.aio.ServerInterceptor):
    """Admin RPCs exist only where a token protects them: without tokens they are PERMISSION_DENIED."""

    def __init__(self, prefix: str = "/classifier.v1.Admin/"):
        self.prefix = prefix

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is not None and handler_call_details.method.startswith(self.prefix):
            return _aborting(handler, grpc.StatusCode.PERMISSION_DENIED,
                             "admin RPCs are disabled: start the server with --auth-token-file")
        return handler
