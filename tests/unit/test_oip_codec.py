"""oip_codec: the Open Inference Protocol messages <-> the server's values, without a server. Each refusal is
checked for its code and its exact message (they go back to Triton/KServe clients as they are)."""

from __future__ import annotations

import struct
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from resnet_serve.server.errors import RequestError
from resnet_serve.server.handle import ServingConfig
from resnet_serve.server.oip_codec import (
    bytes_element,
    bytes_tensor,
    check_model,
    deadline_of,
    images_of,
    input_metadata,
    int_parameter,
    label_elements,
    model_config_of,
    model_metadata_of,
    parse_infer_request,
    requested_outputs,
    response_of,
    split_bytes,
    stream_error_of,
    top_k_of,
    typed_pixels,
    with_id,
)
from resnet_serve.server.pipeline import Answer, Answers, ImageInput, Prediction, TopK
from tests.unit.serving_parts import description

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def refused(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as raised:
        fn(*args)
    return raised.value


def request(name: str, datatype: str, shape: list[int], raw: bytes | None = None) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="tiny", id="req-1")
    r.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        r.raw_input_contents.append(raw)
    return r


# --- BYTES tensors -------------------------------------------------------------------------------------------
def test_bytes_tensor_round_trips_through_split_bytes() -> None:
    items = [b"", b"a", b"\x00" * 300, "é".encode()]
    raw = bytes_tensor(items)
    assert raw[:4] == struct.pack("<I", 0) and len(raw) == 4 * 4 + 0 + 1 + 300 + 2
    assert split_bytes(raw, 4) == items


@pytest.mark.parametrize(("raw", "n", "message"), [
    (struct.pack("<I", 1) + b"a" + b"\x01\x00", 2, "BYTES tensor is malformed: truncated element length"),
    (struct.pack("<I", 5) + b"abc", 1, "BYTES tensor is malformed: element runs past the end of the data"),
    (bytes_tensor([b"a", b"b", b"c"]), 2, "input 'encoded' needs 2 elements, the data holds more"),
])
def test_split_bytes_refuses_malformed_data(raw: bytes, n: int, message: str) -> None:
    e = refused(split_bytes, raw, n)
    assert (e.code, e.message) == (INVALID, message)


def test_split_bytes_refuses_data_past_n_elements_without_reading_it() -> None:
    """Whatever follows the n-th element is refused unread: a million tiny elements cost no more than n."""
    raw = bytes_tensor([b"x"]) + b"\xff" * 3  # read as a length, this would be "truncated"
    assert refused(split_bytes, raw, 1).message == "input 'encoded' needs 1 elements, the data holds more"


# --- parameters ----------------------------------------------------------------------------------------------
def _param(**kwargs) -> pb.InferParameter:
    return pb.InferParameter(**kwargs)


@pytest.mark.parametrize(("param", "value"), [
    (_param(int64_param=-3), -3), (_param(uint64_param=7), 7), (_param(double_param=4.0), 4),
    (_param(string_param=" 12 "), 12), (_param(string_param="-1"), -1)])
def test_int_parameter_accepts_every_integer_encoding(param: pb.InferParameter, value: int) -> None:
    assert int_parameter(param, "top_k") == value


@pytest.mark.parametrize("param", [_param(double_param=2.5), _param(string_param="²"), _param(string_param="1e3"),
                                   _param(bool_param=True), _param(string_param="9" * 20), _param()])
def test_int_parameter_refuses_what_is_not_an_integer(param: pb.InferParameter) -> None:
    e = refused(int_parameter, param, "top_k")
    assert (e.code, e.message) == (INVALID, "parameter 'top_k' must be an integer")


def test_top_k_is_zero_when_absent_and_refused_when_negative() -> None:
    r = pb.ModelInferRequest()
    assert top_k_of(r) == 0
    r.parameters["top_k"].int64_param = 3
    assert top_k_of(r) == 3
    r.parameters["top_k"].int64_param = -1
    assert refused(top_k_of, r).message == "top_k must be >= 0, got -1"


