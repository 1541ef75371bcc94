"""The Open Inference Protocol (KServe v2) codecs: pure functions between `inference.*` messages and the
server's own values (request -> ImageInputs, parameters, Answers -> response, model metadata and config).
Everything a client sends is checked here, each refusal a RequestError naming the problem (INVALID_ARGUMENT,
NOT_FOUND for another model). docs/oip.md lists the exact tensor names, dtypes and shapes. Knows protobuf and
gRPC status codes; nothing of servers, calls or Paddle (tests/unit/test_oip_codec.py runs it without either).
"""

from __future__ import annotations

import math
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from .errors import ECHO_CHARS, RequestError, echo
from .handle import ServingConfig
from .pipeline import Answers, ImageInput, ModelDescription
from .wire import INFER_REQUEST_FIELDS, split_field

PLATFORM = "paddle"
EXTENSIONS = ("model_configuration", "statistics", "parameters")

# Inputs: a request carries exactly one of them; N (the leading dimension) images, 1 <= N <= max_batch_size.
ENCODED, UINT8_HWC, FLOAT32_CHW = "encoded", "uint8_hwc", "float32_chw"
# Outputs, each [N, k]: the k best classes of every image, best first.
CLASS_IDS, SCORES, LABELS = "class_ids", "scores", "labels"
OUTPUTS = (CLASS_IDS, SCORES, LABELS)
TOP_K, TIMEOUT = "top_k", "timeout"  # request parameters: classes per image; Triton's queue timeout in µs
ERROR_CODE = "error_code"  # parameter of an in-stream error response: the numeric gRPC status code

_KIND = {ENCODED: ("BYTES", "encoded"), UINT8_HWC: ("UINT8", "uint8"), FLOAT32_CHW: ("FP32", "float32")}
_INTEGER = re.compile(r"-?[0-9]{1,19}")  # ASCII digits only: int() also takes "²" and other Unicode digits


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def input_metadata(model: ModelDescription) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every input, batch dimension first (-1: any size)."""
    _, h, w = model.input_shape
    return [(ENCODED, "BYTES", [-1, 1]), (UINT8_HWC, "UINT8", [-1, -1, -1, 3]), (FLOAT32_CHW, "FP32", [-1, 3, h, w])]


def output_metadata() -> list[tuple[str, str, list[int]]]:
    return [(CLASS_IDS, "INT64", [-1, -1]), (SCORES, "FP32", [-1, -1]), (LABELS, "BYTES", [-1, -1])]


# --- request -> images ---------------------------------------------------------------------------------------
_RAW_INPUT_CONTENTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


@dataclass(frozen=True)
class InferRequest:
    """A ModelInferRequest whose raw_input_contents stay views of the bytes gRPC received (parse_infer_request):
    the images are copied once, into the engine's memory, instead of twice more on the event loop first."""

    message: pb.ModelInferRequest
    raw_input_contents: Sequence[bytes | memoryview]

    @classmethod
    def of(cls, request: pb.ModelInferRequest | InferRequest) -> InferRequest:
        """``request`` as an InferRequest (a message parsed by protobuf itself keeps its contents)."""
        return request if isinstance(request, InferRequest) else cls(request, list(request.raw_input_contents))

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def model_name(self) -> str:
        return self.message.model_name

    @property
    def model_version(self) -> str:
        return self.message.model_version


def parse_infer_request(raw: bytes) -> InferRequest:
    """The ModelInfer / ModelStreamInfer request parser (wire.RequestGuard's `parsers`): everything but
    raw_input_contents parsed by protobuf; those as views of ``raw``. Raises like protobuf on malformed bytes."""
    rest, contents = split_field(raw, _RAW_INPUT_CONTENTS, INFER_REQUEST_FIELDS)
    return InferRequest(pb.ModelInferRequest.FromString(rest), contents)


