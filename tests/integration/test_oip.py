"""The Open Inference Protocol (KServe v2) front door, exercised with the real tritonclient package against a real
server on the tiny model: ready checks and metadata, ModelInfer with raw and typed contents giving exactly what
classifier.v1.Classify gives, the same error codes, ModelStreamInfer with malformed items answered in-stream,
requests of both APIs in one batch (a worker gate and a runner wrapper prove it), auth, metrics, and
`resnet-client bench --protocol oip`."""

from __future__ import annotations

import asyncio
import io
import json
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from PIL import Image
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from resnet_serve.protos import classifier_pb2 as pb
from tests.harness import InProcessServer, WorkerGate, gated_workers, run_cli, wait_for

SIZE, CLASSES, MODEL = 32, 10, "tiny"
TOKEN = "oip-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
HEADERS = dict(AUTH)


# --- fixtures --------------------------------------------------------------------------------------------------
class BatchRecorder:
    """Wraps the engine's runners: records the tag (first pixel value) of every item of every batch."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batches: list[list[int]] = []

    def wrap(self, runner):
        def run(batch):
            with self.lock:
                self.batches.append([int(x[0, 0, 0]) for x in batch])
            return runner(batch)

        return run


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory):
    """Open unless a test holds it (then every batch waits in the worker until the test opens it)."""
    with gated_workers(tmp_path_factory.mktemp("gate") / "fifo") as g:
        g.open()
        yield g
        g.open()


@pytest.fixture(scope="module")
def recorder() -> BatchRecorder:
    return BatchRecorder()


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, gate: WorkerGate, recorder: BatchRecorder, tmp_path_factory: pytest.TempPathFactory):
    """Work-conserving batches of up to 8, with a bearer token (health and OIP probes exempt); one batch in the
    worker at a time, so a held batch keeps every later request queued."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(TOKEN + "\n")
    s = InProcessServer(model_dir=str(tiny_model_dir), max_batch_size=8, max_queue_delay_us=0, max_queue_size=64,
                        threads_per_instance=1, auth_token_file=str(tokens), wrap_runner=recorder.wrap,
                        batches_in_flight=1)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(srv: InProcessServer):
    c = tc.InferenceServerClient(srv.address)
    yield c
    c.close()


