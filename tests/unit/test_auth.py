"""auth: where tokens come from (load_tokens) and what the interceptors answer, on a real grpc.aio server over
loopback (server/resnet_serve/server/auth.py; docs/server.md)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from resnet_serve.server.auth import TOKENS_ENV, AdminGuard, BearerTokenInterceptor, load_tokens
from tests.unit.loopback import call, call_stream, echo, echo_each, handlers, serving
from tests.unit.serving_parts import run

UNARY, STREAM = "/test.Echo/Unary", "/test.Echo/Stream"
HEALTH = "/grpc.health.v1.Health/Check"
OIP_LIVE = "/inference.GRPCInferenceService/ServerLive"


# --- load_tokens ---------------------------------------------------------------------------------------------
def test_no_source_configured_means_no_tokens() -> None:
    assert load_tokens("", environ={}) == []


def test_environment_tokens_are_comma_separated_and_trimmed() -> None:
    assert load_tokens("", environ={TOKENS_ENV: " a , b,,c "}) == ["a", "b", "c"]


@pytest.mark.parametrize("value", ["", " ", ",", " , ,"])
def test_an_environment_variable_set_without_a_token_is_refused(value: str) -> None:
    with pytest.raises(ValueError) as raised:
        load_tokens("", environ={TOKENS_ENV: value})
    assert str(raised.value) == f"{TOKENS_ENV} is set but holds no token; unset it to serve without auth"


def test_a_token_file_has_one_token_per_line_with_comments_and_blanks(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# operators\n  alpha  \n\n   # indented comment\nbeta\n")
    assert load_tokens(str(f), environ={}) == ["alpha", "beta"]
    assert load_tokens(str(f), environ={TOKENS_ENV: "gamma"}) == ["gamma", "alpha", "beta"]


def test_a_token_file_with_only_comments_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError) as raised:
        load_tokens(str(f), environ={TOKENS_ENV: "from-env"})  # a token elsewhere does not excuse an empty file
    assert str(raised.value) == f"auth token file {f} holds no token (one per line, # comments)"


def test_a_missing_token_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(ValueError) as raised:
        load_tokens(str(missing), environ={})
    assert str(raised.value) == f"auth token file {missing}: No such file or directory"


# --- BearerTokenInterceptor ----------------------------------------------------------------------------------
def _refusing(data: bytes) -> bytes:
    raise ValueError("this deserializer refuses everything")


@pytest.mark.parametrize("authorization", ["Bearer good", "bearer good", "BEARER   good  ", "Bearer other"])
def test_a_known_bearer_token_passes_whatever_the_schemes_case(authorization: str) -> None:
    async def body() -> None:
        generic = handlers("test.Echo", Unary=echo, Stream=echo_each)
        async with serving([generic], [BearerTokenInterceptor(["good", "other"])]) as channel:
            assert await call(channel, UNARY, b"x", [("authorization", authorization)]) == b"echo:x"
            assert await call_stream(channel, STREAM, b"y", [("authorization", authorization)]) == [b"echo:y"]

    run(body())


@pytest.mark.parametrize("metadata", [
    [], [("authorization", "Bearer bad")], [("authorization", "Basic good")], [("authorization", "good")],
    [("authorization", "Bearer goo")], [("authorization", "Bearer goodx")], [("x-token", "Bearer good")],
])
def test_a_missing_or_unknown_token_is_unauthenticated(metadata: list[tuple[str, str]]) -> None:
    message = "missing or invalid bearer token"

    async def body() -> None:
        generic = handlers("test.Echo", Unary=echo, Stream=echo_each)
        async with serving([generic], [BearerTokenInterceptor(["good"])]) as channel:
            for method, caller in ((UNARY, call), (STREAM, call_stream)):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await caller(channel, method, b"x", metadata)
                assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)

    run(body())


def test_a_refused_callers_bytes_are_never_parsed() -> None:
    """Garbage from a caller without a token is UNAUTHENTICATED, not the parse failure it would otherwise cause."""

    async def body() -> None:
        generic = handlers("test.Echo", deserializer=_refusing, Unary=echo)
        async with serving([generic], [BearerTokenInterceptor(["good"])]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(channel, UNARY, b"\xff\xff garbage")
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run(body())


def test_health_and_oip_probes_are_exempt_unless_told_otherwise() -> None:
    async def body() -> None:
        probes = handlers("inference.GRPCInferenceService", ServerLive=echo)
        servicers = [(health_pb2_grpc.add_HealthServicer_to_server, health.aio.HealthServicer())]
        async with serving([probes], [BearerTokenInterceptor(["good"])], servicers) as channel:
            assert await call(channel, HEALTH) == b"\x08\x01"  # HealthCheckResponse(status=SERVING)
            assert await call(channel, OIP_LIVE, b"x") == b"echo:x"
        async with serving([probes], [BearerTokenInterceptor(["good"], exempt_health=False)],
                           servicers) as channel:
            for method in (HEALTH, OIP_LIVE):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call(channel, method)
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await call(channel, HEALTH, metadata=[("authorization", "Bearer good")]) == b"\x08\x01"

    run(body())


def test_an_unknown_method_stays_unimplemented_with_or_without_a_token() -> None:
    async def body() -> None:
        async with serving([handlers("test.Echo", Unary=echo)], [BearerTokenInterceptor(["good"])]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(channel, "/test.Echo/Absent")
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(body())


# --- AdminGuard ----------------------------------------------------------------------------------------------
def test_admin_rpcs_are_permission_denied_and_other_methods_pass() -> None:
    async def body() -> None:
        admin = handlers("classifier.v1.Admin", ReloadModel=echo)
        async with serving([admin, handlers("test.Echo", Unary=echo)], [AdminGuard()]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(channel, "/classifier.v1.Admin/ReloadModel", b"x")
            assert (raised.value.code(), raised.value.details()) == (
                grpc.StatusCode.PERMISSION_DENIED, "admin RPCs are disabled: start the server with --auth-token-file")
            assert await call(channel, UNARY, b"x") == b"echo:x"

    run(body())
