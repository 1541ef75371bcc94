"""predictor_config.program_served: which program of an export the workers run, so where uint8 pixels are
normalised (docs/architecture.md, "Where normalisation happens"). On CPU the worker's numpy pass is cheaper than
the graph's operators (bench `normalisation`); on GPU, and with the simulated engine that stands for one, the graph
does it. Every combination an export cannot serve is a ValueError naming the way out."""

from __future__ import annotations

import pytest

from resnet_serve.common.modeldir import FLOAT32_NCHW, UINT8_NHWC, Manifest
from resnet_serve.server.predictor_config import program_served

BASE = dict(name="m", version=3, architecture="resnet18", num_classes=10, input_size=[32, 32],
            mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2], format="pir", model_file="inference.json")
PIXELS = Manifest(**BASE, input_format=UINT8_NHWC, float_model_file="inference_float.json")
PIXELS_ONLY = Manifest(**BASE, input_format=UINT8_NHWC)
FLOAT = Manifest(**BASE)


@pytest.mark.parametrize(("device", "engine", "normalise", "program"), [
    ("cpu", "onednn", "auto", "inference_float.json"),
    ("cpu", "onednn", "worker", "inference_float.json"),
    ("cpu", "onednn", "graph", "inference.json"),
    ("gpu", "tensorrt", "auto", "inference.json"),
    ("gpu", "cuda", "worker", "inference_float.json"),
    ("cpu", "simulated", "auto", "inference.json"),
    ("cpu", "openvino", "auto", "inference.json"),  # its frontend cannot load the float program's shared params
])
def test_a_pixel_export_runs_the_program_that_normalises_where_it_is_cheapest(
        device: str, engine: str, normalise: str, program: str) -> None:
    served = program_served(PIXELS, device, engine, normalise)
    assert served.model_file == program
    assert served.takes_pixels == (program == "inference.json")
    assert (served.mean, served.std, served.name, served.version) == (PIXELS.mean, PIXELS.std, "m", 3)


def test_an_export_with_one_program_runs_it_under_auto() -> None:
    assert program_served(PIXELS_ONLY, "cpu", "onednn", "auto") == PIXELS_ONLY  # no float program to choose
    assert program_served(FLOAT, "gpu", "tensorrt", "auto") == FLOAT  # an older export: the worker normalises
    assert program_served(FLOAT, "cpu", "onednn", "worker").input_format == FLOAT32_NCHW


@pytest.mark.parametrize(("manifest", "normalise", "message"), [
    (FLOAT, "graph", "--normalise graph: m v3 takes float input"),
    (PIXELS_ONLY, "worker", "--normalise worker: m v3 has no float program"),
    (PIXELS, "sideways", "normalise must be auto, graph, worker"),
])
def test_what_an_export_cannot_serve_is_refused_with_the_way_out(manifest: Manifest, normalise: str,
                                                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        program_served(manifest, "cpu", "onednn", normalise)
    with pytest.raises(ValueError, match="OpenVINO engine cannot load an export's float program"):
        program_served(PIXELS, "cpu", "openvino", "worker")