def split_bytes(raw: bytes, n: int) -> list[bytes]:
    """A raw BYTES tensor of n elements: each is a 4-byte little-endian length, then that many bytes. Reads at
    most n + 1 elements, however many the data holds."""
    out, i = [], 0
    while i < len(raw):
        if len(out) == n:
            raise _invalid(f"input {ENCODED!r} needs {n} elements, the data holds more")
        if i + 4 > len(raw):
            raise _invalid("BYTES tensor is malformed: truncated element length")
        (size,) = struct.unpack_from("<I", raw, i)
        if i + 4 + size > len(raw):
            raise _invalid("BYTES tensor is malformed: element runs past the end of the data")
        out.append(raw[i + 4:i + 4 + size])
        i += 4 + size
    return out


def int_parameter(p: pb.InferParameter, name: str) -> int:
    which = p.WhichOneof("parameter_choice")
    if which in ("int64_param", "uint64_param"):
        return int(getattr(p, which))
    if which == "double_param" and float(p.double_param).is_integer():
        return int(p.double_param)
    if which == "string_param" and _INTEGER.fullmatch(p.string_param.strip()):
        return int(p.string_param)
    raise _invalid(f"parameter {name!r} must be an integer")


def top_k_of(request: pb.ModelInferRequest) -> int:
    """The `top_k` request parameter; 0 or absent: the server's default (5); capped at the class count later."""
    if TOP_K not in request.parameters:
        return 0
    k = int_parameter(request.parameters[TOP_K], TOP_K)
    if k < 0:
        raise _invalid(f"top_k must be >= 0, got {k}")
    return k


def deadline_of(request: pb.ModelInferRequest, deadline: float | None) -> float | None:
    """The call's deadline, tightened by Triton's `timeout` parameter (microseconds) when given."""
    if TIMEOUT not in request.parameters:
        return deadline
    us = int_parameter(request.parameters[TIMEOUT], TIMEOUT)
    if us <= 0:
        return deadline
    own = time.monotonic() + us / 1e6
    return own if deadline is None else min(deadline, own)


def requested_outputs(request: pb.ModelInferRequest) -> tuple[str, ...]:
    if len(request.outputs) > len(OUTPUTS):
        raise _invalid(f"{len(request.outputs)} outputs requested; the model has {len(OUTPUTS)}: "
                       f"{', '.join(OUTPUTS)}")
    names = tuple(o.name for o in request.outputs) or OUTPUTS
    for name in names:
        if name not in OUTPUTS:
            raise _invalid(f"unknown output {echo(name)}; the model has {', '.join(OUTPUTS)}")
    return names


def check_model(request_name: str, request_version: str, model: ModelDescription) -> None:
    if request_name != model.name or request_version not in ("", model.version):
        wanted = echo(request_name) + (f" version {echo(request_version)}" if request_version else "")
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"model {wanted} is not served here (serving {model.name!r} version {model.version!r})")