def test_the_timeout_parameter_tightens_the_deadline_and_never_loosens_it() -> None:
    r = pb.ModelInferRequest()
    assert deadline_of(r, 123.0) == 123.0 and deadline_of(r, None) is None
    r.parameters["timeout"].int64_param = 0  # Triton: 0 means no timeout of its own
    assert deadline_of(r, 123.0) == 123.0
    r.parameters["timeout"].int64_param = 250_000  # 0.25 s
    before = time.monotonic()
    own = deadline_of(r, None)
    after = time.monotonic()
    assert before + 0.25 <= own <= after + 0.25
    assert deadline_of(r, before) == before  # a call deadline already tighter wins
    far = after + 3600
    assert deadline_of(r, far) < far


def test_requested_outputs_default_to_all_and_refuse_unknown_or_too_many() -> None:
    r = pb.ModelInferRequest()
    assert requested_outputs(r) == ("class_ids", "scores", "labels")
    r.outputs.add(name="labels")
    assert requested_outputs(r) == ("labels",)
    r.outputs.add(name="probabilities")
    assert refused(requested_outputs, r).message == \
        "unknown output 'probabilities'; the model has class_ids, scores, labels"
    for _ in range(2):
        r.outputs.add(name="scores")
    assert refused(requested_outputs, r).message == \
        "4 outputs requested; the model has 3: class_ids, scores, labels"


def test_check_model_accepts_the_served_name_and_version_and_refuses_others_with_not_found() -> None:
    model = description(version="2")
    check_model("tiny", "", model)
    check_model("tiny", "2", model)
    e = refused(check_model, "tiny", "1", model)
    assert (e.code, e.message) == (grpc.StatusCode.NOT_FOUND,
                                   "model 'tiny' version '1' is not served here (serving 'tiny' version '2')")
    long = "m" * 100
    assert refused(check_model, long, "", model).message.startswith(f"model '{'m' * 64}'... (100 characters) is")


# --- request -> images ---------------------------------------------------------------------------------------
def test_the_server_parses_a_request_as_protobuf_does_with_the_pixels_left_in_the_received_bytes() -> None:
    """parse_infer_request (what the server's ModelInfer and ModelStreamInfer receive): every field as protobuf
    parses it, raw_input_contents as views of the received bytes (not copies), and the same images."""
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    r = request("uint8_hwc", "UINT8", [2, 4, 4, 3], pixels.tobytes())
    r.parameters["top_k"].int64_param = 3
    r.outputs.add(name="scores")
    wire = r.SerializeToString()
    call = parse_infer_request(wire)
    assert [bytes(v) for v in call.raw_input_contents] == [pixels.tobytes()]
    assert all(v.obj is wire for v in call.raw_input_contents)  # views of what gRPC handed over
    expected = pb.ModelInferRequest.FromString(wire)
    expected.ClearField("raw_input_contents")
    assert call.message == expected and (call.id, call.model_name, call.model_version) == ("req-1", "tiny", "")
    assert images_of(call, 4) == images_of(r, 4)
    assert parse_infer_request(request("uint8_hwc", "UINT8", [1]).SerializeToString()).raw_input_contents == []


def test_a_request_the_server_parses_is_refused_as_protobuf_parsed_it_would_be() -> None:
    """Two raw contents for one input, and raw plus typed contents: the same refusals from either parse."""
    two = request("uint8_hwc", "UINT8", [1, 1, 1, 3], b"abc")
    two.raw_input_contents.append(b"def")
    both = request("uint8_hwc", "UINT8", [1, 1, 1, 3], b"abc")
    both.inputs[0].contents.uint_contents.extend([1, 2, 3])
    for r in (two, both):
        assert refused(images_of, parse_infer_request(r.SerializeToString()), 4).message == \
            refused(images_of, r, 4).message


def test_encoded_images_from_raw_contents_or_typed_contents_are_the_same() -> None:
    raw = request("encoded", "BYTES", [2, 1], bytes_tensor([b"one", b"two"]))
    typed = request("encoded", "BYTES", [2])
    typed.inputs[0].contents.bytes_contents.extend([b"one", b"two"])
    expected = [ImageInput("encoded", b"one"), ImageInput("encoded", b"two")]
    assert images_of(raw, 4) == expected
    assert images_of(typed, 4) == expected


