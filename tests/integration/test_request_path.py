"""Issue 13, the request path: what one client's malformed, oversized or absurd requests cost the server.

Each test names the defect it pins down. Costs are counted, not timed: peak memory of a subprocess, Python
allocations traced by tracemalloc, requests admitted and refused. The server tests run on one in-process server
with bearer-token auth, one preprocess thread and room for two images in preprocessing.
"""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.server.errors import RequestError
from resnet_serve.server.oip_codec import images_of, parse_infer_request
from resnet_serve.server.preprocess import InvalidInput, Preprocessor
from resnet_serve.server.service import image_of
from tests.harness import InProcessServer, wait_for

SIZE = 32
TOKEN = "request-path-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MiB = 1024 * 1024


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def picture(seed: int = 0, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def traced_peak(fn) -> tuple[int, BaseException | None]:
    """Peak bytes of Python (and numpy) allocations while fn runs, and what it raised."""
    tracemalloc.start()
    try:
        fn()
        raised = None
    except BaseException as e:  # noqa: BLE001 - returned to the test, which asserts on it
        raised = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, raised


# --- defect 1: extreme aspect ratios ---------------------------------------------------------------------------
def test_resize_of_an_extreme_strip_builds_no_large_intermediate() -> None:
    """A 1x100000 strip used to be scaled whole to 32x3200000 (400 MB) before the crop; the peak RSS of a fresh
    process doing only this resize now stays near the output size."""
    code = """
import resource
import numpy as np
from PIL import Image
from resnet_serve.common.imaging import resize_crop
strip = np.zeros((1, 100_000, 3), np.uint8)
strip[0, 49_990:50_010] = 255  # a white band in the middle: what the centre crop must show
img = Image.fromarray(strip)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = resize_crop(img, 32, 32)
grew_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grew_kb, out.shape, int(out.min()), int(out.max()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    grew_kb, *rest = r.stdout.split(maxsplit=1)
    assert rest[0].strip() == "(32, 32, 3) 255 255"
    assert int(grew_kb) < 50 * 1024, f"peak RSS grew {int(grew_kb) // 1024} MB"


@pytest.mark.parametrize("kind", ["encoded", "uint8"])
def test_absurd_aspect_ratio_is_invalid_argument(kind: str) -> None:
    pre = Preprocessor((SIZE, SIZE))
    strip = np.zeros((1, 20_000, 3), np.uint8)
    with pytest.raises(InvalidInput, match=r"1x\d+|\d+x1") as err:
        if kind == "encoded":
            pre.encoded(encode(strip))
        else:
            pre.uint8_hwc(strip.shape, strip.tobytes())
    assert "aspect ratio over the limit of 100:1" in str(err.value)
    # Up to the limit, a strip is fine: resized by its centre crop.
    assert pre.uint8_hwc((1, 100, 3), bytes(300)).shape == (SIZE, SIZE, 3)


# --- defect 8: decode cost ---------------------------------------------------------------------------------------
def test_png_over_the_default_pixel_budget_is_refused_before_decoding() -> None:
    """A 6300x6300 PNG of one colour is 38 KB on the wire and 40 Mpx (about 1.2 s) to decode."""
    big = encode(np.zeros((6300, 6300), np.uint8))
    assert len(big) < 100_000
    peak, raised = traced_peak(lambda: Preprocessor((SIZE, SIZE)).encoded(big))
    assert isinstance(raised, InvalidInput) and "over the limit of 16777216" in str(raised)
    assert peak < 10 * MiB


def test_jpeg_pixel_budget_counts_the_pixels_actually_decoded() -> None:
    """A JPEG is decoded at reduced scale (Pillow's draft): a 2000x2000 photo costs 250x250 at a 32x32 input."""
    photo = encode(picture(h=2000, w=2000), "JPEG")
    pre = Preprocessor((SIZE, SIZE), max_pixels=1_000_000)
    assert pre.encoded(photo).shape == (SIZE, SIZE, 3)
    with pytest.raises(InvalidInput, match="over the limit"):
        pre.encoded(encode(picture(h=2000, w=2000)))  # a PNG has no reduced-scale decode


# --- defect 13: decode errors ------------------------------------------------------------------------------------
def test_decode_errors_carry_no_memory_address() -> None:
    with pytest.raises(InvalidInput, match="cannot decode PNG") as err:
        Preprocessor((SIZE, SIZE)).encoded(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert "0x" not in str(err.value) and "BytesIO" not in str(err.value)


# --- defect 8: admission control before decoding -----------------------------------------------------------------
def test_preprocess_pool_bounds_images_and_bytes_and_counts_refusals() -> None:
    from resnet_serve.server.admission import PreprocessPool, PreprocessQueueFull

    async def main() -> None:
        refused = []
        pool = PreprocessPool(1, max_images=3, max_bytes=1000, on_refused=lambda: refused.append(1))
        gate = threading.Event()
        try:
            first = asyncio.ensure_future(pool.run(gate.wait, size=900))  # always admitted when empty
            await asyncio.sleep(0)
            assert (pool.images, pool.bytes) == (1, 900)
            with pytest.raises(PreprocessQueueFull):  # 900 + 200 bytes > 1000
                await pool.run(len, b"x", size=200)
            second = asyncio.ensure_future(pool.run(len, b"ab", size=50))
            third = asyncio.ensure_future(pool.run(len, b"abc", size=50))
            await asyncio.sleep(0)
            assert pool.images == 3
            with pytest.raises(PreprocessQueueFull):  # 3 images inside
                await pool.run(len, b"x", size=1)
            assert len(refused) == 2
            third.cancel()  # not started (the one thread is busy): it leaves at once
            await asyncio.gather(third, return_exceptions=True)
            assert (pool.images, pool.bytes) == (2, 950)
            gate.set()
            assert await first and await second == 2
            await asyncio.sleep(0)
            assert (pool.images, pool.bytes) == (0, 0)
        finally:
            gate.set()
            pool.shutdown()

    asyncio.run(main())


# --- defect 3: counts and ranks before anything client-sized is copied -------------------------------------------
def _infer_request(name: str, datatype: str, shape: list[int]) -> oip.ModelInferRequest:
    r = oip.ModelInferRequest(model_name="tiny")
    r.inputs.add(name=name, datatype=datatype, shape=shape)
    return r


def _raw_bytes_request() -> oip.ModelInferRequest:
    r = _infer_request("encoded", "BYTES", [1, 1])
    r.raw_input_contents.append(bytes(4 * 1_000_000))  # a million zero-length elements
    return r


def _bytes_contents_request() -> oip.ModelInferRequest:
    r = _infer_request("encoded", "BYTES", [1, 1])
    r.inputs[0].contents.bytes_contents.extend([b""] * 1_000_000)
    return r


def _uint_contents_request() -> oip.ModelInferRequest:
    r = _infer_request("uint8_hwc", "UINT8", [1, 1, 1, 3])
    r.inputs[0].contents.uint_contents.extend(np.zeros(1_000_000, np.uint32).tolist())
    return r


def _shape_request() -> oip.ModelInferRequest:
    return _infer_request("uint8_hwc", "UINT8", [1] * 1_000_000)


@pytest.mark.parametrize("make", [_raw_bytes_request, _bytes_contents_request, _uint_contents_request,
                                  _shape_request], ids=["raw BYTES", "bytes_contents", "uint_contents", "shape"])
def test_oip_request_with_a_million_elements_is_refused_without_copying_them(make) -> None:
    request = oip.ModelInferRequest.FromString(make().SerializeToString())  # as the server receives it
    peak, raised = traced_peak(lambda: images_of(request, max_batch_size=8))
    assert isinstance(raised, RequestError) and raised.code == grpc.StatusCode.INVALID_ARGUMENT, raised
    assert len(raised.message) < 300
    # protobuf hands out raw contents as a copy: that one copy, and nothing per element
    payload = sum(len(b) for b in request.raw_input_contents)
    assert peak < payload + MiB, f"{peak} bytes allocated to refuse it"
    call = parse_infer_request(make().SerializeToString())  # as the server parses it: raw contents not copied
    peak, raised = traced_peak(lambda: images_of(call, max_batch_size=8))
    assert isinstance(raised, RequestError) and raised.code == grpc.StatusCode.INVALID_ARGUMENT, raised
    assert peak < MiB, f"{peak} bytes allocated to refuse it"


def test_v1_tensor_with_a_million_dimensions_is_refused_without_copying_them() -> None:
    request = pb.ClassifyRequest.FromString(pb.ClassifyRequest(
        tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[1] * 1_000_000)).SerializeToString())
    peak, raised = traced_peak(lambda: image_of(request))
    assert isinstance(raised, InvalidInput) and str(raised) == "uint8 tensor shape must be [H, W, 3], got 1000000 " \
        "dimensions"
    assert peak < MiB


# --- the server -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(TOKEN + "\n")
    s = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1, auth_token_file=str(tokens),
                        preprocess_threads=1, max_preprocess_queue=2)
    yield s
    s.close()


def valid(request_id: str = "ok") -> pb.ClassifyRequest:
    return pb.ClassifyRequest(encoded=encode(picture()), request_id=request_id)


def status(call, request, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=60, **kw)
    return err.value.code(), err.value.details()


def test_ok_series_of_every_method_exist_from_the_start(srv: InProcessServer) -> None:
    samples = srv.metrics()
    for method in ("Classify", "ClassifyStream", "GetModelInfo", "ModelInfer", "ModelStreamInfer"):
        assert (("resnet_serve_requests_total", (("code", "OK"), ("method", method), ("model", "tiny"),
                                                 ("version", "1")))) in samples, method
    assert ("resnet_serve_dropped_requests_total", (("reason", "preprocess_full"),)) in samples


def test_lower_case_bearer_is_accepted(srv: InProcessServer) -> None:
    assert srv.stub.Classify(valid(), metadata=(("authorization", f"bearer {TOKEN}"),), timeout=60).predictions


def test_oip_parameters_that_are_not_ascii_integers_are_invalid_argument(srv: InProcessServer) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(srv.channel)
    for name, value in (("top_k", "--3"), ("top_k", "²"), ("timeout", "--1"), ("top_k", "1" * 400)):
        r = _infer_request("encoded", "BYTES", [1, 1])
        r.inputs[0].contents.bytes_contents.append(encode(picture()))
        r.parameters[name].string_param = value
        code, details = status(stub.ModelInfer, r, metadata=AUTH)
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, f"parameter {name!r} must be an integer"), value