# --- helpers ---------------------------------------------------------------------------------------------------
def picture(seed: int, tag: int | None = None, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if tag is not None:
        arr[0, 0, 0] = tag
    return arr


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def uint8_input(batch: np.ndarray, name: str = "uint8_hwc") -> tc.InferInput:
    t = tc.InferInput(name, list(batch.shape), "UINT8")
    t.set_data_from_numpy(batch)
    return t


def encoded_input(blobs: list[bytes]) -> tc.InferInput:
    arr = np.array([[b] for b in blobs], dtype=np.object_)
    t = tc.InferInput("encoded", list(arr.shape), "BYTES")
    t.set_data_from_numpy(arr)
    return t


def v1_tensor(arr: np.ndarray, top_k: int = 0) -> pb.ClassifyRequest:
    dtype = pb.Tensor.UINT8 if arr.dtype == np.uint8 else pb.Tensor.FLOAT32
    return pb.ClassifyRequest(top_k=top_k, tensor=pb.Tensor(dtype=dtype, shape=list(arr.shape),
                                                            data=arr.astype(arr.dtype.newbyteorder("<")).tobytes()))


def v1_rows(srv: InProcessServer, requests: list[pb.ClassifyRequest]) -> list[list[tuple[int, str, np.float32]]]:
    """classifier.v1.Classify's answers as rows of (class id, label, score as float32)."""
    out = []
    for r in requests:
        response = srv.stub.Classify(r, metadata=AUTH, timeout=60)
        assert response.model_version == "1"
        out.append([(p.class_id, p.label, np.float32(p.score)) for p in response.predictions])
    return out


def oip_rows(result) -> list[list[tuple[int, str, np.float32]]]:
    ids, scores, labels = (result.as_numpy(n) for n in ("class_ids", "scores", "labels"))
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == scores.shape == labels.shape
    return [[(int(i), lab.decode(), s) for i, s, lab in zip(ri, rs, rl, strict=True)]
            for ri, rs, rl in zip(ids, scores, labels, strict=True)]


def code_of(e: InferenceServerException) -> str:
    return (e.status() or "").rpartition(".")[2]


def requests_total(srv: InProcessServer, method: str, code: str | None = None) -> float:
    return sum(v for (name, labels), v in srv.metrics().items()
               if name == "resnet_serve_requests_total" and dict(labels)["method"] == method
               and (code is None or dict(labels)["code"] == code))


# --- probes and metadata ---------------------------------------------------------------------------------------
def test_ready_checks_and_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live(headers=HEADERS) and client.is_server_ready(headers=HEADERS)
    assert client.is_model_ready(MODEL, headers=HEADERS) and client.is_model_ready(MODEL, "1", headers=HEADERS)
    assert not client.is_model_ready(MODEL, "2", headers=HEADERS)
    assert not client.is_model_ready("other", headers=HEADERS)
    server = client.get_server_metadata(headers=HEADERS)
    assert server.name == "resnet-serve" and server.version and "model_configuration" in server.extensions
    meta = client.get_model_metadata(MODEL, headers=HEADERS)
    assert (meta.name, list(meta.versions), meta.platform) == (MODEL, ["1"], "paddle")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("encoded", "BYTES", [-1, 1]), ("uint8_hwc", "UINT8", [-1, -1, -1, 3]),
        ("float32_chw", "FP32", [-1, 3, SIZE, SIZE])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("class_ids", "INT64", [-1, -1]), ("scores", "FP32", [-1, -1]), ("labels", "BYTES", [-1, -1])]
    config = client.get_model_config(MODEL, headers=HEADERS).config
    assert config.max_batch_size == 8 and [i.optional for i in config.input] == [True] * 3
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert config.parameters["num_classes"].string_value == str(CLASSES)
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("other", headers=HEADERS)
    assert code_of(err.value) == "NOT_FOUND"


def test_reflection_lists_the_inference_service(srv: InProcessServer) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert "inference.GRPCInferenceService" in set(ProtoReflectionDescriptorDatabase(srv.channel).get_services())


def test_probes_need_no_token_but_everything_else_does(srv: InProcessServer) -> None:
    anonymous = tc.InferenceServerClient(srv.address)
    try:
        assert anonymous.is_server_live() and anonymous.is_server_ready()
        for call in (lambda: anonymous.is_model_ready(MODEL), lambda: anonymous.get_model_metadata(MODEL),
                     lambda: anonymous.infer(MODEL, [uint8_input(picture(0)[None])])):
            with pytest.raises(InferenceServerException) as err:
                call()
            assert code_of(err.value) == "UNAUTHENTICATED"
    finally:
        anonymous.close()


# --- ModelInfer ------------------------------------------------------------------------------------------------
def test_raw_uint8_batch_matches_classify(srv: InProcessServer, client: tc.InferenceServerClient) -> None:
    pictures = [picture(i) for i in range(3)]
    before = requests_total(srv, "ModelInfer", "OK")
    result = client.infer(MODEL, [uint8_input(np.stack(pictures))], request_id="raw-3", parameters={"top_k": 3},
                          headers=HEADERS)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("raw-3", MODEL, "1")
    assert result.as_numpy("class_ids").shape == (3, 3)
    assert oip_rows(result) == v1_rows(srv, [v1_tensor(p, 3) for p in pictures])
    assert requests_total(srv, "ModelInfer", "OK") - before == 1  # one request, whatever its batch


