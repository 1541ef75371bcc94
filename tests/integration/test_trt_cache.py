"""The TensorRT cache and the one-time PIR-TensorRT conversion (server/resnet_serve/server/trt_cache.py).

No GPU here and no Paddle GPU wheel: what only a GPU build has (``paddle.tensorrt.export`` and NVIDIA's
``tensorrt``) is replaced, in the conversion child only, by the recording stand-ins in tests/trt_standin/ (their
signatures are those of Paddle 3.x's python/paddle/tensorrt/export.py; see that file). Tests that use them say
``standin`` in their name. Everything else is real: the tiny PIR model, Paddle's loader, the file lock, the child
process, the marker.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resnet_serve.common.modeldir import load_manifest
from resnet_serve.server import trt_cache
from resnet_serve.server.predictor_config import plan_config
from resnet_serve.server.trt_cache import MARKER, cache_key, ensure_pir_converted
from tests.harness import wait_for

STANDIN_DIR = Path(__file__).parent / "trt_standin"
ENV = {"paddle": "3.3.1+7688495538f4", "tensorrt": "10.5.0.18/py-10.5.0", "gpu_name": "NVIDIA L4",
       "compute_capability": "8.9"}


def standin_env(record: Path, **extra: str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(STANDIN_DIR), os.environ.get("PYTHONPATH", "")]),
            trt_cache.TRT_EXPORT_MODULE_ENV: "paddle_trt_export_standin", "STANDIN_RECORD": str(record), **extra}


def events(record: Path, kind: str = "convert") -> list[dict]:
    if not record.exists():
        return []
    return [e for e in map(json.loads, record.read_text().splitlines()) if e["event"] == kind]


@pytest.fixture()
def job(tiny_model_dir: Path, tmp_path: Path) -> dict:
    """The conversion step, cache directory and key a GPU worker would use for the tiny PIR model (fp16, batch 4)."""
    vdir = tiny_model_dir / "1"
    m = load_manifest(vdir)
    key = cache_key("pir_trt", vdir, m, ENV, "fp16", 4)
    cache = tmp_path / "trt" / key.dirname()
    plan = plan_config(vdir, m, device="gpu", precision="fp16", max_batch_size=4, trt_cache_dir=cache)
    return {"step": plan[0][1][0], "cache": cache, "key": key, "record": tmp_path / "record.jsonl"}


def test_conversion_prefix_has_no_suffix_and_loads_with_paddle_under_pir_guard(job: dict) -> None:
    """Real Paddle: the exact path handed to convert() loads; the .json path (the old bug) does not."""
    prefix = job["step"]["model_prefix"]
    assert not prefix.endswith(".json") and Path(prefix + ".json").is_file() and Path(prefix).is_absolute()
    code = textwrap.dedent(f"""
        import paddle
        exe = paddle.static.Executor(paddle.CPUPlace())
        with paddle.pir_utils.IrGuard():
            _, feeds, _ = paddle.static.io.load_inference_model({prefix!r}, executor=exe)
        print("FEEDS", feeds)
        try:
            with paddle.pir_utils.IrGuard():
                paddle.static.io.load_inference_model({prefix + '.json'!r}, executor=exe)
            print("JSON-LOADED")
        except Exception as e:
            print("JSON-FAILED", type(e).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FEEDS ['image']" in r.stdout
    assert "JSON-FAILED" in r.stdout, r.stdout


def test_standin_conversion_gets_prefix_paddle_names_and_records_what_was_built(job: dict, monkeypatch) -> None:
    for k, v in standin_env(job["record"], STANDIN_LOAD="1").items():
        monkeypatch.setenv(k, v)
    result = ensure_pir_converted(job["step"], job["cache"], job["key"])
    [call] = events(job["record"])
    assert call["model_path"] == job["step"]["model_prefix"]  # no .json: Paddle's loader appends it
    assert events(job["record"], "loaded") == [{"pid": call["pid"], "event": "loaded", "feeds": ["image"]}]
    assert call["pid"] != os.getpid()  # converted in a short-lived child, not in the worker
    assert call["save_model_dir"] == str(job["cache"] / "inference")
    assert call["precision_mode"] == "FP16" and call["workspace_size"] == 1 << 30
    assert call["inputs"] == [{"name": "image", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [4, 3, 32, 32],
                               "dtype": "float32"}]
    assert result["cached"] is False and result["precision_built"] == "fp16" and result["engines"] == 1
    assert (job["cache"] / MARKER).is_file()
    assert ensure_pir_converted(job["step"], job["cache"], job["key"])["cached"] is True
    assert len(events(job["record"])) == 1


def test_standin_conversion_of_a_pixel_input_model_declares_uint8_nhwc(tiny_pixel_model_dir: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """The program takes uint8 [N, H, W, 3] (manifest input_format uint8_nhwc): TensorRT's shapes and the data
    Paddle generates while converting must be those, and the real loader finds the pixel program's feed."""
    vdir = tiny_pixel_model_dir / "1"
    m = load_manifest(vdir)
    key = cache_key("pir_trt", vdir, m, ENV, "fp16", 4)
    cache = tmp_path / "trt" / key.dirname()
    step = plan_config(vdir, m, device="gpu", precision="fp16", max_batch_size=4, trt_cache_dir=cache)[0][1][0]
    record = tmp_path / "record.jsonl"
    for k, v in standin_env(record, STANDIN_LOAD="1").items():
        monkeypatch.setenv(k, v)
    assert ensure_pir_converted(step, cache, key)["cached"] is False
    [call] = events(record)
    assert call["inputs"] == [{"name": "image", "min": [1, 32, 32, 3], "opt": [4, 32, 32, 3], "max": [4, 32, 32, 3],
                               "dtype": "uint8"}]
    assert [e["feeds"] for e in events(record, "loaded")] == [["image"]]


def test_standin_gpu_without_fast_fp16_reports_the_fp32_it_built(job: dict, monkeypatch) -> None:
    for k, v in standin_env(job["record"], STANDIN_FAST_FP16="0").items():
        monkeypatch.setenv(k, v)
    result = ensure_pir_converted(job["step"], job["cache"], job["key"])
    assert (result["precision_asked"], result["precision_built"]) == ("fp16", "fp32")


WORKER = """
import json, sys
from resnet_serve.server.trt_cache import CacheKey, ensure_pir_converted
from pathlib import Path
job = json.loads(sys.argv[1])
r = ensure_pir_converted(job["step"], Path(job["cache"]), CacheKey(**job["key"]))
print(json.dumps({"cached": r["cached"], "files": r["files"]}))
"""


def start_worker(job: dict, env: dict[str, str]) -> subprocess.Popen:
    arg = json.dumps({"step": job["step"], "cache": str(job["cache"]), "key": dataclasses.asdict(job["key"])})
    return subprocess.Popen([sys.executable, "-c", WORKER, arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **env})


def test_standin_two_workers_starting_at_once_convert_once(job: dict) -> None:
    env = standin_env(job["record"])
    workers = [start_worker(job, env), start_worker(job, env)]
    outs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-1500:] for o in outs]
    results = [json.loads(o[0].splitlines()[-1]) for o in outs]
    assert len(events(job["record"])) == 1
    assert sorted(r["cached"] for r in results) == [False, True]
    assert results[0]["files"] == results[1]["files"]


