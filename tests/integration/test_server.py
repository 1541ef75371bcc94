"""The server over real gRPC on 127.0.0.1 with a small exported ResNet: results, streams, bad input, info,
health, reflection. Batching and overload under control of a worker gate are in test_server_control.py."""

from __future__ import annotations

import io
import queue
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from resnet_serve.common.modeldir import load_manifest, read_labels
from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.server.pipeline import top_k
from resnet_serve.server.preprocess import Preprocessor
from tests.harness import InProcessServer

SIZE = 32


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path):
    s = InProcessServer(model_dir=str(tiny_model_dir), max_batch_size=8, max_queue_delay_us=1000,
                        threads_per_instance=1, max_pixels=4096 * 4096)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    """The same model run by a Paddle predictor in this process, with the server's own preprocessing."""
    from resnet_serve.server.predictor import build_predictor
    from resnet_serve.server.predictor_config import PredictorSettings

    version_dir = tiny_model_dir / "1"
    manifest = load_manifest(version_dir)
    predictor = build_predictor(version_dir, manifest, PredictorSettings(threads=1))
    pre = Preprocessor((SIZE, SIZE))
    labels = read_labels(version_dir, manifest)

    def run(x: np.ndarray, k: int = 5):
        return top_k(predictor.run(x[None])[0], k, labels)  # uint8 pixels are normalised as the worker does

    return pre, run


def picture(w: int = 48, h: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def assert_same(response: pb.ClassifyResponse, expected) -> None:
    got = [(p.class_id, p.label) for p in response.predictions]
    assert got == [(p.class_id, p.label) for p in expected]
    np.testing.assert_allclose([p.score for p in response.predictions], [p.score for p in expected], atol=1e-5)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_encoded_image_matches_in_process_predictor(srv, reference, fmt: str) -> None:
    pre, run = reference
    data = encode(picture(seed=1), fmt)
    response = srv.stub.Classify(pb.ClassifyRequest(encoded=data, request_id="a"), timeout=30)
    assert response.request_id == "a" and response.model_version == "1"
    assert_same(response, run(pre.encoded(data)))


def test_raw_uint8_tensor_matches_in_process_predictor(srv, reference) -> None:
    pre, run = reference
    arr = picture(SIZE, SIZE, seed=2)
    t = pb.Tensor(dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE, 3], data=arr.tobytes())
    response = srv.stub.Classify(pb.ClassifyRequest(tensor=t, top_k=3), timeout=30)
    assert len(response.predictions) == 3
    assert_same(response, run(pre.uint8_hwc([SIZE, SIZE, 3], arr.tobytes()), 3))


def test_raw_float32_tensor_matches_in_process_predictor(srv, reference) -> None:
    _, run = reference
    x = np.random.default_rng(3).standard_normal((3, SIZE, SIZE)).astype(np.float32)
    t = pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=[3, SIZE, SIZE], data=x.tobytes())
    response = srv.stub.Classify(pb.ClassifyRequest(tensor=t, top_k=10), timeout=30)
    assert_same(response, run(x, 10))
    assert abs(sum(p.score for p in response.predictions) - 1.0) < 1e-5


def _valid(i: int) -> pb.ClassifyRequest:
    arr = picture(SIZE, SIZE, seed=100 + i % 7)
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE, 3], data=arr.tobytes()),
                              request_id=str(i))


def _malformed(i: int) -> pb.ClassifyRequest:
    kinds = [pb.ClassifyRequest(encoded=b"garbage bytes"), pb.ClassifyRequest(),
             pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE, 3], data=b"x")),
             pb.ClassifyRequest(encoded=encode(picture(), "JPEG")[:60]),
             pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=[3, 8, 8], data=b""))]
    req = kinds[i % len(kinds)]
    req.request_id = str(i)
    return req


def test_stream_answers_every_item_once_and_survives_bad_items(srv) -> None:
    bad = {3, 50, 51, 120, 199}
    outbox: queue.Queue = queue.Queue()
    for i in range(200):
        outbox.put(_malformed(i) if i in bad else _valid(i))

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    responses = srv.stub.ClassifyStream(requests(), timeout=120)
    seen: dict[str, pb.ClassifyResponse] = {}
    for response in responses:
        assert response.request_id not in seen, "answered twice"
        seen[response.request_id] = response
        if len(seen) == 200:
            break
    errors = {rid for rid, r in seen.items() if r.HasField("error")}
    assert errors == {str(i) for i in bad}
    assert all(seen[e].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and seen[e].error.message
               for e in errors)
    assert all(len(r.predictions) == 5 for rid, r in seen.items() if rid not in errors)
    # The same stream still takes work after the bad items.
    for i in range(200, 210):
        outbox.put(_valid(i))
    outbox.put(None)
    rest = {r.request_id for r in responses}
    assert rest == {str(i) for i in range(200, 210)}