def test_encoded_images_default_top_k_and_resize_match_classify(srv: InProcessServer,
                                                                client: tc.InferenceServerClient) -> None:
    blobs = [png(picture(10, h=48, w=40)), png(picture(11))]  # the first is resized like classifier.v1 does
    result = client.infer(MODEL, [encoded_input(blobs)], headers=HEADERS)
    assert result.as_numpy("class_ids").shape == (2, 5)
    assert oip_rows(result) == v1_rows(srv, [pb.ClassifyRequest(encoded=b) for b in blobs])
    # Requested outputs: only those come back.
    only = client.infer(MODEL, [encoded_input(blobs[:1])], outputs=[tc.InferRequestedOutput("scores")],
                        headers=HEADERS)
    assert [o.name for o in only.get_response().outputs] == ["scores"]
    assert only.as_numpy("class_ids") is None and only.as_numpy("scores").shape == (1, 5)
    # Any-size raw pixels are resized like an encoded image.
    odd = picture(12, h=40, w=36)
    assert oip_rows(client.infer(MODEL, [uint8_input(odd[None])], headers=HEADERS)) == \
        v1_rows(srv, [v1_tensor(odd)])


def test_typed_contents_equal_raw_contents(srv: InProcessServer, client: tc.InferenceServerClient) -> None:
    """Requests built with the package's own message classes, `contents` instead of raw_input_contents."""
    stub = oip_grpc.GRPCInferenceServiceStub(srv.channel)
    pictures = np.stack([picture(20), picture(21)])

    def typed(name: str, datatype: str, shape: list[int], fill: Callable) -> tc.InferResult:
        request = oip.ModelInferRequest(model_name=MODEL, id="typed")
        request.parameters["top_k"].int64_param = 4
        fill(request.inputs.add(name=name, datatype=datatype, shape=shape).contents)
        return tc.InferResult(stub.ModelInfer(request, metadata=AUTH, timeout=60))

    raw = oip_rows(client.infer(MODEL, [uint8_input(pictures)], parameters={"top_k": 4}, headers=HEADERS))
    assert oip_rows(typed("uint8_hwc", "UINT8", [2, SIZE, SIZE, 3],
                          lambda c: c.uint_contents.extend(pictures.ravel().tolist()))) == raw
    blobs = [png(p) for p in pictures]
    assert oip_rows(typed("encoded", "BYTES", [2, 1], lambda c: c.bytes_contents.extend(blobs))) == raw
    normalised = np.random.default_rng(5).normal(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    as_typed = oip_rows(typed("float32_chw", "FP32", [1, 3, SIZE, SIZE],
                              lambda c: c.fp32_contents.extend(normalised.ravel().tolist())))
    as_raw = tc.InferInput("float32_chw", list(normalised.shape), "FP32")
    as_raw.set_data_from_numpy(normalised)
    expected = v1_rows(srv, [v1_tensor(normalised[0], 4)])
    assert as_typed == expected
    assert oip_rows(client.infer(MODEL, [as_raw], parameters={"top_k": 4}, headers=HEADERS)) == expected


def raw_request(name: str, datatype: str, shape: list[int], data: bytes, **params) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=MODEL, raw_input_contents=[data])
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    for key, value in params.items():
        request.parameters[key].CopyFrom(value)
    return request


def _int(v: int) -> oip.InferParameter:
    return oip.InferParameter(int64_param=v)