def images_of(call: pb.ModelInferRequest | InferRequest, max_batch_size: int) -> list[ImageInput]:
    """The request's one image input as N ImageInputs (one batcher item each); INVALID_ARGUMENT names the problem.

    Accepts raw_input_contents (what tritonclient sends) and typed `contents` alike."""
    call = InferRequest.of(call)
    request, raw_contents = call.message, call.raw_input_contents
    if len(request.inputs) != 1:
        got = ", ".join(echo(t.name) for t in request.inputs[:3]) or "none"
        more = f" and {len(request.inputs) - 3} more" if len(request.inputs) > 3 else ""
        raise _invalid(f"a request carries exactly one image input ({ENCODED}, {UINT8_HWC} or {FLOAT32_CHW}); "
                       f"got {got}{more}")
    t = request.inputs[0]
    if t.name not in _KIND:
        raise _invalid(f"unknown input {echo(t.name)}; the model has {ENCODED}, {UINT8_HWC}, {FLOAT32_CHW}")
    datatype, kind = _KIND[t.name]
    if t.datatype != datatype:
        raise _invalid(f"input {t.name!r} must be {datatype}, got {echo(t.datatype) if t.datatype else 'no datatype'}")
    if len(t.shape) > 4:  # before the shape is copied: a client can send millions of dimensions
        raise _invalid(f"input {t.name!r} shape has {len(t.shape)} dimensions; it must be [N, 1] for "
                       f"{ENCODED}, [N, H, W, 3] for {UINT8_HWC}, [N, 3, H, W] for {FLOAT32_CHW}")
    shape = [int(d) for d in t.shape]
    if not shape or shape[0] < 1 or any(d < 0 for d in shape):
        raise _invalid(f"input {t.name!r} needs a leading batch dimension of at least 1, got shape {shape}")
    n = shape[0]
    if n > max_batch_size:
        raise _invalid(f"batch of {n} images exceeds the model's max_batch_size {max_batch_size}")
    raw = None
    if raw_contents:
        if len(raw_contents) != 1:
            raise _invalid(f"raw_input_contents has {len(raw_contents)} entries for 1 input")
        if t.HasField("contents"):
            raise _invalid(f"input {t.name!r} has both raw_input_contents and typed contents")
        raw = raw_contents[0]
    if kind == "encoded":
        if shape not in ([n], [n, 1]):
            raise _invalid(f"input {ENCODED!r} shape must be [N, 1] (or [N]), got {shape}")
        if raw is None and len(t.contents.bytes_contents) != n:  # counted before anything is copied
            raise _invalid(f"input {ENCODED!r} of shape {shape} needs {n} elements, "
                           f"got {len(t.contents.bytes_contents)}")
        items = split_bytes(raw, n) if raw is not None else list(t.contents.bytes_contents)
        if len(items) != n:
            raise _invalid(f"input {ENCODED!r} of shape {shape} needs {n} elements, got {len(items)}")
        return [ImageInput("encoded", item) for item in items]
    if len(shape) != 4:
        layout = "[N, H, W, 3]" if kind == "uint8" else "[N, 3, H, W]"
        raise _invalid(f"input {t.name!r} shape must be {layout}, got {shape}")
    per_image = math.prod(shape[1:]) * (1 if kind == "uint8" else 4)
    if raw is None:
        raw = typed_pixels(t, kind, n * per_image)
    if len(raw) != n * per_image:
        raise _invalid(f"input {t.name!r} of shape {shape} needs {n * per_image} bytes, got {len(raw)}")
    view = memoryview(raw)  # slices of the request's bytes, not copies: each image is copied once, by the engine
    return [ImageInput(kind, view[i * per_image:(i + 1) * per_image], tuple(shape[1:])) for i in range(n)]


def typed_pixels(t: pb.ModelInferRequest.InferInputTensor, kind: str, nbytes: int) -> bytes:
    """Typed contents as raw bytes; their count is checked against the shape before any is converted."""
    values = t.contents.uint_contents if kind == "uint8" else t.contents.fp32_contents
    needed = nbytes if kind == "uint8" else nbytes // 4
    if len(values) != needed:
        field = "uint_contents" if kind == "uint8" else "fp32_contents"
        raise _invalid(f"input {t.name!r} needs {needed} values in {field}, got {len(values)}")
    if kind == "uint8":
        values = np.asarray(values, dtype=np.uint32)
        if values.size and values.max() > 255:
            raise _invalid(f"input {t.name!r}: uint_contents values must be 0..255 for UINT8")
        return values.astype(np.uint8).tobytes()
    return np.asarray(values, dtype="<f4").tobytes()


# --- answers -> response ------------------------------------------------------------------------------------
def bytes_tensor(items: Sequence[bytes]) -> bytes:
    return b"".join(bytes_element(b) for b in items)


def bytes_element(item: bytes) -> bytes:
    """One element of a BYTES tensor's raw contents: its length (4 bytes, little-endian), then itself."""
    return struct.pack("<I", len(item)) + item


_label_elements: dict[int, tuple[Sequence[str], list[bytes]]] = {}  # id(labels) -> (labels, their elements)


def label_elements(labels: Sequence[str]) -> list[bytes]:
    """Every label as a BYTES element, made once per label list (a model version's), not once per answer."""
    held = _label_elements.get(id(labels))
    if held is None or held[0] is not labels:
        if len(_label_elements) >= 8:  # a few versions over a server's life (reloads): never more than a few
            _label_elements.clear()
        held = _label_elements[id(labels)] = (labels, [bytes_element(label.encode()) for label in labels])
    return held[1]


