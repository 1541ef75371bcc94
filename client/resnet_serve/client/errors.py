"""The error a failed request raises (or, in a stream, is answered with): ClassifierError with its gRPC code."""

from __future__ import annotations

import grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ClassifierError(Exception):
    """A request that failed, with the gRPC status code the server (or the channel) gave."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.request_id = code, message, request_id

    def __eq__(self, other: object) -> bool:  # so results lists from two clients compare equal
        return (isinstance(other, ClassifierError)
                and (self.code, self.message, self.request_id) == (other.code, other.message, other.request_id))

    def __hash__(self) -> int:
        return hash((self.code, self.message, self.request_id))


def error_of(e: grpc.RpcError, request_id: str = "") -> ClassifierError:
    """A transport error (sync grpc.RpcError or grpc.aio.AioRpcError) as a ClassifierError."""
    return ClassifierError(e.code(), e.details() or "", request_id)


def status_code(value: int) -> grpc.StatusCode:
    """The numeric code an in-stream error carries (ClassifyResponse.error.code) as a grpc.StatusCode."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)