def test_echoed_client_text_is_capped(srv: InProcessServer) -> None:
    """A 100,000-dimension shape, a 100,000-character OIP id and a 20,000-character model name come back as the
    right code with a short message (not RESOURCE_EXHAUSTED because the message outgrew the client's limit)."""
    stub = oip_grpc.GRPCInferenceServiceStub(srv.channel)
    t = pb.Tensor(dtype=pb.Tensor.UINT8, shape=list(range(1, 100_001)))
    code, details = status(srv.stub.Classify, pb.ClassifyRequest(tensor=t), metadata=AUTH)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "3 dimensions" in details and len(details) < 300
    r = _infer_request("uint8_hwc", "UINT8", list(range(1, 100_001)))
    code, details = status(stub.ModelInfer, r, metadata=AUTH)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "4 dimensions" in details and len(details) < 300
    r = _infer_request("encoded", "BYTES", [1, 1])
    r.id = "é" * 100_000
    code, details = status(stub.ModelInfer, r, metadata=AUTH)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "request id is 100000 characters" in details
    assert len(details) < 400
    r = _infer_request("encoded", "BYTES", [1, 1])
    r.model_name = "m" * 20_000
    code, details = status(stub.ModelInfer, r, metadata=AUTH)
    assert code == grpc.StatusCode.NOT_FOUND and "(20000 characters)" in details and len(details) < 400
    code, details = status(stub.ModelMetadata, oip.ModelMetadataRequest(name="n" * 20_000), metadata=AUTH)
    assert code == grpc.StatusCode.NOT_FOUND and len(details) < 400


