"""Predictor settings on a real paddle.inference.Config: every GPU plan's calls fit it, and the CPU plan builds a
working predictor of the tiny model. The plans as data, without Paddle: tests/unit/test_predictor_config.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resnet_serve.common.modeldir import Manifest, load_manifest
from resnet_serve.server.predictor_config import Precision, apply_plan, config_steps, model_files, plan_config


def manifest(fmt: str = "pir") -> Manifest:
    return Manifest(name="tiny", version=1, architecture="resnet18", num_classes=10, input_size=[32, 48],
                    mean=[0.5] * 3, std=[0.5] * 3, format=fmt,
                    model_file="inference.json" if fmt == "pir" else "inference.pdmodel")


GPU_PLANS = [(fmt, engine, precision) for fmt in ("pir", "legacy") for engine in ("tensorrt", "cuda")
             for precision in ("fp32", "fp16")]


@pytest.mark.parametrize("fmt,engine,precision", GPU_PLANS)
def test_every_gpu_plan_config_call_fits_the_real_config(fmt: str, engine: str, precision: str,
                                                         tmp_path: Path) -> None:
    """Every Config call of every GPU plan, on a real 3.3.1 paddle.inference.Config: pybind checks the argument
    types before the body runs, so a wrong call raises TypeError even on this CPU wheel. Only
    enable_tensorrt_engine refuses here, with RuntimeError (no TensorRT compiled in)."""
    import paddle.inference as paddle_infer

    m = manifest(fmt)
    plan = plan_config(tmp_path, m, device="gpu", precision=precision, engine=engine,
                       trt_cache_dir=tmp_path / "cache")
    for f in model_files(tmp_path, m, plan):  # Config only checks that the files exist
        Path(f).parent.mkdir(parents=True, exist_ok=True)
        Path(f).write_bytes(b"")
    config = paddle_infer.Config(*model_files(tmp_path, m, plan))
    steps = config_steps(plan)
    assert steps, plan
    for step in steps:
        if step[0] == "enable_tensorrt_engine":
            with pytest.raises(RuntimeError, match="TENSORRT"):
                apply_plan(config, [step])
        else:
            apply_plan(config, [step])
    if engine == "cuda" and precision == "fp16":
        assert ("enable_use_gpu", (256, 0, Precision("Half"))) in steps


def test_cpu_plan_on_real_config_creates_a_working_predictor(tiny_model_dir: Path) -> None:
    import paddle.inference as paddle_infer

    vdir = tiny_model_dir / "1"
    m = load_manifest(vdir)
    plan = plan_config(vdir, m, threads=1)
    config = paddle_infer.Config(*model_files(vdir, m, plan))
    apply_plan(config, plan)
    assert config.mkldnn_enabled()
    assert config.ir_optim()
    predictor = paddle_infer.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    handle.reshape(list(x.shape))
    handle.copy_from_cpu(x)
    predictor.run()
    out = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
    assert out.shape == (2, m.num_classes)
    assert np.isfinite(out).all()
