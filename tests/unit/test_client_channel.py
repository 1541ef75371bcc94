"""client channel: ChannelOptions (TLS or not, the options gRPC gets) and the target string gRPC balances over
(client/resnet_serve/client/channel.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from resnet_serve.client.channel import ChannelOptions, open_channel, target_string
from tests.unit.loopback import call, echo, handlers, started
from tests.unit.serving_parts import run


# --- ChannelOptions --------------------------------------------------------------------------------------------
def test_plaintext_by_default_with_short_reconnect_backoff_and_round_robin() -> None:
    options = ChannelOptions()
    assert not options.secure and options.credentials() is None
    assert options.grpc_options() == [
        ("grpc.max_receive_message_length", 16 * 1024 * 1024), ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.lb_policy_name", "round_robin"), ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000)]


def test_a_server_name_overrides_the_tls_name_and_extra_options_come_last() -> None:
    opts = ChannelOptions(server_name="classifier.example", extra=(("grpc.keepalive_time_ms", 1000),),
                          max_message_bytes=1, load_balancing="pick_first").grpc_options()
    assert opts[-2:] == [("grpc.ssl_target_name_override", "classifier.example"), ("grpc.keepalive_time_ms", 1000)]
    assert ("grpc.max_send_message_length", 1) in opts and ("grpc.lb_policy_name", "pick_first") in opts


@pytest.mark.parametrize("field", ["tls", "root_certificates", "client_certificate", "client_key"])
def test_any_tls_setting_makes_the_channel_secure(field: str) -> None:
    value = True if field == "tls" else Path("x.pem")
    assert ChannelOptions(**{field: value}).secure


def test_tls_alone_uses_the_systems_roots() -> None:
    assert isinstance(ChannelOptions(tls=True).credentials(), grpc.ChannelCredentials)


@pytest.mark.parametrize("field", ["client_certificate", "client_key"])
def test_half_of_a_client_certificate_is_refused_not_plaintext(field: str, tmp_path: Path) -> None:
    pem = tmp_path / "half.pem"
    pem.write_text("-----BEGIN-----")
    with pytest.raises(ValueError) as raised:
        ChannelOptions(**{field: pem}).credentials()
    assert str(raised.value) == "mTLS needs both a client certificate and its key"


def test_a_plaintext_channel_reaches_a_loopback_server() -> None:
    async def body() -> None:
        async with started([handlers("test.Echo", Unary=echo)]) as target:
            channel = open_channel(grpc.aio, target_string([target]), ChannelOptions())
            async with channel:
                assert await call(channel, "/test.Echo/Unary", b"hi") == b"echo:hi"

    run(body())


# --- target_string ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["localhost:50051", "dns:///classifier:50051", "ipv4:10.0.0.1:1,10.0.0.2:2",
                                    "ipv6:[::1]:1,[::2]:2", "dns:///a:1,b:2", "unix:///tmp/sock"])
def test_a_single_target_or_a_grpc_uri_is_used_as_it_is(target: str) -> None:
    assert target_string(target) == target


@pytest.mark.parametrize(("target", "expected"), [
    ("127.0.0.1:1,10.0.0.2:2", "ipv4:127.0.0.1:1,10.0.0.2:2"),
    (" 127.0.0.1:1 , ,10.0.0.2:2,", "ipv4:127.0.0.1:1,10.0.0.2:2"),
    (["10.0.0.1:80"], "ipv4:10.0.0.1:80"),
    (["[::1]:80", "[fe80::2]:81"], "ipv6:[::1]:80,[fe80::2]:81"),
    (["::1:80"], "ipv6:[::1]:80"),  # unbracketed: the port is after the last colon
])
def test_a_list_of_addresses_becomes_one_balanced_target(target: str | list[str], expected: str) -> None:
    assert target_string(target) == expected


@pytest.mark.parametrize(("target", "message"), [
    ([], "no address in target"),
    (",", "no address in target"),
    (["10.0.0.1:80", "[::1]:80"], "cannot mix IPv4 and IPv6 addresses in one target: 10.0.0.1:80,[::1]:80"),
    (["10.0.0.1"], "address '10.0.0.1' must be host:port"),
    (["10.0.0.1:http"], "address '10.0.0.1:http' must be host:port"),
    ([":80"], "address ':80' must be host:port"),
    ("10.0.0.1:80,10.0.0.2:", "address '10.0.0.2:' must be host:port"),
])
def test_a_bad_address_list_is_refused_naming_the_address(target: str | list[str], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        target_string(target)
    assert str(raised.value) == message