NAN = np.full((3, SIZE, SIZE), np.nan, dtype=np.float32)
# (what, OIP request, the classifier.v1 request that is wrong the same way or None, code)
BAD = [
    ("undecodable", raw_request("encoded", "BYTES", [1, 1], b"\x07\x00\x00\x00garbage"),
     pb.ClassifyRequest(encoded=b"garbage"), "INVALID_ARGUMENT"),
    ("4 channels", raw_request("uint8_hwc", "UINT8", [1, SIZE, SIZE, 4], bytes(SIZE * SIZE * 4)),
     pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE, 4], data=bytes(SIZE * SIZE * 4))),
     "INVALID_ARGUMENT"),
    ("NaN", raw_request("float32_chw", "FP32", [1, 3, SIZE, SIZE], NAN.tobytes()), v1_tensor(NAN),
     "INVALID_ARGUMENT"),
    ("short data", raw_request("uint8_hwc", "UINT8", [2, SIZE, SIZE, 3], picture(0).tobytes()), None,
     "INVALID_ARGUMENT"),
    ("batch over max", raw_request("uint8_hwc", "UINT8", [9, 1, 1, 3], bytes(27)), None, "INVALID_ARGUMENT"),
    ("unknown input", raw_request("pixels", "UINT8", [1, SIZE, SIZE, 3], picture(0).tobytes()), None,
     "INVALID_ARGUMENT"),
    ("wrong datatype", raw_request("uint8_hwc", "FP32", [1, SIZE, SIZE, 3], bytes(SIZE * SIZE * 12)), None,
     "INVALID_ARGUMENT"),
    ("no batch dim", raw_request("uint8_hwc", "UINT8", [SIZE, SIZE, 3], picture(0).tobytes()), None,
     "INVALID_ARGUMENT"),
    ("malformed BYTES", raw_request("encoded", "BYTES", [1, 1], b"\xff\x00\x00\x00abc"), None, "INVALID_ARGUMENT"),
    ("negative top_k", raw_request("uint8_hwc", "UINT8", [1, SIZE, SIZE, 3], picture(0).tobytes(),
                                   top_k=_int(-1)), None, "INVALID_ARGUMENT"),
    ("top_k not a number", raw_request("uint8_hwc", "UINT8", [1, SIZE, SIZE, 3], picture(0).tobytes(),
                                       top_k=oip.InferParameter(string_param="many")), None, "INVALID_ARGUMENT"),
]


def test_errors_map_to_the_same_codes_and_messages(srv: InProcessServer) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(srv.channel)
    before = requests_total(srv, "ModelInfer", "INVALID_ARGUMENT")
    for what, request, v1_request, code in BAD:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, metadata=AUTH, timeout=60)
        assert err.value.code().name == code, (what, err.value.details())
        if v1_request is not None:
            with pytest.raises(grpc.RpcError) as v1_err:
                srv.stub.Classify(v1_request, metadata=AUTH, timeout=60)
            assert (v1_err.value.code(), v1_err.value.details()) == (err.value.code(), err.value.details()), what
    assert requests_total(srv, "ModelInfer", "INVALID_ARGUMENT") - before == len(BAD)
    # Other models and versions, a request with two images inputs, an output the model does not have.
    two = raw_request("uint8_hwc", "UINT8", [1, SIZE, SIZE, 3], picture(0).tobytes())
    two.inputs.add(name="encoded", datatype="BYTES", shape=[1, 1])
    two.raw_input_contents.append(b"\x01\x00\x00\x00x")
    unknown_output = raw_request("uint8_hwc", "UINT8", [1, SIZE, SIZE, 3], picture(0).tobytes())
    unknown_output.outputs.add(name="logits")
    for request, code in [(oip.ModelInferRequest(model_name="other"), "NOT_FOUND"),
                          (oip.ModelInferRequest(model_name=MODEL, model_version="7"), "NOT_FOUND"),
                          (two, "INVALID_ARGUMENT"), (unknown_output, "INVALID_ARGUMENT")]:
        request.id = "bad"
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, metadata=AUTH, timeout=60)
        assert err.value.code().name == code and err.value.details().startswith("[request id: bad] ")


# --- ModelStreamInfer ------------------------------------------------------------------------------------------
def stream_item(i: int) -> tuple[dict, str | None]:
    """Request i of the stream test and the error code it must get (None: a valid request)."""
    pic = picture(100 + i)
    item = {"model_name": MODEL, "request_id": f"r{i}", "inputs": [uint8_input(pic[None])]}
    if i % 2:
        item["inputs"] = [encoded_input([png(pic)])]
    if i % 3 == 0:
        item["parameters"] = {"top_k": 3}
    if i % 10 == 3:
        return {**item, "inputs": [encoded_input([b"not an image"])]}, "INVALID_ARGUMENT"
    if i % 10 == 7:
        return {**item, "inputs": [uint8_input(np.zeros((1, SIZE, SIZE, 4), np.uint8))]}, "INVALID_ARGUMENT"
    if i == 50:
        return {**item, "inputs": [uint8_input(pic[None], name="pixels")]}, "INVALID_ARGUMENT"
    if i == 98:
        return {**item, "model_name": "other"}, "NOT_FOUND"
    return item, None