def test_a_pixel_tensor_of_n_images_becomes_n_inputs_each_its_own_slice() -> None:
    pixels = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    images = images_of(request("uint8_hwc", "UINT8", [2, 2, 3, 3], pixels.tobytes()), 4)
    assert images == [ImageInput("uint8", pixels[i].tobytes(), (2, 3, 3)) for i in range(2)]
    chw = np.linspace(-1, 1, 3 * 8 * 8, dtype=np.float32)
    typed = request("float32_chw", "FP32", [1, 3, 8, 8])
    typed.inputs[0].contents.fp32_contents.extend(chw.tolist())
    assert images_of(typed, 4) == [ImageInput("float32", chw.astype("<f4").tobytes(), (3, 8, 8))]


def _two_inputs() -> pb.ModelInferRequest:
    r = request("encoded", "BYTES", [1, 1])
    r.inputs.add(name="uint8_hwc", datatype="UINT8", shape=[1, 1, 1, 3])
    return r


def _both_contents() -> pb.ModelInferRequest:
    r = request("encoded", "BYTES", [1, 1], bytes_tensor([b"x"]))
    r.inputs[0].contents.bytes_contents.append(b"x")
    return r


def _two_raw() -> pb.ModelInferRequest:
    r = request("encoded", "BYTES", [1, 1], bytes_tensor([b"x"]))
    r.raw_input_contents.append(b"")
    return r


def _uint_over_255() -> pb.ModelInferRequest:
    r = request("uint8_hwc", "UINT8", [1, 1, 1, 3])
    r.inputs[0].contents.uint_contents.extend([1, 2, 256])
    return r


@pytest.mark.parametrize(("make", "message"), [
    (lambda: pb.ModelInferRequest(), "a request carries exactly one image input (encoded, uint8_hwc or "
                                     "float32_chw); got none"),
    (_two_inputs, "a request carries exactly one image input (encoded, uint8_hwc or float32_chw); got "
                  "'encoded', 'uint8_hwc'"),
    (lambda: request("image", "BYTES", [1, 1]), "unknown input 'image'; the model has encoded, uint8_hwc, "
                                                "float32_chw"),
    (lambda: request("encoded", "UINT8", [1, 1]), "input 'encoded' must be BYTES, got 'UINT8'"),
    (lambda: request("encoded", "", [1, 1]), "input 'encoded' must be BYTES, got no datatype"),
    (lambda: request("uint8_hwc", "UINT8", [1] * 5), "input 'uint8_hwc' shape has 5 dimensions; it must be "
                                                     "[N, 1] for encoded, [N, H, W, 3] for uint8_hwc, [N, 3, H, W] "
                                                     "for float32_chw"),
    (lambda: request("encoded", "BYTES", [0, 1]), "input 'encoded' needs a leading batch dimension of at least "
                                                  "1, got shape [0, 1]"),
    (lambda: request("encoded", "BYTES", [5, 1]), "batch of 5 images exceeds the model's max_batch_size 4"),
    (_two_raw, "raw_input_contents has 2 entries for 1 input"),
    (_both_contents, "input 'encoded' has both raw_input_contents and typed contents"),
    (lambda: request("encoded", "BYTES", [1, 2]), "input 'encoded' shape must be [N, 1] (or [N]), got [1, 2]"),
    (lambda: request("encoded", "BYTES", [2, 1]), "input 'encoded' of shape [2, 1] needs 2 elements, got 0"),
    (lambda: request("encoded", "BYTES", [2, 1], bytes_tensor([b"x"])),
     "input 'encoded' of shape [2, 1] needs 2 elements, got 1"),
    (lambda: request("uint8_hwc", "UINT8", [1, 2, 3]), "input 'uint8_hwc' shape must be [N, H, W, 3], got [1, 2, 3]"),
    (lambda: request("uint8_hwc", "UINT8", [1, 2, 2, 3], b"\0" * 11),
     "input 'uint8_hwc' of shape [1, 2, 2, 3] needs 12 bytes, got 11"),
    (lambda: request("float32_chw", "FP32", [1, 3, 8, 8]), "input 'float32_chw' needs 192 values in "
                                                           "fp32_contents, got 0"),
    (_uint_over_255, "input 'uint8_hwc': uint_contents values must be 0..255 for UINT8"),
])
def test_images_of_refuses_malformed_requests_with_the_precise_message(make, message: str) -> None:
    e = refused(images_of, make(), 4)
    assert (e.code, e.message) == (INVALID, message)


def test_typed_pixels_converts_uint_contents_to_bytes() -> None:
    r = request("uint8_hwc", "UINT8", [1, 1, 1, 3])
    r.inputs[0].contents.uint_contents.extend([0, 128, 255])
    assert typed_pixels(r.inputs[0], "uint8", 3) == bytes([0, 128, 255])