def response_of(request: pb.ModelInferRequest, model_name: str, answers: Answers,
                outputs: Sequence[str]) -> pb.ModelInferResponse:
    """[N, k] outputs as raw_output_contents (what Triton returns and tritonclient's as_numpy reads), written
    from the answers' arrays."""
    top = answers.top
    n, k = top.ids.shape
    response = pb.ModelInferResponse(model_name=model_name, model_version=answers.model_version, id=request.id)
    for name in outputs:
        if name == CLASS_IDS:
            datatype = "INT64"
            data = top.ids.astype("<i8").tobytes()
        elif name == SCORES:
            datatype = "FP32"
            data = top.scores.astype("<f4").tobytes()
        else:
            datatype = "BYTES"
            elements = label_elements(answers.labels)
            data = b"".join([elements[i] for i in top.ids.ravel().tolist()])
        response.outputs.add(name=name, datatype=datatype, shape=[n, k])
        response.raw_output_contents.append(data)
    return response


# --- metadata and errors -----------------------------------------------------------------------------------
def model_metadata_of(model: ModelDescription) -> pb.ModelMetadataResponse:
    T = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name, versions=[model.version], platform=PLATFORM,
        inputs=[T(name=n, datatype=d, shape=s) for n, d, s in input_metadata(model)],
        outputs=[T(name=n, datatype=d, shape=s) for n, d, s in output_metadata()])


def model_config_of(model: ModelDescription, config: ServingConfig) -> mc.ModelConfig:
    """Triton's model configuration, stated from what the server actually does (instances, batching, queue)."""
    _, h, w = model.input_shape
    In, Out = mc.ModelInput, mc.ModelOutput
    return mc.ModelConfig(
        name=model.name, backend=PLATFORM, max_batch_size=model.max_batch_size,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        input=[In(name=ENCODED, data_type=mc.TYPE_STRING, dims=[1], optional=True),
               In(name=UINT8_HWC, data_type=mc.TYPE_UINT8, format=In.FORMAT_NHWC, dims=[-1, -1, 3], optional=True),
               In(name=FLOAT32_CHW, data_type=mc.TYPE_FP32, format=In.FORMAT_NCHW, dims=[3, h, w], optional=True)],
        output=[Out(name=CLASS_IDS, data_type=mc.TYPE_INT64, dims=[-1]),
                Out(name=SCORES, data_type=mc.TYPE_FP32, dims=[-1]),
                Out(name=LABELS, data_type=mc.TYPE_STRING, dims=[-1])],
        instance_group=[mc.ModelInstanceGroup(
            count=config.instances, kind=mc.ModelInstanceGroup.KIND_GPU if model.device == "gpu" else
            mc.ModelInstanceGroup.KIND_CPU)],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=list(config.preferred_batch_sizes),
            max_queue_delay_microseconds=config.max_queue_delay_us,
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=config.max_queue_size)),
        parameters={key: mc.ModelParameter(string_value=str(value)) for key, value in (
            ("architecture", model.architecture), ("num_classes", model.num_classes),
            ("precision", model.precision), ("device", model.device), ("engine", model.engine),
            ("default_top_k", min(5, model.num_classes)))})


def with_id(request_id: str, message: str) -> str:
    """Triton's convention: errors about a request name its id first (a long or non-ASCII one quoted and cut)."""
    if not request_id:
        return message
    plain = len(request_id) <= ECHO_CHARS and request_id.isascii() and request_id.isprintable()
    return f"[request id: {request_id if plain else echo(request_id)}] {message}"


def stream_error_of(request: pb.ModelInferRequest, error: RequestError) -> pb.ModelStreamInferResponse:
    """An in-stream error answer: `error_message` "[request id: ..] CODE: message", and an infer_response that
    echoes the request's short strings and carries the numeric code as parameter `error_code`. The client's own
    strings are echoed only when short: the answer must fit any client's limit."""
    short = {k: v for k, v in (("id", request.id), ("model_name", request.model_name),
                               ("model_version", request.model_version)) if len(v) <= ECHO_CHARS}
    response = pb.ModelInferResponse(**short)
    response.parameters[ERROR_CODE].int64_param = error.code.value[0]
    return pb.ModelStreamInferResponse(error_message=with_id(request.id, f"{error.code.name}: {error.message}"),
                                       infer_response=response)
