"""Normalisation inside the exported program (docs/architecture.md, "Where normalisation happens"): a pixel-input
model takes uint8 NHWC, answers as the older float model did (same network, numpy-normalised input), and still
answers float32 model input through its float program, over real gRPC.

tiny_model_dir and tiny_pixel_model_dir hold the same network and weights (tests/harness.py make_tiny_model_dir):
the first as exports wrote it before manifest schema 2, the second as resnet-export writes it now.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from resnet_serve.common.imaging import normalise
from resnet_serve.common.modeldir import load_manifest
from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.server.predictor import build_predictor
from resnet_serve.server.predictor_config import PredictorSettings
from tests.harness import TINY_CLASSES, TINY_INPUT, InProcessServer

SIZE = TINY_INPUT
RTOL = 1e-3  # the export verification's bound (export/resnet_serve/export/verify.py), relative to max |logit|


def within_export_tolerance(reference: np.ndarray, got: np.ndarray) -> None:
    assert np.abs(reference - got).max() <= RTOL * max(1.0, float(np.abs(reference).max()))
    assert (reference.argmax(-1) == got.argmax(-1)).all()


@pytest.fixture(scope="module")
def predictors(tiny_model_dir: Path, tiny_pixel_model_dir: Path):
    """(older float model, pixel model), each built as a CPU worker builds it."""
    def build(root: Path):
        return build_predictor(root / "1", load_manifest(root / "1"), PredictorSettings(threads=1))

    return build(tiny_model_dir), build(tiny_pixel_model_dir)


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_the_older_folder_names_no_input_format_and_is_read_as_float_input(tiny_model_dir: Path) -> None:
    data = json.loads((tiny_model_dir / "1" / "manifest.json").read_text())
    assert "input_format" not in data and data["schema_version"] == 1
    m = load_manifest(tiny_model_dir / "1", verify_checksums=True)
    assert m.input_format == "float32_nchw" and not m.takes_pixels


def program_input(program_json: Path) -> tuple[str, str, list[int]]:
    """(name, dtype, shape) of a PIR program's data op: what the predictor's input is declared as (a predictor's
    input handle reports nothing before it is fed)."""
    ops = json.loads(program_json.read_text())["program"]["regions"][0]["blocks"][0]["ops"]
    [data] = [op for op in ops if op["#"] == "1.data"]
    attrs = {a["N"]: a["AT"]["D"] for a in data["A"]}
    return attrs["name"], attrs["dtype"], attrs["shape"]


def test_the_program_takes_uint8_nhwc_and_matches_the_numpy_normalised_float_model(
        predictors, tiny_model_dir: Path, tiny_pixel_model_dir: Path) -> None:
    assert program_input(tiny_pixel_model_dir / "1" / "inference.json") == ("image", "uint8", [-1, SIZE, SIZE, 3])
    assert program_input(tiny_pixel_model_dir / "1" / "inference_float.json") == ("image", "float32",
                                                                                  [-1, 3, SIZE, SIZE])
    assert program_input(tiny_model_dir / "1" / "inference.json") == ("image", "float32", [-1, 3, SIZE, SIZE])
    old, new = predictors
    x = pixels(4)
    within_export_tolerance(old.run(normalise(x)), new.run(x))
    handle = new.paddle_predictor.get_input_handle(new.input_name)
    assert str(handle.type()).endswith("UINT8")  # fed as is, never converted


def test_float_input_runs_the_float_program_over_the_shared_params(predictors, tiny_pixel_model_dir: Path) -> None:
    """Float model input is never rounded to pixels: the float program answers it as the older model does."""
    old, new = predictors
    m = load_manifest(tiny_pixel_model_dir / "1", verify_checksums=True)
    assert (m.float_model_file, m.params_file) == ("inference_float.json", "inference.pdiparams")
    assert sorted(p.name for p in (tiny_pixel_model_dir / "1").glob("*.pdiparams")) == ["inference.pdiparams"]
    x = np.random.default_rng(1).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)  # no pixels' image
    within_export_tolerance(old.run(x), new.run(x))


@pytest.fixture(scope="module", params=["graph", "worker"])
def srv(request: pytest.FixtureRequest, tiny_pixel_model_dir: Path):
    """The pixel model served both ways (predictor_config.program_served): its pixel program normalising in the
    graph (a GPU's default), and its float program behind the worker's numpy normalisation (the CPU default)."""
    s = InProcessServer(model_dir=str(tiny_pixel_model_dir), max_batch_size=4, buckets="1,4", max_queue_delay_us=20000,
                        threads_per_instance=1, normalise=request.param)
    assert s.engine.normalised_by == request.param
    yield s
    s.close()


def test_a_pixel_model_on_cpu_is_normalised_by_the_worker_unless_asked(tiny_pixel_model_dir: Path) -> None:
    """--normalise auto on CPU: the float program, fed by the worker's numpy pass (cheaper on CPU than the graph's
    operators, bench `normalisation`)."""
    s = InProcessServer(model_dir=str(tiny_pixel_model_dir), max_batch_size=1, threads_per_instance=1)
    try:
        assert s.engine.normalised_by == "worker"
    finally:
        s.close()


def scores(response: pb.ClassifyResponse) -> np.ndarray:
    out = np.zeros(TINY_CLASSES, np.float32)
    for p in response.predictions:
        out[p.class_id] = p.score
    return out


def test_served_uint8_and_float_requests_of_one_image_agree(srv, predictors) -> None:
    """Pixels and their normalisation, in one stream (batches mixing both run through the float program), answer
    as the older model answers the normalised pixels."""
    old, _ = predictors
    x = pixels(4, seed=2)
    floats = normalise(x)
    requests = []
    for i in range(4):
        requests.append(pb.ClassifyRequest(request_id=f"u{i}", top_k=TINY_CLASSES, tensor=pb.Tensor(
            dtype=pb.Tensor.UINT8, shape=[SIZE, SIZE, 3], data=x[i].tobytes())))
        requests.append(pb.ClassifyRequest(request_id=f"f{i}", top_k=TINY_CLASSES, tensor=pb.Tensor(
            dtype=pb.Tensor.FLOAT32, shape=[3, SIZE, SIZE], data=floats[i].tobytes())))
    answers = {r.request_id: r for r in srv.stub.ClassifyStream(iter(requests), timeout=120)}
    assert sorted(answers) == sorted(r.request_id for r in requests)
    logits = old.run(floats)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    for i in range(4):
        np.testing.assert_allclose(scores(answers[f"u{i}"]), expected[i], atol=1e-4)
        np.testing.assert_allclose(scores(answers[f"f{i}"]), scores(answers[f"u{i}"]), atol=1e-4)


def test_model_info_still_describes_the_client_facing_input(srv) -> None:
    info = srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert list(info.input_shape) == [3, SIZE, SIZE]  # float32 requests: [3, H, W]; pixels: [H, W, 3]
    assert info.preprocessing.layout == "NCHW" and len(info.mean) == 3


def test_the_engine_runs_pixel_float_and_mixed_batches_alike(srv, predictors) -> None:
    """Straight to the served engine, so each batch is exactly as given: all pixels (fed as they are), all floats
    and pixels mixed with floats (both through the float program)."""
    old, _ = predictors
    run = srv.engine.runners()[0]
    x = pixels(4, seed=3)
    floats = normalise(x)
    reference = old.run(floats)
    for batch in (list(x), floats, [x[0], floats[1], x[2], floats[3]]):
        within_export_tolerance(reference, run(batch))
