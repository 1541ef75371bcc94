"""How a client reaches the server: ChannelOptions (TLS, mTLS, per-call metadata such as a bearer token, load
balancing, reconnect backoff), the target string gRPC balances over, and opening the channel."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach the server: TLS material, per-call metadata (e.g. a bearer token), load balancing."""

    root_certificates: Path | None = None  # CA bundle: enables TLS
    client_certificate: Path | None = None  # mTLS (with client_key)
    client_key: Path | None = None
    metadata: Sequence[tuple[str, str]] = ()
    max_message_bytes: int = 16 * 1024 * 1024
    load_balancing: str = "round_robin"  # spreads calls over every address a target resolves to
    extra: Sequence[tuple[str, object]] = field(default_factory=tuple)
    tls: bool = False  # TLS with the system's roots even without root_certificates
    server_name: str | None = None  # TLS name to check when the target is an IP address or a list
    # gRPC's own reconnect backoff starts at 1 s and grows to 120 s, which would make our retries fail fast
    # for minutes after a server restart; a client that retries wants it short.
    reconnect_backoff_ms: tuple[int, int] = (100, 2000)

    @property
    def secure(self) -> bool:
        return bool(self.tls or self.root_certificates or self.client_certificate or self.client_key)

    def grpc_options(self) -> list[tuple[str, object]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.lb_policy_name", self.load_balancing),
            ("grpc.initial_reconnect_backoff_ms", self.reconnect_backoff_ms[0]),
            ("grpc.min_reconnect_backoff_ms", self.reconnect_backoff_ms[0]),
            ("grpc.max_reconnect_backoff_ms", self.reconnect_backoff_ms[1])]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return [*opts, *self.extra]

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None for plaintext. A client certificate without its key (or the reverse) is a ValueError, not a
        silent fall-back to plaintext."""
        if not self.secure:
            return None
        if bool(self.client_certificate) != bool(self.client_key):
            raise ValueError("mTLS needs both a client certificate and its key")
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.root_certificates), read(self.client_key),
                                            read(self.client_certificate))


def open_channel(api: Any, target: str, options: ChannelOptions) -> Any:
    """`api` is the grpc module or grpc.aio: both spell channel creation the same way."""
    creds = options.credentials()
    opts = options.grpc_options()
    return api.secure_channel(target, creds, opts) if creds else api.insecure_channel(target, opts)


def target_string(target: str | Sequence[str]) -> str:
    """host:port and dns:///host:port are used as they are; a list of addresses (or a comma-separated string)
    becomes an ipv4:/ipv6: target that gRPC balances over, host names resolved once here."""
    if isinstance(target, str):
        if "," not in target or "://" in target or target.startswith(("ipv4:", "ipv6:")):
            return target
        target = [t.strip() for t in target.split(",") if t.strip()]
    addrs = [_ip_address(a) for a in target]
    if not addrs:
        raise ValueError("no address in target")
    v6 = [a.startswith("[") for a in addrs]
    if any(v6) and not all(v6):
        raise ValueError(f"cannot mix IPv4 and IPv6 addresses in one target: {','.join(addrs)}")
    return f"{'ipv6' if all(v6) else 'ipv4'}:{','.join(addrs)}"


def _ip_address(addr: str) -> str:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {addr!r} must be host:port")
    bare = host.strip("[]")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.getaddrinfo(bare, int(port), proto=socket.IPPROTO_TCP)[0][4][0])
        except (OSError, UnicodeError) as e:
            raise ValueError(f"cannot resolve {bare!r}: {e}") from e
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