async def run_stream(address: str, items: list[dict]) -> list[tuple[tc.InferResult | None, Exception | None]]:
    client = tc_aio.InferenceServerClient(address)

    async def requests():
        for item in items:
            yield item

    try:
        return [pair async for pair in client.stream_infer(requests(), headers=HEADERS)]
    finally:
        await client.close()


def test_stream_of_100_with_malformed_items_answers_each_once(srv: InProcessServer) -> None:
    items, expected = zip(*(stream_item(i) for i in range(100)), strict=True)
    before = {code: requests_total(srv, "ModelStreamInfer", code) for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND")}
    answers = asyncio.run(run_stream(srv.address, list(items)))
    assert len(answers) == 100
    got: dict[str, object] = {}
    for result, error in answers:
        if error is None:
            rid, value = result.get_response().id, result
        else:
            m = re.match(r"^\[request id: (r\d+)\] ([A-Z_]+): ", error.message())
            assert m, error.message()
            rid, value = m[1], m[2]
        assert rid not in got, f"{rid} answered twice"
        got[rid] = value
    assert sorted(got) == sorted(f"r{i}" for i in range(100))  # every request answered, exactly once
    assert {rid: v for rid, v in got.items() if isinstance(v, str)} == \
        {f"r{i}": code for i, code in enumerate(expected) if code is not None}
    # Every valid answer equals classifier.v1.Classify on the same image with the same top_k.
    valid = [i for i, code in enumerate(expected) if code is None]
    v1 = v1_rows(srv, [v1_tensor(picture(100 + i), 3 if i % 3 == 0 else 0) for i in valid])
    assert [oip_rows(got[f"r{i}"])[0] for i in valid] == v1
    deltas = {code: requests_total(srv, "ModelStreamInfer", code) - n for code, n in before.items()}
    assert deltas == {"OK": len(valid), "INVALID_ARGUMENT": 100 - len(valid) - 1, "NOT_FOUND": 1}


# --- one queue for both APIs -----------------------------------------------------------------------------------
def test_requests_of_both_apis_form_one_batch(srv: InProcessServer, gate: WorkerGate, recorder: BatchRecorder,
                                              client: tc.InferenceServerClient) -> None:
    wait_for(lambda: srv.server.batcher.in_flight == 0, what="an idle server")
    gate.hold()
    v1_tags, oip_tags = [1, 2, 3, 4], [101, 102, 103, 104]
    answers: queue.Queue = queue.Queue()
    try:
        calls, batches = len(srv.call_log), len(recorder.batches)
        blocker = srv.stub.Classify.future(v1_tensor(picture(0, tag=250)), metadata=AUTH, timeout=120)
        wait_for(lambda: len(srv.call_log) == calls + 1, what="the first batch held in the worker")
        v1_futures = []
        for v1_tag, oip_tag in zip(v1_tags, oip_tags, strict=True):
            v1_futures.append(srv.stub.Classify.future(v1_tensor(picture(v1_tag, tag=v1_tag)), metadata=AUTH,
                                                       timeout=120))
            client.async_infer(MODEL, [uint8_input(picture(oip_tag, tag=oip_tag)[None])],
                               lambda result, error, tag=oip_tag: answers.put((tag, result, error)),
                               request_id=str(oip_tag), headers=HEADERS, client_timeout=120)
        wait_for(lambda: srv.server.batcher.queue_depth == 8, what="both APIs' requests queued")
    finally:
        gate.open()
    assert blocker.result().predictions and all(f.result().predictions for f in v1_futures)
    oip_answers = [answers.get(timeout=60) for _ in oip_tags]
    assert all(error is None for _, _, error in oip_answers)
    assert sorted(int(result.get_response().id) for _, result, _ in oip_answers) == oip_tags
    assert [n for _, n in srv.call_log[calls:]] == [1, 8]
    first, mixed = recorder.batches[batches:]
    assert first == [250] and sorted(mixed) == v1_tags + oip_tags  # one batch holding both APIs' requests


def test_a_message_of_model_sized_images_is_queued_whole_or_refused_whole(srv: InProcessServer, gate: WorkerGate,
                                                                          client: tc.InferenceServerClient) -> None:
    """Behind a held batch, seven messages of 8 and one single fill 57 of the 64 queue places: a message of 8 is
    then refused whole (RESOURCE_EXHAUSTED, none of its images queued), and every admitted image is answered."""
    wait_for(lambda: srv.server.batcher.in_flight == 0, what="an idle server")
    gate.hold()
    answers: queue.Queue = queue.Queue()

    def send(tags: list[int]) -> None:
        batch = np.stack([picture(t, tag=t) for t in tags])
        client.async_infer(MODEL, [uint8_input(batch)], lambda result, error: answers.put((tags, result, error)),
                           parameters={"top_k": 1}, headers=HEADERS, client_timeout=120)

    try:
        calls = len(srv.call_log)
        blocker = srv.stub.Classify.future(v1_tensor(picture(0, tag=250)), metadata=AUTH, timeout=120)
        wait_for(lambda: len(srv.call_log) == calls + 1, what="the first batch held in the worker")
        messages = [list(range(10 * m + 1, 10 * m + 9)) for m in range(7)] + [[99]]
        for tags in messages:
            send(tags)
        wait_for(lambda: srv.server.batcher.queue_depth == 57, what="57 images queued")
        send(list(range(200, 208)))
        refused = answers.get(timeout=60)  # the only answer possible while the worker is held
        assert refused[0] == list(range(200, 208))
        assert code_of(refused[2]) == "RESOURCE_EXHAUSTED" and "queue is full" in refused[2].message()
        assert srv.server.batcher.queue_depth == 57
    finally:
        gate.open()
    assert blocker.result().predictions
    done = [answers.get(timeout=60) for _ in messages]
    assert all(error is None for _, _, error in done)
    for tags, result, _ in done:  # each image its own answer, in the message's order
        assert oip_rows(result) == v1_rows(srv, [v1_tensor(picture(t, tag=t), 1) for t in tags])


def test_triton_timeout_parameter_expires_in_the_queue(srv: InProcessServer, gate: WorkerGate,
                                                       client: tc.InferenceServerClient) -> None:
    """Triton's `timeout` (µs) is a server-side deadline: expired while queued -> DEADLINE_EXCEEDED, like v1."""
    wait_for(lambda: srv.server.batcher.in_flight == 0, what="an idle server")
    gate.hold()
    try:
        calls = len(srv.call_log)
        blocker = srv.stub.Classify.future(v1_tensor(picture(0)), metadata=AUTH, timeout=120)
        wait_for(lambda: len(srv.call_log) == calls + 1, what="a batch held in the worker")
        answers: queue.Queue = queue.Queue()
        client.async_infer(MODEL, [uint8_input(picture(1)[None])], lambda result, error: answers.put(error),
                           timeout=1000, headers=HEADERS, client_timeout=120)
        error = answers.get(timeout=60)  # the worker is held: the only possible answer is the deadline
    finally:
        gate.open()
    assert code_of(error) == "DEADLINE_EXCEEDED" and "deadline expired while queued" in error.message()
    assert blocker.result().predictions and [n for _, n in srv.call_log[calls:]] == [1]


def test_statistics_count_images_and_batches(client: tc.InferenceServerClient) -> None:
    before = client.get_inference_statistics(MODEL, headers=HEADERS).model_stats[0]
    client.infer(MODEL, [uint8_input(np.stack([picture(1), picture(2)]))], headers=HEADERS)
    after = client.get_inference_statistics(MODEL, headers=HEADERS).model_stats[0]
    assert (after.name, after.version) == (MODEL, "1")
    assert after.inference_count - before.inference_count == 2
    assert after.execution_count - before.execution_count in (1, 2)
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == 2


# --- the load generator ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,extra", [("unary", ["--concurrency", "2"]),
                                        ("stream", ["--concurrency", "4", "--input", "jpeg"])])