def _status(stub, request: pb.ClassifyRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(request, timeout=30)
    return err.value.code(), err.value.details()


BAD_UNARY = [
    ("empty message", pb.ClassifyRequest(), "carries no image"),
    ("empty image", pb.ClassifyRequest(encoded=b""), "image is empty"),
    ("truncated jpeg", pb.ClassifyRequest(encoded=encode(picture(), "JPEG")[:100]), "cannot decode JPEG"),
    ("random bytes", pb.ClassifyRequest(encoded=np.random.default_rng(0).bytes(500)), "not a JPEG, PNG, WebP"),
    ("uint8 shape", pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE], data=b"")),
     "must be [H, W, 3]"),
    ("uint8 length", pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[4, 4, 3], data=b"abc")),
     "needs 48 bytes, got 3"),
    ("float32 shape", pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=[3, 8, 8], data=b"")),
     "must be [3, 32, 32]"),
    ("float32 length", pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=[3, SIZE, SIZE],
                                                           data=b"\0" * 12)), "needs 12288 bytes, got 12"),
    ("dtype", pb.ClassifyRequest(tensor=pb.Tensor(shape=[SIZE, SIZE, 3], data=b"")), "dtype must be UINT8"),
    ("nan", pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=[3, SIZE, SIZE],
                                                data=np.full((3, SIZE, SIZE), np.nan, np.float32).tobytes())),
     "NaN"),
]


@pytest.mark.parametrize("name,request_,message", BAD_UNARY, ids=[b[0] for b in BAD_UNARY])
def test_bad_unary_input_is_invalid_argument_and_server_goes_on(srv, name, request_, message) -> None:
    code, details = _status(srv.stub, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert len(srv.stub.Classify(_valid(0), timeout=30).predictions) == 5


def test_image_over_pixel_limit_is_refused_before_decoding(srv) -> None:
    # A 5000x4000 PNG of one colour: tiny on the wire, 20 Mpx when decoded (limit here 16.7 Mpx).
    big = encode(np.zeros((4000, 5000, 3), np.uint8), "PNG")
    code, details = _status(srv.stub, pb.ClassifyRequest(encoded=big))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "5000x4000 = 20000000 pixels, over the limit" in details
    t = pb.Tensor(dtype=pb.Tensor.UINT8, shape=[5000, 4000, 3], data=b"")
    code, details = _status(srv.stub, pb.ClassifyRequest(tensor=t))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "over the limit" in details


def test_top_k_zero_means_five_and_any_k_is_capped_at_the_class_count(srv) -> None:
    assert len(srv.stub.Classify(pb.ClassifyRequest(encoded=encode(picture(), "PNG")), timeout=30).predictions) == 5
    many = srv.stub.Classify(pb.ClassifyRequest(encoded=encode(picture(), "PNG"), top_k=11), timeout=30)
    assert len(many.predictions) == 10  # one rule for the default and an explicit k (docs/api.md)


def test_model_info(srv) -> None:
    info = srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert (info.name, info.version, info.architecture, info.num_classes) == ("tiny", "1", "resnet18", 10)
    assert list(info.input_shape) == [3, SIZE, SIZE] and info.max_batch_size == 8
    assert (info.precision, info.device, info.engine) == ("fp32", "cpu", "paddle")


def test_health_serving_after_warm_up(srv) -> None:
    stub = health_pb2_grpc.HealthStub(srv.channel)
    for service in ("", "classifier.v1.Classifier"):
        r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(srv) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    services = set(ProtoReflectionDescriptorDatabase(srv.channel).get_services())
    assert {"classifier.v1.Classifier", "grpc.health.v1.Health"} <= services


def test_many_concurrent_unary_calls_all_answered(srv) -> None:
    futures = [srv.stub.Classify.future(_valid(i), timeout=60) for i in range(64)]
    assert [f.result().request_id for f in futures] == [str(i) for i in range(64)]


def test_concurrent_streams_from_threads(srv) -> None:
    results: dict[int, set[str]] = {}

    def one(k: int) -> None:
        results[k] = {r.request_id for r in srv.stub.ClassifyStream(iter([_valid(i) for i in range(30)]),
                                                                    timeout=60)}

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[k] == {str(i) for i in range(30)} for k in range(4))
