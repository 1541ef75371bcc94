#!/usr/bin/env python3
"""The container's health check: asks the server's gRPC health service (grpc.health.v1) whether it is SERVING.

Exit 0 when SERVING, 1 otherwise (NOT_SERVING while the model loads and warms up or while draining, or no
answer). The address defaults to 127.0.0.1 and the server's dedicated health port, RESNET_SERVE_HEALTH_PORT
(50052), answered off the server's event loop so a burst of large requests cannot delay it; with the health port
off (-1), RESNET_SERVE_PORT (50051), the main gRPC port.
Standalone on purpose (grpcio + grpcio-health-checking only, both server dependencies), so the image needs no
probe binary.

    resnet-serve-healthcheck [--address HOST:PORT] [--service NAME] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> str:
    """The health status name the server reports for `service`, or the gRPC code name if the call failed."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def default_address(environ: Mapping[str, str] = os.environ) -> str:
    """The health port the server's settings name (as it reads them: RESNET_SERVE_*), else its gRPC port."""
    health = environ.get("RESNET_SERVE_HEALTH_PORT", "50052").strip()
    port = environ.get("RESNET_SERVE_PORT", "50051") if health == "-1" else health
    return f"127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="resnet-serve-healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--address", default=default_address(),
                   help="HOST:PORT (default: RESNET_SERVE_HEALTH_PORT, or RESNET_SERVE_PORT when that is -1)")
    p.add_argument("--service", default="", help="health service name; '' is the whole server")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    status = check(args.address, args.service, args.timeout)
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