def test_standin_lock_is_held_for_the_whole_conversion(job: dict, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    worker = start_worker(job, standin_env(job["record"], STANDIN_GATE=str(gate)))
    try:
        wait_for(lambda: len(events(job["record"])) == 1, timeout=120, what="the conversion to start")
        fd = os.open(job["cache"].parent / (job["cache"].name + ".lock"), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # a second worker would wait here
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with open(gate, "wb") as g:
                g.write(b"x")
            assert worker.wait(timeout=120) == 0
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released once the build is complete
        finally:
            os.close(fd)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.communicate()
    assert json.loads((job["cache"] / MARKER).read_text())["key"] == dataclasses.asdict(job["key"])


def test_standin_conversion_killed_midway_is_detected_and_rebuilt(job: dict, monkeypatch) -> None:
    for k, v in standin_env(job["record"], STANDIN_MODE="die").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match="PIR-TensorRT conversion failed"):
        ensure_pir_converted(job["step"], job["cache"], job["key"])
    assert (job["cache"] / "inference.json").is_file()  # what the killed build left: it once passed "converted"
    assert not (job["cache"] / MARKER).exists()
    (job["cache"] / "stale-from-killed-build").write_text("x")
    monkeypatch.setenv("STANDIN_MODE", "ok")
    result = ensure_pir_converted(job["step"], job["cache"], job["key"])
    assert result["cached"] is False and len(events(job["record"])) == 2
    assert not (job["cache"] / "stale-from-killed-build").exists()
    assert all((job["cache"] / f).is_file() for f in result["files"])


def test_standin_cache_missing_a_listed_file_is_rebuilt(job: dict, monkeypatch) -> None:
    for k, v in standin_env(job["record"]).items():
        monkeypatch.setenv(k, v)
    first = ensure_pir_converted(job["step"], job["cache"], job["key"])
    engine_file = next(f for f in first["files"] if f.endswith(".trt"))
    (job["cache"] / engine_file).unlink()
    assert ensure_pir_converted(job["step"], job["cache"], job["key"])["cached"] is False
    assert len(events(job["record"])) == 2


def test_conversion_without_tensorrt_module_says_what_to_install(job: dict, monkeypatch) -> None:
    """No stand-in: on this CPU wheel the child finds no `tensorrt` and says so in one line."""
    monkeypatch.delenv(trt_cache.TRT_EXPORT_MODULE_ENV, raising=False)
    with pytest.raises(RuntimeError) as e:
        ensure_pir_converted(job["step"], job["cache"], job["key"])
    assert "tensorrt" in str(e.value) and "pip install tensorrt-cu12" in str(e.value)
    assert "\n" not in str(e.value)


def test_cache_key_of_a_model_uses_its_checksums(tiny_model_dir: Path) -> None:
    vdir = tiny_model_dir / "1"
    m = load_manifest(vdir)
    key = cache_key("pir_trt", vdir, m, ENV, "fp32", 8)
    assert (key.input_size, key.max_batch, key.gpu_name, key.compute_capability) == ("32x32", 8, "NVIDIA L4", "8.9")
    other = dataclasses.replace(m, files={**m.files, m.params_file: "0" * 64})
    assert cache_key("pir_trt", vdir, other, ENV, "fp32", 8) != key


def test_instances_spread_over_the_gpus_setting(tiny_model_dir: Path) -> None:
    from resnet_serve.server.engine import Engine, EngineConfig
    from resnet_serve.server.settings import load_settings

    s = load_settings(["--model-dir", str(tiny_model_dir), "--device", "gpu", "--gpus", "1,3", "--instances", "3",
                       "--worker-start-timeout-s", "840"], environ={})
    assert s.gpu_ids() == (1, 3) and s.worker_start_timeout_s == 840.0
    engine = Engine(EngineConfig(version_dir=tiny_model_dir / "1", instances=3, device="gpu", gpus=s.gpu_ids()))
    assert [engine.workers.visible_gpu(i) for i in range(3)] == [1, 3, 1]
    # Every worker gets the front's one plan, on device 0: CUDA_VISIBLE_DEVICES makes its own GPU device 0.
    assert ("enable_use_gpu", (256, 0)) in engine.workers.spec.plan
    cpu = Engine(EngineConfig(version_dir=tiny_model_dir / "1", gpus=(1,)))
    assert cpu.workers.visible_gpu(0) is None


def test_device_gpu_on_cpu_only_paddle_is_one_line_and_exit_2(tiny_model_dir: Path) -> None:
    from tests.harness import run_cli

    r = run_cli("resnet-serve", "--model-dir", str(tiny_model_dir), "--device", "gpu", "--port", "0",
                "--metrics-port", "-1", timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "CPU-only" in lines[0] and "pip install paddlepaddle-gpu==" in lines[0]
    assert trt_cache.PADDLE_GPU_INDEX in lines[0]


def test_paddle_build_is_read_without_importing_paddle() -> None:
    code = ("import sys; from resnet_serve.server.trt_cache import paddle_build; b = paddle_build(); "
            "print(b['full_version'], b['cuda_version'], 'paddle' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    from importlib.metadata import version

    assert r.stdout.split() == [version("paddlepaddle"), "False", "False"], r.stderr


def fake_gpu_predictor(calls: list) -> object:
    """Stands in for trt_cache._create, which would build a GPU predictor: records the files the Config would load
    and, for classic TensorRT, writes an engine file where Paddle serializes it (<optim cache>/trt_serialized_<key>)."""
    from resnet_serve.server.predictor_config import model_files

    def create(version_dir, manifest, plan):
        calls.append((model_files(version_dir, manifest, plan), plan))
        cache_dirs = [args[0] for name, args in plan if name == "set_optim_cache_dir"]
        if cache_dirs:
            (Path(cache_dirs[0]) / "trt_serialized_42").write_bytes(b"engine")
        return "predictor"

    return create


def gpu_build(vdir: Path, manifest, **settings) -> tuple[object, dict]:
    """trt_cache.build_gpu_predictor given the plan the engine front would compute and send."""
    from resnet_serve.server.predictor_config import PredictorSettings

    s = PredictorSettings(device="gpu", **settings)
    return trt_cache.build_gpu_predictor(vdir, manifest, s, s.plan(vdir, manifest))


def test_standin_gpu_build_pir_converts_once_then_loads_the_converted_program(job: dict, tiny_model_dir: Path,
                                                                               tmp_path: Path, monkeypatch) -> None:
    for k, v in standin_env(job["record"]).items():
        monkeypatch.setenv(k, v)
    calls: list = []
    monkeypatch.setattr(trt_cache, "gpu_environment", lambda: ENV)  # GPU-only query
    monkeypatch.setattr(trt_cache, "_create", fake_gpu_predictor(calls))
    vdir = tiny_model_dir / "1"
    for expect_cached in (False, True):
        predictor, info = gpu_build(vdir, load_manifest(vdir), precision="fp16", max_batch_size=4,
                                    trt_cache_dir=tmp_path / "trt")
        assert info["cached"] is expect_cached and info["precision_built"] == "fp16" and info["engines"] == 1
    assert len(events(job["record"])) == 1
    cache = Path(info["cache"])
    assert cache.parent == tmp_path / "trt" and cache.name == job["key"].dirname()
    assert calls[0][0] == (str(cache / "inference.json"), str(cache / "inference.pdiparams"))


def test_standin_gpu_build_classic_builds_under_the_lock_once(tmp_path: Path, monkeypatch) -> None:
    from resnet_serve.common.modeldir import Manifest

    vdir = tmp_path / "m" / "1"
    vdir.mkdir(parents=True)
    for f in ("inference.pdmodel", "inference.pdiparams"):
        (vdir / f).write_bytes(b"x")
    m = Manifest(name="m", version=1, architecture="resnet18", num_classes=10, input_size=[32, 32], mean=[0.5] * 3,
                 std=[0.5] * 3, format="legacy", model_file="inference.pdmodel")
    calls: list = []
    monkeypatch.setattr(trt_cache, "gpu_environment", lambda: {**ENV, "compute_capability": "6.1"})
    monkeypatch.setattr(trt_cache, "_create", fake_gpu_predictor(calls))
    (tmp_path / "trt").mkdir()
    infos = [gpu_build(vdir, m, precision="fp16", trt_cache_dir=tmp_path / "trt")[1] for _ in range(2)]
    assert [i["cached"] for i in infos] == [False, True]
    assert infos[0]["engine"] == "classic_trt" and infos[0]["engines"] == 1
    assert infos[0]["precision_built"] == "fp32"  # compute capability 6.1 has no fast fp16
    assert dict(calls[0][1])["set_optim_cache_dir"] == (infos[0]["cache"],)
    assert "sm61" in infos[0]["cache"]


def test_gpu_build_cuda_engine_needs_no_cache(tiny_model_dir: Path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(trt_cache, "_create", fake_gpu_predictor(calls))
    vdir = tiny_model_dir / "1"
    _, info = gpu_build(vdir, load_manifest(vdir), precision="fp16", engine="cuda")
    assert info == {"engine": "cuda", "precision_asked": "fp16", "precision_built": "fp16"}
    assert calls[0][0][0] == str(vdir / "inference.json")


def test_unwritable_cache_directory_says_which_setting_to_change(job: dict, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache root should be")
    with pytest.raises(RuntimeError, match="not writable .*--trt-cache-dir") as e:
        ensure_pir_converted({**job["step"], "save_model_dir": str(blocked / "k" / "inference")}, blocked / "k",
                             job["key"])
    assert "\n" not in str(e.value)


def test_tensorrt_engine_ops_are_counted_in_paddles_own_program_format(tiny_model_dir: Path) -> None:
    program = (tiny_model_dir / "1" / "inference.json").read_text()
    assert '"1.conv2d"' in program  # PIR files name pd_op.* ops "1.*"
    assert trt_cache.tensorrt_engine_ops(program) == 0
    assert trt_cache.tensorrt_engine_ops(program.replace('"1.conv2d"', '"1.tensorrt_engine"', 2)) == 2


def test_worker_module_leaves_paddle_unimported_so_cuda_visible_devices_can_still_apply() -> None:
    """A spawned worker imports its module before worker_main runs select_gpu: Paddle must not be loaded by then,
    or CUDA_VISIBLE_DEVICES would come too late to choose the worker's GPU."""
    code = ("import sys, resnet_serve.server.worker, resnet_serve.server.trt_cache; "
            "print('paddle' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


def test_standin_conversion_that_returns_without_its_files_is_not_marked_complete(job: dict, monkeypatch) -> None:
    for k, v in standin_env(job["record"], STANDIN_MODE="no_params").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match="wrote no .*inference.pdiparams"):
        ensure_pir_converted(job["step"], job["cache"], job["key"])
    assert not (job["cache"] / MARKER).exists()