def test_bench_over_oip_counts_match_the_server(srv: InProcessServer, mode: str, extra: list[str]) -> None:
    method = {"unary": "ModelInfer", "stream": "ModelStreamInfer"}[mode]
    before = requests_total(srv, method)
    r = run_cli("resnet-client", "bench", "--protocol", "oip", "--model", MODEL, "--target", srv.address,
                "--token", TOKEN, "--mode", mode, "--warmup", "0", "--requests", "10", "--json", *extra)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["protocol"] == "oip" and doc["model"]["name"] == MODEL
    (step,) = doc["steps"]  # request-bounded: nothing asserted depends on what fits in a time window
    assert step["protocol"] == "oip" and step["errors"] == {} and (step["requests"], step["warmup_requests"]) == (10, 0)
    assert step["images_per_s"] > 0
    assert requests_total(srv, method) - before == step["requests"] + step["warmup_requests"]


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_bench_batch_sends_n_images_per_request_and_counts_both(srv: InProcessServer,
                                                                client: tc.InferenceServerClient, mode: str) -> None:
    method = {"unary": "ModelInfer", "stream": "ModelStreamInfer"}[mode]
    before = requests_total(srv, method)
    images_before = client.get_inference_statistics(MODEL, headers=HEADERS).model_stats[0].inference_count
    r = run_cli("resnet-client", "bench", "--protocol", "oip", "--model", MODEL, "--target", srv.address,
                "--token", TOKEN, "--mode", mode, "--warmup", "0", "--requests", "6", "--batch", "3",
                "--concurrency", "2", "--json")
    assert r.returncode == 0, r.stderr
    (step,) = json.loads(r.stdout)["steps"]
    assert step["errors"] == {} and (step["requests"], step["warmup_requests"], step["batch"]) == (6, 0, 3)
    assert requests_total(srv, method) - before == 6
    images = client.get_inference_statistics(MODEL, headers=HEADERS).model_stats[0].inference_count
    assert images - images_before == 18


