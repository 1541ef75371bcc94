"""predictor_config: predictor settings as data, checked against a recording fake Config (GPU included); no Paddle
(server/resnet_serve/server/predictor_config.py). On a real paddle.inference.Config:
tests/integration/test_predictor_config.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from resnet_serve.common.modeldir import Manifest
from resnet_serve.server.predictor_config import (
    FP32_FEED_FETCH,
    PIR_TRT_CONVERT,
    Precision,
    PredictorSettings,
    apply_plan,
    config_steps,
    default_trt_cache_dir,
    effective_engine,
    effective_precision,
    model_files,
    plan_config,
)

VDIR = Path("/models/tiny/1")


def manifest(fmt: str = "pir", input_format: str = "float32_nchw") -> Manifest:
    return Manifest(name="tiny", version=1, architecture="resnet18", num_classes=10, input_size=[32, 48],
                    mean=[0.5] * 3, std=[0.5] * 3, format=fmt,
                    model_file="inference.json" if fmt == "pir" else "inference.pdmodel", input_format=input_format)


# TensorRT's dynamic shapes follow the program's input: older float exports, then pixel-input exports (H=32, W=48).
SHAPES = [("float32_nchw", [3, 32, 48], "float32"), ("uint8_nhwc", [32, 48, 3], "uint8")]


class RecordingConfig:
    """Stands in for paddle.inference.Config: records every method call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        def record(*args: object) -> None:
            self.calls.append((name, args))

        return record


FAKE_PRECISION = SimpleNamespace(Float32="F32", Half="F16", Int8="I8", Bfloat16="BF16")


def names(plan: list[tuple[str, tuple]]) -> list[str]:
    return [n for n, _ in plan]


def test_cpu_pir_plan_enables_onednn_and_never_memory_optim() -> None:
    plan = plan_config(VDIR, manifest("pir"), threads=3)
    assert plan == [
        ("disable_glog_info", ()),
        ("enable_mkldnn", ()),
        ("set_cpu_math_library_num_threads", (3,)),
        ("switch_ir_optim", (True,)),
    ]
    fake = RecordingConfig()
    apply_plan(fake, plan)  # no Precision markers: needs no Paddle
    assert fake.calls == plan


def test_cpu_legacy_plan_allows_memory_optim() -> None:
    plan = plan_config(VDIR, manifest("legacy"), threads=1)
    assert names(plan) == ["disable_glog_info", "enable_mkldnn", "set_cpu_math_library_num_threads",
                           "switch_ir_optim", "enable_memory_optim"]


def test_cpu_int8_legacy_enables_onednn_int8_after_onednn() -> None:
    n = names(plan_config(VDIR, manifest("legacy"), precision="int8"))
    assert n.index("enable_mkldnn") < n.index("enable_mkldnn_int8")


@pytest.mark.parametrize("precision,expected", [("fp32", "Float32"), ("int8", "Int8")])
def test_openvino_plan_passes_precision_and_skips_onednn(precision: str, expected: str) -> None:
    plan = plan_config(VDIR, manifest("legacy"), precision=precision, engine="openvino", threads=2)
    assert ("enable_openvino_engine", (Precision(expected),)) in plan
    assert "enable_mkldnn" not in names(plan)
    assert ("set_cpu_math_library_num_threads", (2,)) in plan
    fake = RecordingConfig()
    apply_plan(fake, plan, precision_type=FAKE_PRECISION)
    assert ("enable_openvino_engine", (getattr(FAKE_PRECISION, expected),)) in fake.calls