def test_request_id_too_long_for_an_answer_is_refused_and_counted_as_refused(srv: InProcessServer) -> None:
    """A 5 MB request_id would make a 5 MB answer, over the 4 MB clients accept by default: the server answered
    OK by its metrics while the client saw RESOURCE_EXHAUSTED; on a stream, the stream died."""
    huge = "i" * (5 * MiB)
    before = srv.metrics()
    code, details = status(srv.stub.Classify, valid(huge), metadata=AUTH)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"request id is {len(huge)} characters" in details
    after = srv.metrics()
    key = ("resnet_serve_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Classify"), ("model", "tiny"),
                                           ("version", "1")))
    assert after[key] - before.get(key, 0) == 1
    ok = ("resnet_serve_requests_total", (("code", "OK"), ("method", "Classify"), ("model", "tiny"), ("version", "1")))
    assert after[ok] == before[ok]
    answers = list(srv.stub.ClassifyStream(iter([valid("a"), valid(huge), valid("b")]), metadata=AUTH, timeout=60))
    assert sorted((a.request_id, a.error.code) for a in answers) == [
        ("", grpc.StatusCode.INVALID_ARGUMENT.value[0]), ("a", 0), ("b", 0)]
    # At the limit (1024 characters) it is echoed as usual.
    assert srv.stub.Classify(valid("j" * 1024), metadata=AUTH, timeout=60).request_id == "j" * 1024


