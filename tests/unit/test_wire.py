"""wire: image requests walked as bytes before protobuf, refused unparsed when a repeated field is far beyond any
valid request, and bytes that are not protobuf answered INVALID_ARGUMENT (server/resnet_serve/server/wire.py).
The checks directly at and one past each bound; the interceptor on a real grpc.aio server over loopback."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as oip

from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.server.wire import (
    EARLY_REFUSAL_BYTES,
    MAX_CONTENTS_ELEMENTS,
    MAX_TYPED_CONTENTS_BYTES,
    Malformed,
    RequestGuard,
    check_classify_request,
    check_infer_request,
    split_field,
)
from tests.unit.loopback import call, call_stream, echo, echo_each, handlers, serving
from tests.unit.serving_parts import run


def over_limit(check, raw: bytes) -> str:
    """The message of the check's over-the-limit refusal (not the ValueError of malformed bytes)."""
    with pytest.raises(Exception) as raised:  # noqa: PT011 - wire's refusal type is private to it
        check(memoryview(raw))
    assert not isinstance(raised.value, ValueError), raised.value
    return str(raised.value)


def classify(shape: list[int]) -> bytes:
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=shape)).SerializeToString()


def infer(shape: list[int] = (1, 3, 8, 8), **contents) -> bytes:
    tensor = oip.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=list(shape))
    if contents:
        tensor.contents.CopyFrom(oip.InferTensorContents(**contents))
    return oip.ModelInferRequest(model_name="m", inputs=[tensor]).SerializeToString()


# --- classifier.v1.ClassifyRequest -----------------------------------------------------------------------------
def test_a_valid_classify_request_passes() -> None:
    check_classify_request(memoryview(classify([224, 224, 3])))
    check_classify_request(memoryview(pb.ClassifyRequest(encoded=b"x" * 5000, request_id="r").SerializeToString()))
    check_classify_request(memoryview(b""))  # an empty message is a valid (empty) request


def test_a_shape_of_thirty_bytes_passes_and_one_more_byte_is_refused() -> None:
    # -1 as int64 takes 10 bytes: three of them are the largest 3-dimension shape; a fourth dimension of 1 byte more.
    check_classify_request(memoryview(classify([-1, -1, -1])))
    assert over_limit(check_classify_request, classify([-1, -1, -1, 1])) == (
        "tensor shape must have 3 dimensions ([H, W, 3] UINT8 or [3, H, W] FLOAT32), got about 31 or more")


def test_a_request_of_more_than_sixteen_fields_is_refused() -> None:
    field = pb.ClassifyRequest(top_k=1).SerializeToString()  # protobuf merges repeated fields: still valid
    check_classify_request(memoryview(field * 16))
    assert over_limit(check_classify_request, field * 17) == "request has more than 16 fields"


@pytest.mark.parametrize(("raw", "message"), [
    (b"\xff", "truncated varint"),
    (b"\x08" + b"\xff" * 10 + b"\x01", "truncated varint"),  # a varint longer than 64 bits
    (b"\x1a\x05abc", "field runs past the end"),
    (b"\x09abc", "field runs past the end"),  # a fixed64 of 3 bytes
    (b"\x0b", "unsupported wire type"),  # a group
])
def test_bytes_that_are_not_protobuf_are_a_value_error(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_classify_request(memoryview(raw))


# --- inference.ModelInferRequest -------------------------------------------------------------------------------
def test_an_input_shape_of_forty_bytes_passes_and_one_more_byte_is_refused() -> None:
    check_infer_request(memoryview(infer([-1, -1, -1, -1])))
    assert over_limit(check_infer_request, infer([-1, -1, -1, -1, 1])) == (
        "input shape must have 4 dimensions ([N, ...]), got about 41 or more")


def test_an_infer_request_of_sixty_four_fields_passes_and_one_more_is_refused() -> None:
    """docs/server.md "Limits": OIP request fields (parameters, inputs, outputs), 64, refused before the parse."""
    output = oip.ModelInferRequest(outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="probs")])
    field = output.SerializeToString()  # one field each: protobuf appends repeated fields
    check_infer_request(memoryview(field * 64))
    assert over_limit(check_infer_request, field * 65) == (
        "request (parameters, inputs, outputs) has more than 64 fields")


def test_typed_contents_up_to_the_limit_pass_and_one_element_more_is_refused() -> None:
    n = MAX_TYPED_CONTENTS_BYTES // 4
    check_infer_request(memoryview(infer(fp32_contents=np.zeros(n, np.float32))))
    assert over_limit(check_infer_request, infer(fp32_contents=np.zeros(n + 1, np.float32))) == (
        f"typed contents of {MAX_TYPED_CONTENTS_BYTES + 4} bytes exceed {MAX_TYPED_CONTENTS_BYTES}; "
        "send large tensors in raw_input_contents")


def test_bytes_contents_may_be_large_but_not_more_elements_than_the_limit() -> None:
    check_infer_request(memoryview(infer(bytes_contents=[b"x" * (MAX_TYPED_CONTENTS_BYTES + 1)])))
    check_infer_request(memoryview(infer(bytes_contents=[b"j"] * MAX_CONTENTS_ELEMENTS)))
    assert over_limit(check_infer_request, infer(bytes_contents=[b"j"] * (MAX_CONTENTS_ELEMENTS + 1))) == (
        f"typed contents has more than {MAX_CONTENTS_ELEMENTS} fields")