@pytest.mark.parametrize("kwargs,fmt,match", [
    ({"precision": "int8"}, "pir", "legacy"),
    ({"engine": "openvino"}, "pir", "legacy"),
    ({"engine": "openvino", "device": "gpu"}, "legacy", "CPU only"),
    ({"precision": "fp16"}, "pir", "fp16"),
    ({"device": "tpu"}, "pir", "device"),
    ({"precision": "fp8"}, "pir", "precision"),
    ({"engine": "onnx"}, "pir", "engine"),
    ({"threads": 0}, "pir", "threads"),
    ({"device": "gpu", "precision": "int8"}, "pir", "int8 runs on CPU only"),
    ({"device": "gpu", "precision": "int8"}, "legacy", "int8 runs on CPU only"),
    ({"device": "gpu", "engine": "onednn"}, "pir", "CPU only"),
    ({"engine": "tensorrt"}, "pir", "GPU only"),
    ({"engine": "cuda"}, "legacy", "GPU only"),
])
def test_unsupported_combinations_raise(kwargs: dict, fmt: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_config(VDIR, manifest(fmt), **kwargs)


@pytest.mark.parametrize("setting", ["fp32", "int8"])
def test_int8_export_on_gpu_is_refused_in_one_line(setting: str) -> None:
    m = manifest("legacy")
    m.precision = "int8"
    with pytest.raises(ValueError, match="int8 runs on CPU only") as e:
        plan_config(VDIR, m, device="gpu", precision=setting)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("input_format,shape,dtype", SHAPES)
@pytest.mark.parametrize("precision,mode", [("fp32", "Float32"), ("fp16", "Half")])
def test_fake_gpu_legacy_plan_uses_classic_tensorrt(precision: str, mode: str, input_format: str, shape: list[int],
                                                    dtype: str, tmp_path: Path) -> None:
    plan = plan_config(VDIR, manifest("legacy", input_format), device="gpu", precision=precision,
                       max_batch_size=16, trt_cache_dir=tmp_path, gpu_id=1)
    assert plan[0] == FP32_FEED_FETCH
    assert plan[1] == ("enable_use_gpu", (256, 1))  # must precede enable_tensorrt_engine
    trt = dict(plan)["enable_tensorrt_engine"]
    # workspace, max_batch, min_subgraph, precision, use_static, use_calib_mode
    assert trt == (1 << 30, 16, 3, Precision(mode), True, False)
    assert dict(plan)["set_trt_dynamic_shape_info"] == (
        {"image": [1, *shape]}, {"image": [16, *shape]}, {"image": [16, *shape]})
    assert dict(plan)["set_optim_cache_dir"] == (str(tmp_path),)
    assert "enable_mkldnn" not in names(plan)
    fake = RecordingConfig()
    apply_plan(fake, plan, precision_type=FAKE_PRECISION)
    assert [n for n, _ in fake.calls] == names(plan)
    assert dict(fake.calls)["enable_tensorrt_engine"][3] == getattr(FAKE_PRECISION, mode)


def test_fake_gpu_trt_cache_defaults_to_version_dir_and_is_absolute(monkeypatch, tmp_path: Path) -> None:
    plan = plan_config(VDIR, manifest("legacy"), device="gpu")
    assert dict(plan)["set_optim_cache_dir"] == (str(default_trt_cache_dir(VDIR)),)
    monkeypatch.chdir(tmp_path)
    relative = plan_config(Path("models/tiny/1"), manifest("pir"), device="gpu", trt_cache_dir=Path("cache"))
    step = relative[0][1][0]
    assert Path(step["save_model_dir"]).is_absolute() and Path(step["model_prefix"]).is_absolute()
    assert step["save_model_dir"] == str(tmp_path / "cache" / "inference")


@pytest.mark.parametrize("input_format,shape,dtype", SHAPES)
@pytest.mark.parametrize("precision,mode", [("fp32", "FP32"), ("fp16", "FP16")])
def test_fake_gpu_pir_plan_is_a_conversion_step_then_gpu_config(precision: str, mode: str, input_format: str,
                                                                  shape: list[int], dtype: str,
                                                                  tmp_path: Path) -> None:
    plan = plan_config(VDIR, manifest("pir", input_format), device="gpu", precision=precision, max_batch_size=4,
                       trt_cache_dir=tmp_path)
    assert plan[0][0] == PIR_TRT_CONVERT
    step = plan[0][1][0]
    assert step["model_prefix"] == str(VDIR / "inference")  # no .json: Paddle's loader appends it
    assert step["inputs"] == [{"name": "image", "min_input_shape": [1, *shape], "optim_input_shape": [4, *shape],
                               "max_input_shape": [4, *shape], "input_data_type": dtype}]
    assert step["precision_mode"] == mode
    assert step["save_model_dir"].startswith(str(tmp_path))
    cfg_steps = config_steps(plan)
    assert cfg_steps[:2] == [FP32_FEED_FETCH, ("enable_use_gpu", (256, 0))]
    # Classic TRT and memory_optim are not for .json models.
    assert not {"enable_tensorrt_engine", "enable_memory_optim"} & set(names(cfg_steps))
    assert model_files(VDIR, manifest("pir"), plan) == (step["save_model_dir"] + ".json",
                                                        step["save_model_dir"] + ".pdiparams")
    fake = RecordingConfig()
    apply_plan(fake, plan)
    assert fake.calls == cfg_steps  # the conversion is the worker's job, not a Config call


def test_model_files_without_conversion_are_the_manifest_files() -> None:
    m = manifest("legacy")
    assert model_files(VDIR, m, plan_config(VDIR, m)) == (str(VDIR / "inference.pdmodel"),
                                                          str(VDIR / "inference.pdiparams"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fake_gpu_cuda_engine_is_paddlex_paddle_fp16(precision: str) -> None:
    """--engine cuda: Paddle's GPU kernels, fp16 through enable_use_gpu's precision (PaddleX static_infer.py)."""
    for fmt in ("pir", "legacy"):
        plan = plan_config(VDIR, manifest(fmt), device="gpu", precision=precision, engine="cuda", gpu_id=2)
        mode = Precision("Half" if precision == "fp16" else "Float32")
        assert plan[:3] == [FP32_FEED_FETCH, ("disable_mkldnn", ()), ("enable_use_gpu", (256, 2, mode))]
        assert not {"enable_tensorrt_engine", PIR_TRT_CONVERT} & set(names(plan))
        assert ("enable_memory_optim" in names(plan)) == (fmt == "legacy")


def test_default_engine_on_gpu_is_tensorrt() -> None:
    assert effective_engine("paddle", manifest("pir"), "gpu") == "tensorrt"
    assert effective_engine("cuda", manifest("pir"), "gpu") == "cuda"
    assert plan_config(VDIR, manifest("pir"), device="gpu") == plan_config(VDIR, manifest("pir"), device="gpu",
                                                                           engine="tensorrt")


def test_an_int8_export_always_runs_int8_and_refuses_other_precisions() -> None:
    m = manifest("legacy")
    m.precision = "int8"
    assert effective_precision("fp32", m) == effective_precision("int8", m) == "int8"
    with pytest.raises(ValueError) as raised:
        effective_precision("fp16", m)
    assert str(raised.value) == "tiny v1 is an int8 export; it cannot run as fp16"
    with pytest.raises(ValueError) as raised:
        effective_precision("int8", manifest("legacy"))
    assert str(raised.value) == ("precision int8 needs an int8 export (resnet-export --precision int8 --calibration "
                                 "...); tiny v1 is fp32")


def test_the_default_engine_on_cpu_is_the_manifests_and_openvino_refuses_int8_exports() -> None:
    m = manifest("legacy")
    assert effective_engine("paddle", m) == "paddle"
    m.engine = "openvino"
    assert effective_engine("paddle", m) == "openvino"  # the export chose it
    assert effective_engine("onednn", m) == "onednn"  # an explicit setting wins
    m.precision = "int8"
    with pytest.raises(ValueError, match="cannot run Paddle's quantised int8 program; serve int8 exports with "
                                         "--engine onednn"):
        effective_engine("paddle", m)


def test_predictor_settings_plan_as_plan_config_does(tmp_path: Path) -> None:
    settings = PredictorSettings(threads=3, max_batch_size=4, trt_cache_dir=tmp_path, device="gpu", precision="fp16")
    assert settings.plan(str(VDIR), manifest("pir")) == plan_config(
        VDIR, manifest("pir"), device="gpu", precision="fp16", threads=3, max_batch_size=4, trt_cache_dir=tmp_path)
    assert PredictorSettings().plan(VDIR, manifest("pir")) == plan_config(VDIR, manifest("pir"))
    assert default_trt_cache_dir(Path("rel/1")) == Path.cwd() / "rel" / "1" / "_opt_cache"
