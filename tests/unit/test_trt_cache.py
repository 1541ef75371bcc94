"""trt_cache, its parts that need no GPU, no Paddle and no model: the cache key, the completion marker, the lock's
refusal, what a Paddle build lacks (server/resnet_serve/server/trt_cache.py). The conversion itself, with the
stand-ins of tests/integration/trt_standin and the tiny model: tests/integration/test_trt_cache.py."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from pathlib import Path

import pytest

from resnet_serve.common.modeldir import Manifest
from resnet_serve.server import trt_cache
from resnet_serve.server.predictor_config import plan_config
from resnet_serve.server.trt_cache import (
    MARKER,
    CacheKey,
    cache_key,
    cache_lock,
    ensure_pir_converted,
    model_digest,
    plan_kind,
    read_marker,
    tensorrt_engine_ops,
    write_marker,
)

ENV = {"paddle": "3.3.1+7688495538f4", "tensorrt": "10.5.0.18/py-10.5.0", "gpu_name": "NVIDIA L4",
       "compute_capability": "8.9"}


BASE_KEY = CacheKey(kind="pir_trt", model="resnet50", version=1, model_digest="abc", paddle="3.3.1+x",
                    tensorrt="10.5/py-10.5", gpu_name="NVIDIA L4", compute_capability="8.9", precision="fp16",
                    max_batch=8, input_size="224x224")


@pytest.mark.parametrize("field,value", [
    ("kind", "classic_trt"), ("model", "resnet18"), ("version", 2), ("model_digest", "abd"),
    ("paddle", "3.3.2+y"), ("tensorrt", "10.6/py-10.6"), ("gpu_name", "NVIDIA A100"),
    ("compute_capability", "8.0"), ("precision", "fp32"), ("max_batch", 16), ("input_size", "256x256"),
    ("workspace_bytes", 1 << 31), ("min_subgraph", 5),
])
def test_cache_key_changes_with_each_input(field: str, value: object) -> None:
    changed = dataclasses.replace(BASE_KEY, **{field: value})
    assert changed.dirname() != BASE_KEY.dirname()
    assert dataclasses.replace(BASE_KEY).dirname() == BASE_KEY.dirname()  # and is stable


@pytest.mark.parametrize("cc,fast", [("6.1", False), ("5.3", True), ("6.0", True), ("7.5", True), ("8.9", True),
                                     ("5.2", False)])
def test_fast_fp16_follows_compute_capability(cc: str, fast: bool) -> None:
    assert trt_cache.fast_fp16(cc) is fast


def test_select_gpu_sets_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    trt_cache.select_gpu(3)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    trt_cache.select_gpu(None)  # CPU, or no --gpus: the environment is left alone
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_gpu_support_problem_by_build(monkeypatch) -> None:
    build = {"full_version": "3.3.1", "cuda_version": "12.6", "tensorrt_version": "None"}
    monkeypatch.setattr(trt_cache, "paddle_build", lambda: build)
    assert "--engine cuda" in trt_cache.gpu_support_problem("paddle")
    assert trt_cache.gpu_support_problem("cuda") is None  # Paddle's own GPU kernels need no TensorRT
    build["tensorrt_version"] = "10.5.0.18"
    assert trt_cache.gpu_support_problem("tensorrt") is None
    assert trt_cache.tensorrt_install_hint().startswith("pip install tensorrt-cu12==10.5.0.18")
    monkeypatch.setattr(trt_cache, "paddle_build", lambda: None)
    assert "no paddle is installed" in trt_cache.gpu_support_problem("cuda")


def manifest(fmt: str = "pir", **kw) -> Manifest:
    return Manifest(name="tiny", version=3, architecture="resnet18", num_classes=10, input_size=[32, 48],
                    mean=[0.5] * 3, std=[0.5] * 3, format=fmt,
                    model_file="inference.json" if fmt == "pir" else "inference.pdmodel", **kw)


def test_the_directory_name_shows_the_main_fields_then_a_digest_of_all() -> None:
    name = BASE_KEY.dirname()
    assert name == f"pir_trt-resnet50-v1-fp16-b8-224x224-sm89-{BASE_KEY.digest()}"
    assert len(BASE_KEY.digest()) == 16
    odd = dataclasses.replace(BASE_KEY, model="../../etc/pass wd" + "x" * 60)
    assert "/" not in odd.dirname() and " " not in odd.dirname()
    assert odd.dirname().startswith("pir_trt-.._.._etc_pass_wd" + "x" * 23 + "-v1-")  # 40 characters of the name


def test_the_model_digest_uses_the_manifests_checksums_else_sizes_and_mtimes(tmp_path: Path) -> None:
    m = manifest(files={"inference.json": "a" * 64, "inference.pdiparams": "b" * 64})
    digest = model_digest(tmp_path, m)  # no file is read: the checksums are enough
    assert digest == model_digest(tmp_path / "elsewhere", m)
    assert model_digest(tmp_path, manifest(files={**m.files, "inference.pdiparams": "c" * 64})) != digest
    unlisted = manifest()
    with pytest.raises(FileNotFoundError):
        model_digest(tmp_path, unlisted)
    (tmp_path / "inference.json").write_text("{}")
    (tmp_path / "inference.pdiparams").write_bytes(b"12345")
    before = model_digest(tmp_path, unlisted)
    (tmp_path / "inference.pdiparams").write_bytes(b"123456")
    assert model_digest(tmp_path, unlisted) != before


def test_the_key_of_a_manifest_has_its_name_version_input_size_and_the_environment() -> None:
    m = manifest(files={"inference.json": "a" * 64, "inference.pdiparams": "b" * 64})
    key = cache_key("classic_trt", Path("/models/tiny/3"), m, ENV, "fp32", 16)
    assert (key.kind, key.model, key.version, key.input_size, key.max_batch, key.precision) == (
        "classic_trt", "tiny", 3, "32x48", 16, "fp32")
    assert (key.paddle, key.tensorrt, key.gpu_name, key.compute_capability) == (
        ENV["paddle"], ENV["tensorrt"], ENV["gpu_name"], ENV["compute_capability"])


def _build(cache: Path, files: dict[str, bytes]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (cache / name).write_bytes(data)


def test_a_written_marker_is_read_back_for_its_key_only(tmp_path: Path) -> None:
    cache = tmp_path / BASE_KEY.dirname()
    _build(cache, {"inference.json": b"{}", "inference.pdiparams": b"w"})
    assert read_marker(cache, BASE_KEY) is None  # no marker: not built
    record = write_marker(cache, BASE_KEY, {"files": ["inference.json", "inference.pdiparams"], "engines": 2})
    assert read_marker(cache, BASE_KEY) == record == json.loads((cache / MARKER).read_text())
    assert not (cache / (MARKER + ".tmp")).exists()
    assert read_marker(cache, dataclasses.replace(BASE_KEY, precision="fp32")) is None  # another key: stale


@pytest.mark.parametrize("marker", [
    "{not json", "[]", json.dumps({"key": "x", "files": []}),
    json.dumps({"key": dataclasses.asdict(BASE_KEY), "files": "inference.json"}),
    json.dumps({"key": dataclasses.asdict(BASE_KEY), "files": ["inference.json", "missing.pdiparams"]}),
])
def test_a_partial_or_foreign_marker_means_not_built(tmp_path: Path, marker: str) -> None:
    _build(tmp_path, {"inference.json": b"{}", MARKER: marker.encode()})
    assert read_marker(tmp_path, BASE_KEY) is None


def test_a_cache_whose_parent_cannot_be_created_says_which_setting_to_change(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with pytest.raises(RuntimeError) as raised, cache_lock(blocked / "key"):
        pass
    assert str(raised.value).startswith(f"the TensorRT cache directory {blocked} is not writable (")
    assert str(raised.value).endswith("): set --trt-cache-dir to a writable directory")


def test_the_lock_is_a_file_beside_the_cache_directory(tmp_path: Path) -> None:
    cache = tmp_path / "root" / "key"
    with cache_lock(cache):
        assert (tmp_path / "root" / "key.lock").is_file()
        assert not cache.exists()  # the lock does not create the directory it guards


def test_a_conversion_writing_outside_its_cache_is_refused_before_anything_runs(tmp_path: Path) -> None:
    step = {"save_model_dir": str(tmp_path / "other" / "inference")}
    with pytest.raises(ValueError) as raised:
        ensure_pir_converted(step, tmp_path / "cache", BASE_KEY)
    assert str(raised.value) == (f"save_model_dir {tmp_path / 'other' / 'inference'} is not inside the cache "
                                 f"directory {tmp_path / 'cache'}")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.lock").exists()


def test_tensorrt_engine_ops_are_counted_in_both_spellings() -> None:
    program = '{"ops": [{"#": "1.conv2d"}, {"#": "1.tensorrt_engine"}, {"#": "pd_op.tensorrt_engine"}]}'
    assert tensorrt_engine_ops(program) == 2
    assert tensorrt_engine_ops('{"#": "1.tensorrt_engine_x"}') == 0


def test_the_plan_kind_names_which_gpu_path_a_plan_takes(tmp_path: Path) -> None:
    assert plan_kind(plan_config(tmp_path, manifest("pir"), device="gpu", trt_cache_dir=tmp_path)) == "pir_trt"
    assert plan_kind(plan_config(tmp_path, manifest("legacy"), device="gpu")) == "classic_trt"
    assert plan_kind(plan_config(tmp_path, manifest("pir"), device="gpu", engine="cuda")) == "cuda"


def test_the_installed_cpu_paddle_is_named_in_one_line_with_the_gpu_wheel_to_install() -> None:
    """Read from Paddle's version file, not by importing Paddle (this machine has the CPU wheel, as CI does)."""
    version = importlib.metadata.version("paddlepaddle")
    assert trt_cache.paddle_build()["full_version"] == version
    assert trt_cache.gpu_support_problem("cuda") == (
        f"--device gpu needs Paddle's GPU build, but paddlepaddle {version} here is CPU-only: "
        f"pip uninstall -y paddlepaddle && pip install paddlepaddle-gpu=={version} -i {trt_cache.PADDLE_GPU_INDEX} "
        "(docs/gpu.md)")