# --- answers -> response -------------------------------------------------------------------------------------
LABELS = ["zero", "a", "é", "c"]


@pytest.mark.parametrize("together", [True, False], ids=["computed together", "made one by one"])
def test_response_carries_n_by_k_outputs_in_the_order_requested(together: bool) -> None:
    """The same response whether the answers were computed as one block (arrays) or image by image."""
    ids_, scores_ = np.array([[3, 1], [0, 2]]), np.array([[0.75, 0.25], [0.5, 0.5]])
    if together:
        answers = Answers(TopK(ids_, scores_), LABELS, "2")
    else:
        answers = Answers.of([Answer([Prediction(i, LABELS[i], s) for i, s in zip(row, srow, strict=True)], "2")
                              for row, srow in zip(ids_.tolist(), scores_.tolist(), strict=True)], LABELS, "2")
    r = pb.ModelInferRequest(id="abc")
    response = response_of(r, "tiny", answers, ("labels", "class_ids", "scores"))
    assert (response.model_name, response.model_version, response.id) == ("tiny", "2", "abc")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("labels", "BYTES", [2, 2]), ("class_ids", "INT64", [2, 2]), ("scores", "FP32", [2, 2])]
    labels, ids, scores = response.raw_output_contents
    assert split_bytes(labels, 4) == [b"c", b"a", b"zero", "é".encode()]
    assert np.frombuffer(ids, "<i8").tolist() == [3, 1, 0, 2]
    assert np.frombuffer(scores, "<f4").tolist() == [0.75, 0.25, 0.5, 0.5]
    assert [a.predictions for a in answers] == [[(3, "c", 0.75), (1, "a", 0.25)], [(0, "zero", 0.5), (2, "é", 0.5)]]


def test_label_elements_are_made_once_per_label_list() -> None:
    """A version's labels are encoded once, then reused (the same list object); another list gets its own."""
    first = label_elements(LABELS)
    assert label_elements(LABELS) is first and first == [bytes_element(x.encode()) for x in LABELS]
    other = ["x", "y"]
    assert label_elements(other) == [b"\x01\x00\x00\x00x", b"\x01\x00\x00\x00y"]
    assert label_elements(LABELS) is first


def test_with_id_names_the_request_first_and_quotes_an_unusual_id() -> None:
    assert with_id("", "bad") == "bad"
    assert with_id("req-7", "bad") == "[request id: req-7] bad"
    assert with_id("a\nb", "bad") == "[request id: 'a\\nb'] bad"
    assert with_id("x" * 65, "bad") == f"[request id: '{'x' * 64}'... (65 characters)] bad"


def test_a_stream_error_echoes_short_strings_only_and_carries_the_numeric_code() -> None:
    r = pb.ModelInferRequest(id="req-9", model_name="m" * 65, model_version="1")
    response = stream_error_of(r, RequestError(grpc.StatusCode.NOT_FOUND, "no such model"))
    assert response.error_message == "[request id: req-9] NOT_FOUND: no such model"
    infer = response.infer_response
    assert (infer.id, infer.model_name, infer.model_version) == ("req-9", "", "1")
    assert infer.parameters["error_code"].int64_param == grpc.StatusCode.NOT_FOUND.value[0]


# --- metadata and config -------------------------------------------------------------------------------------
def test_metadata_states_the_inputs_with_the_model_size() -> None:
    model = description()
    assert input_metadata(model)[2] == ("float32_chw", "FP32", [-1, 3, 8, 8])
    metadata = model_metadata_of(model)
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("tiny", ["1"], "paddle")
    assert [t.name for t in metadata.outputs] == ["class_ids", "scores", "labels"]


def test_model_config_reports_the_serving_configuration() -> None:
    config = model_config_of(description(num_classes=3), ServingConfig(
        instances=2, preferred_batch_sizes=(1, 2, 4), max_queue_delay_us=500, max_queue_size=64))
    assert (config.name, config.max_batch_size) == ("tiny", 4)
    assert (config.instance_group[0].count, config.instance_group[0].kind) == (2, mc.ModelInstanceGroup.KIND_CPU)
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert config.parameters["default_top_k"].string_value == "3"
    assert list(config.input[2].dims) == [3, 8, 8]
