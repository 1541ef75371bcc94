"""client base: the settings and per-call details both clients share (client/resnet_serve/client/base.py)."""

from __future__ import annotations

import pytest

from resnet_serve.client.base import ClientBase
from resnet_serve.client.channel import ChannelOptions
from resnet_serve.client.retry import RetryPolicy


def test_defaults_are_plaintext_the_default_retry_and_thirty_seconds() -> None:
    client = ClientBase("localhost:50051")
    assert (client.target, client.options, client.retry, client.timeout) == (
        "localhost:50051", ChannelOptions(), RetryPolicy(), 30.0)


def test_the_target_is_made_a_balanced_one_and_refused_when_bad() -> None:
    assert ClientBase(["10.0.0.1:1", "10.0.0.2:2"]).target == "ipv4:10.0.0.1:1,10.0.0.2:2"
    with pytest.raises(ValueError, match="must be host:port"):
        ClientBase("10.0.0.1,10.0.0.2")


def test_the_options_metadata_comes_first_then_the_calls_own() -> None:
    client = ClientBase("h:1", ChannelOptions(metadata=(("authorization", "Bearer t"),)))
    assert client.call_metadata(None) == [("authorization", "Bearer t")]
    assert client.call_metadata([("x-trace", "1")]) == [("authorization", "Bearer t"), ("x-trace", "1")]


def test_a_calls_timeout_wins_even_when_zero_and_none_means_the_clients() -> None:
    client = ClientBase("h:1", timeout=5.0)
    assert (client.call_timeout(None), client.call_timeout(0.0), client.call_timeout(2.5)) == (5.0, 0.0, 2.5)
    assert ClientBase("h:1", timeout=None).call_timeout(None) is None


def test_request_ids_are_unique_per_client() -> None:
    a, b = ClientBase("h:1"), ClientBase("h:1")
    assert [a.next_request_id() for _ in range(3)] == ["0", "1", "2"]
    assert b.next_request_id() == "0"