def test_bench_over_oip_needs_a_model_and_reports_errors(srv: InProcessServer) -> None:
    r = run_cli("resnet-client", "bench", "--protocol", "oip", "--target", srv.address)
    assert r.returncode == 2 and "--model" in r.stderr
    r = run_cli("resnet-client", "bench", "--protocol", "oip", "--model", "other", "--target", srv.address,
                "--token", TOKEN, "--warmup", "0", "--requests", "2")
    assert r.returncode == 1 and r.stderr.startswith("error: NOT_FOUND: ")


def test_repository_index_lists_the_served_model_as_tritonclient_reads_it(srv: InProcessServer,
                                                                         client: tc.InferenceServerClient) -> None:
    index = client.get_model_repository_index(headers=HEADERS, as_json=True)
    assert index == {"models": [{"name": MODEL, "version": "1", "state": "READY"}]}
    stub = oip_grpc.GRPCInferenceServiceStub(srv.channel)
    ready_only = stub.RepositoryIndex(oip.RepositoryIndexRequest(ready=True), metadata=AUTH, timeout=10)
    assert [(m.name, m.version, m.state) for m in ready_only.models] == [(MODEL, "1", "READY")]
    # documented as UNIMPLEMENTED (docs/oip.md): repository control and shared memory
    for call in (lambda: client.load_model(MODEL, headers=HEADERS),
                 lambda: client.get_system_shared_memory_status(headers=HEADERS),
                 lambda: client.get_cuda_shared_memory_status(headers=HEADERS)):
        with pytest.raises(InferenceServerException, match="UNIMPLEMENTED"):
            call()