# --- the interceptor -------------------------------------------------------------------------------------------
CLASSIFY = "/classifier.v1.Classifier/Classify"


async def answer_itself(request, context) -> bytes:
    """An image method: answers a Malformed with its code and reason (as the services do)."""
    if isinstance(request, Malformed):
        return f"{request.code.name}: {request.reason}".encode()
    return b"parsed " + request.SerializeToString()


class Sizes:
    def __init__(self, admit: bool = True) -> None:
        self.received: list[int] = []
        self.asked: list[int] = []
        self.admit = admit

    def on_received(self, n: int) -> None:
        self.received.append(n)

    def admits(self, n: int) -> bool:
        self.asked.append(n)
        return self.admit


def guarded(sizes: Sizes | None = None):
    sizes = sizes or Sizes()
    generic = [handlers("classifier.v1.Classifier", pb.ClassifyRequest.FromString, Classify=answer_itself),
               handlers("test.Parsed", pb.ClassifyRequest.FromString, Unary=echo, Stream=echo_each),
               handlers("test.Raw", Unary=echo)]
    return serving(generic, [RequestGuard(sizes.on_received, sizes.admits)])


def test_an_image_method_gets_a_malformed_for_garbage_and_for_an_oversized_shape() -> None:
    async def body() -> None:
        async with guarded() as channel:
            assert await call(channel, CLASSIFY, b"\xff\xff") == (
                b"INVALID_ARGUMENT: request to Classify is not a valid protobuf message of the method's type")
            assert (await call(channel, CLASSIFY, classify([1] * 31))).startswith(
                b"INVALID_ARGUMENT: tensor shape must have 3 dimensions")
            assert await call(channel, CLASSIFY, classify([2, 2, 3])) == b"parsed " + classify([2, 2, 3])

    run(body())


def test_another_method_is_aborted_invalid_argument_for_garbage() -> None:
    message = "request to {} is not a valid protobuf message of the method's type"

    async def body() -> None:
        async with guarded() as channel:
            for method, caller in (("/test.Parsed/Unary", call), ("/test.Parsed/Stream", call_stream)):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await caller(channel, method, b"\xff\xff")
                assert (raised.value.code(), raised.value.details()) == (
                    grpc.StatusCode.INVALID_ARGUMENT, message.format(method.rsplit("/", 1)[1]))
            assert await call(channel, "/test.Parsed/Unary", classify([1])) == b"echo:" + classify([1])
            assert await call(channel, "/test.Raw/Unary", b"\xff\xff") == b"echo:\xff\xff"  # nothing to parse

    run(body())


def test_every_request_size_is_reported_and_only_large_image_requests_ask_for_room() -> None:
    sizes = Sizes(admit=False)
    big = pb.ClassifyRequest(encoded=b"x" * EARLY_REFUSAL_BYTES).SerializeToString()[:EARLY_REFUSAL_BYTES]
    small = big[:-1]
    assert len(big) == EARLY_REFUSAL_BYTES

    async def body() -> None:
        async with guarded(sizes) as channel:
            # one byte under the bound: parsed as usual (a truncated message here: an INVALID_ARGUMENT Malformed)
            assert (await call(channel, CLASSIFY, small)).startswith(b"INVALID_ARGUMENT: ")
            assert await call(channel, CLASSIFY, big) == (
                b"RESOURCE_EXHAUSTED: server is busy preprocessing images, retry later")
            assert await call(channel, "/test.Parsed/Unary", b"") == b"echo:"

    run(body())
    assert sizes.received == [EARLY_REFUSAL_BYTES - 1, EARLY_REFUSAL_BYTES, 0]
    assert sizes.asked == [EARLY_REFUSAL_BYTES]


# --- split_field --------------------------------------------------------------------------------------------------
def test_split_field_takes_out_one_field_as_views_and_keeps_the_rest_in_order() -> None:
    r = oip.ModelInferRequest(model_name="m", id="x", raw_input_contents=[b"\x00" * 300, b"ab"])
    r.inputs.add(name="image", datatype="UINT8", shape=[1, 10, 10, 3])
    r.parameters["top_k"].int64_param = 2
    raw = r.SerializeToString()
    rest, payloads = split_field(raw, 7, 64)  # ModelInferRequest.raw_input_contents
    assert [bytes(p) for p in payloads] == [b"\x00" * 300, b"ab"] and all(p.obj is raw for p in payloads)
    r.ClearField("raw_input_contents")
    assert oip.ModelInferRequest.FromString(rest) == r
    assert split_field(rest, 7, 64) == (rest, []) and split_field(rest, 7, 64)[0] is rest  # none: no copy


def test_split_field_refuses_malformed_bytes_and_too_many_fields() -> None:
    with pytest.raises(ValueError, match="runs past the end"):
        split_field(b"\x3a\x05ab", 7, 64)  # field 7 claims 5 bytes, 2 follow
    field = oip.ModelInferRequest(raw_input_contents=[b"a"]).SerializeToString()
    assert len(split_field(field * 64, 7, 64)[1]) == 64
    with pytest.raises(Exception, match="more than 64 fields"):  # noqa: PT011 - wire's refusal type is private
        split_field(field * 65, 7, 64)