def test_preprocessing_is_bounded_visible_and_refuses_with_resource_exhausted(srv: InProcessServer) -> None:
    """With the one preprocess thread busy, two encoded images wait (the limit), the next ones are refused at
    once, counted as drops and visible as a gauge; the waiting ones are answered once the thread is free."""
    busy = threading.Event()
    blocker = srv.server.pool.executor.submit(busy.wait, 120)  # occupies the thread outside the admission count
    try:
        waiting = [srv.stub.Classify.future(valid(f"w{i}"), metadata=AUTH, timeout=120) for i in range(2)]
        wait_for(lambda: srv.metrics().get(("resnet_serve_preprocess_queue_depth", ())) == 2, timeout=30,
                 what="two images waiting for the preprocess thread")
        drops = ("resnet_serve_dropped_requests_total", (("reason", "preprocess_full"),))
        before = srv.metrics()[drops]
        for i in range(3):
            code, details = status(srv.stub.Classify, valid(f"r{i}"), metadata=AUTH)
            assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       "server is busy preprocessing images, retry later")
        # A large request is refused before its parse (a 2 MiB one here; the bytes need not even be an image).
        large = pb.ClassifyRequest(encoded=bytes(2 * MiB), request_id="large")
        assert status(srv.stub.Classify, large, metadata=AUTH)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        samples = srv.metrics()
        assert samples[drops] - before == 4
        assert samples[("resnet_serve_preprocess_queue_bytes", ())] == 2 * len(valid().encoded)
    finally:
        busy.set()
        blocker.result(60)
    assert [f.result().request_id for f in waiting] == ["w0", "w1"]
    wait_for(lambda: srv.metrics()[("resnet_serve_preprocess_queue_depth", ())] == 0, timeout=30,
             what="preprocessing empty again")


def test_garbage_bytes_to_any_method(srv: InProcessServer, caplog: pytest.LogCaptureFixture) -> None:
    """Not protobuf at all: UNAUTHENTICATED without a token (refused before parsing), INVALID_ARGUMENT with one,
    on every kind of method; a stream goes on after a garbage item; one log line, not a traceback each."""
    garbage = b"\xff\xff\xff\xff not a protobuf"
    methods = ["/classifier.v1.Classifier/Classify", "/classifier.v1.Classifier/GetModelInfo",
               "/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ModelMetadata",
               "/classifier.v1.Admin/ReloadModel"]
    with caplog.at_level(logging.INFO):
        for _ in range(20):
            for method in methods:
                call = srv.channel.unary_unary(method)
                assert status(call, garbage)[0] == grpc.StatusCode.UNAUTHENTICATED, method
                code, details = status(call, garbage, metadata=AUTH)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in details, method
        health = srv.channel.unary_unary("/grpc.health.v1.Health/Check")  # exempt from auth
        assert status(health, garbage)[0] == grpc.StatusCode.INVALID_ARGUMENT
    grpc_errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not grpc_errors, grpc_errors[0].getMessage()
    assert len([r for r in caplog.records if "not a valid protobuf" in r.getMessage()]) == 1
    stream = srv.channel.stream_stream("/classifier.v1.Classifier/ClassifyStream")
    answers = [pb.ClassifyResponse.FromString(a) for a in stream(
        iter([valid("a").SerializeToString(), garbage, valid("b").SerializeToString()]), metadata=AUTH, timeout=60)]
    assert sorted((a.request_id, a.error.code) for a in answers) == [
        ("", grpc.StatusCode.INVALID_ARGUMENT.value[0]), ("a", 0), ("b", 0)]
    watch = srv.channel.unary_stream("/grpc.health.v1.Health/Watch")
    with pytest.raises(grpc.RpcError) as err:
        next(iter(watch(garbage, timeout=30)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    check = health_pb2_grpc.HealthStub(srv.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_oip_stream_answers_a_huge_id_and_garbage_in_stream_and_goes_on(srv: InProcessServer) -> None:
    def item(request_id: str) -> bytes:
        r = _infer_request("encoded", "BYTES", [1, 1])
        r.id = request_id
        r.inputs[0].contents.bytes_contents.append(encode(picture()))
        return r.SerializeToString()

    stream = srv.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    items = [item("a"), item("i" * (5 * MiB)), b"\xff\xff\xff\xff not a protobuf", item("b")]
    answers = [oip.ModelStreamInferResponse.FromString(a) for a in stream(iter(items), metadata=AUTH, timeout=60)]
    assert len(answers) == 4
    assert sorted(a.infer_response.id for a in answers if not a.error_message) == ["a", "b"]
    errors = sorted(a.error_message for a in answers if a.error_message)
    assert errors[0].startswith("INVALID_ARGUMENT: request to ModelStreamInfer is not a valid protobuf")
    assert errors[1].startswith("[request id: 'iiii") and "(5242880 characters)] INVALID_ARGUMENT: request id is " \
        "5242880 characters, over the limit of 1024" in errors[1]
    assert all(len(a.SerializeToString()) < 4096 for a in answers if a.error_message)


def test_health_watch_still_streams_through_the_guard(srv: InProcessServer) -> None:
    """Every method's handler is wrapped (server/resnet_serve/server/wire.py); a server-streaming one still streams."""
    updates = health_pb2_grpc.HealthStub(srv.channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(iter(updates)).status == health_pb2.HealthCheckResponse.SERVING
    updates.cancel()
