"""Issue 17's benchmark pieces end to end at tiny size: the simulated engine in a real server
(server/resnet_serve/server/simulated_engine.py), the front-cost measurement from /proc (bench/front_cost.py) and
`bench.run --configs simulated`. Structure and counts only, never speed: the machine may be loaded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import front_cost
from bench.run import ROOT, FloorProcess, ServerProcess
from bench.run import main as bench_main
from resnet_serve.client.sync import ClassifierClient
from resnet_serve.common.modeldir import Manifest, sha256_file
from tests.harness import one_error_line, run_cli, scrape, start_subprocess_server

CLASSES = 10


def stand_in_model_dir(root: Path, size: int = 32) -> Path:
    """A model folder the simulated engine can serve: a manifest, labels and placeholder model files (never read:
    the simulated engine imports no Paddle), so no export is needed."""
    d = root / "1"
    d.mkdir(parents=True)
    (d / "inference.json").write_text("{}")
    (d / "inference.pdiparams").write_bytes(b"")
    (d / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(CLASSES)))
    m = Manifest(name="stand-in", version=1, architecture="none", num_classes=CLASSES, input_size=[size, size],
                 mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], format="pir", model_file="inference.json")
    m.files = {p.name: sha256_file(p) for p in d.iterdir()}
    (d / "manifest.json").write_text(m.to_json())
    return root


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stand_in_model_dir(tmp_path_factory.mktemp("models") / "null")


def test_a_simulated_server_answers_from_the_pixels_and_says_it_is_simulated(stand_in: Path) -> None:
    """GetModelInfo and the info metric both name the engine, so no simulated figure passes for a model's."""
    proc, ports = start_subprocess_server("--model-dir", str(stand_in), "--engine", "simulated",
                                          "--simulated-cost-ms", "0,0", "--max-batch-size", "4")
    try:
        with ClassifierClient(f"127.0.0.1:{ports['port']}") as client:
            client.wait_until_ready(120)
            assert client.model_info().engine == "simulated"
            for value in (3, 57, 200):  # solid images: the top-1 class is the pixel value mod the class count
                result = client.classify(np.full((32, 32, 3), value, np.uint8), top_k=1)
                assert (result.top1.class_id, result.top1.label) == (value % CLASSES, f"class_{value % CLASSES}")
        info = [dict(labels) for (name, labels) in scrape(ports["metrics_port"]) if name == "resnet_serve_model_info"]
        assert [i["engine"] for i in info] == ["simulated"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "engine simulated (benchmarks only)" in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--engine", "simulated", "--simulated-cost-ms", "5"], "simulated_cost_ms must be A,C"),
    (["--simulated-cost-ms", "5,0.1"], "simulated_cost_ms is for --engine simulated"),
])
def test_bad_simulated_flags_are_one_line_and_exit_2(stand_in: Path, flags: list[str], message: str) -> None:
    assert message in one_error_line(run_cli("resnet-serve", "--model-dir", str(stand_in), *flags, timeout=120))


def test_front_cost_reports_cpu_per_image_of_each_process(tiny_model_dir: Path) -> None:
    """The tiny ResNet (real worker compute), 32x32 raw tensors over a stream, 200 images one per message, then 200
    as 50 OIP messages of 4: enough CPU ticks for every process to register (/proc counts in 10 ms ticks)."""
    server = ServerProcess(tiny_model_dir, "--max-batch-size", "4", "--max-queue-delay-us", "0",
                           "--threads-per-instance", "1")
    try:
        r = front_cost.front_cost(server.target, server.pid, (32, 32), 4, 200, oip_model="tiny", batch=4)
    finally:
        server.close()
    for part in (r, r["oip_batch"]):  # one image per classifier.v1 message; then 50 OIP messages of 4 images
        assert part["images"] == 200 and part["errors"] == {} and part["workers"] == 1
        assert part["front_cpu_us_per_image"] > 0 and part["workers_cpu_us_per_image"] > 0
        assert part["loadgen_cpu_us_per_image"] > 0 and part["images_per_s"] > 0
    assert r["oip_batch"]["batch"] == 4


def test_bench_run_simulated_writes_its_headline(stand_in: Path, tmp_path: Path) -> None:
    """`python -m bench.run --configs simulated` at tiny size: the stand-in folder is the bench's null model."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "null-sampled-pixels").symlink_to(stand_in)
    out = tmp_path / "out"
    assert bench_main(["--configs", "simulated", "--rounds", "1", "--size", "32", "--requests", "20",
                       "--sim-concurrency", "8", "--sim-max-batch", "4", "--sim-cost-ms", "1,0.5", "--front-batch",
                       "4", "--models", str(models), "--out", str(out), "--no-docs"]) == 0
    report = json.loads(next(out.glob("*.json")).read_text())
    sim = report["rounds"][0]["simulated"]
    assert sim["capacity_images_per_s"] == pytest.approx(4 / 0.003) and sim["errors"] == {}
    assert sim["oip_batch"]["batch"] == 4 and sim["oip_batch"]["images_per_s"] > 0  # OIP, 4 images per message
    assert set(report["summary"]) == {"sim_ratio_to_capacity", "sim_images_per_s", "sim_c1_added_ms",
                                      "sim_oip_batch4_ratio_to_capacity", "sim_oip_batch4_images_per_s"}


def test_bench_run_fronts_serves_with_one_then_two_front_processes(stand_in: Path, tmp_path: Path) -> None:
    """`python -m bench.run --configs fronts` at tiny size: both servers answer every measured request, and the
    second one's requests are counted per front (whatever the kernel's spread)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "null-sampled-pixels").symlink_to(stand_in)
    out = tmp_path / "out"
    assert bench_main(["--configs", "fronts", "--rounds", "1", "--size", "32", "--requests", "40", "--warmup", "0",
                       "--ceiling-concurrency", "8", "--fronts-processes", "2", "--models", str(models), "--out",
                       str(out), "--no-docs"]) == 0
    report = json.loads(next(out.glob("*.json")).read_text())
    fronts = report["rounds"][0]["fronts"]
    for n in (1, 2):
        (measured,) = fronts[f"fronts{n}"]["stream_raw"]
        assert measured["errors"] == {}
        assert sum(fronts[f"fronts{n}"]["answered_by_front"].values()) >= 40
    assert set(fronts["fronts1"]["answered_by_front"]) == {"0"}
    assert set(fronts["fronts2"]["answered_by_front"]) <= {"0", "1"}
    assert set(report["summary"]) == {"fronts1_images_per_s", "fronts2_images_per_s", "fronts2_over_1",
                                      "fronts2_largest_share_ratio"}


def test_the_grpc_floor_answers_every_request_of_the_front_cost_load() -> None:
    """bench/grpc_floor.py under front_cost's load (32x32, 200 images one per classifier.v1 message, then 50 OIP
    messages of 4): every request answered with its id, no error, and its one process's CPU counted."""
    with FloorProcess() as floor:
        r = front_cost.front_cost(floor.target, floor.pid, (32, 32), 4, 200, oip_model="any", batch=4,
                                  has_workers=False)
    for part in (r, r["oip_batch"]):
        assert part["images"] == 200 and part["errors"] == {} and part["workers"] == 0
        assert part["workers_cpu_us_per_image"] == 0 and part["images_per_s"] > 0


def test_the_held_floor_answers_no_sooner_than_its_hold() -> None:
    """`--hold-ms 20,5`: an answer of n images comes A + C*n ms after its request at the soonest (a lower bound,
    which no load on the machine can break): 25 ms for one classifier.v1 image, 40 for an OIP message of 4."""
    with FloorProcess("--hold-ms", "20,5") as floor:
        one = front_cost.stream_load(floor.target, (32, 32), 1, 3)[0]
        four = front_cost.stream_load(floor.target, (32, 32), 1, 3, oip_model="any", batch=4)[0]
    assert one["errors"] == {} and four["errors"] == {}
    assert one["latency_ms"]["p50"] >= 25.0 and four["latency_ms"]["p50"] >= 40.0


def test_the_floor_refuses_a_bad_hold_in_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.grpc_floor", "--hold-ms", "5"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "--hold-ms" in r.stderr and "Traceback" not in r.stderr


def test_bench_run_grpc_floor_writes_its_headline(stand_in: Path, tmp_path: Path) -> None:
    """`python -m bench.run --configs grpc_floor` at tiny size: CPU per image and images/s of both paths, and the
    concurrency-1 round trip."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "null-sampled-pixels").symlink_to(stand_in)
    out = tmp_path / "out"
    assert bench_main(["--configs", "grpc_floor", "--rounds", "1", "--size", "32", "--requests", "40",
                       "--front-concurrency", "4", "--front-batch", "4", "--models", str(models), "--out", str(out),
                       "--no-docs"]) == 0
    report = json.loads(next(out.glob("*.json")).read_text())
    assert set(report["summary"]) == {f"floor{p}_{k}" for p in ("", "_oip_batch4") for k in (
        "images_per_s", "front_cpu_us_per_image", "loadgen_cpu_us_per_image")} | {"floor_c1_p50_ms",
                                                                           "floor_c1_held_added_ms"}
    assert report["rounds"][0]["grpc_floor"]["c1"]["errors"] == {}
    assert report["rounds"][0]["grpc_floor"]["c1_held"]["errors"] == {}


def test_bench_refuses_an_unknown_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench_main(["--configs", "simulated,nope"])
    assert e.value.code == 2 and "unknown nope" in capsys.readouterr().err



def test_the_null_sampled_model_reads_only_its_sample_and_both_programs_agree(tmp_path: Path) -> None:
    """bench/null_model.py as bench/models.py exports it (32x32): a pixel model whose manifest the server accepts,
    whose float program gives the same logits, and whose answer ignores pixels off the sample grid."""
    from bench.models import ensure_model
    from resnet_serve.common.modeldir import load_manifest
    from resnet_serve.server.predictor import build_predictor

    d = ensure_model("null-sampled", tmp_path, 32) / "1"
    assert load_manifest(d).takes_pixels
    predictor = build_predictor(d)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    logits = predictor.run(pixels)
    floats = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
    np.testing.assert_allclose(predictor.run(floats), logits, rtol=1e-5, atol=1e-5)
    off_grid = pixels.copy()
    off_grid[:, 1::8] = 255 - off_grid[:, 1::8]
    np.testing.assert_array_equal(predictor.run(off_grid), logits)
    assert not np.array_equal(logits[0], logits[1])


def test_a_null_model_exported_by_an_older_bench_is_exported_again(tmp_path: Path) -> None:
    """An older null model cast every pixel before sampling (and cost the workers ~300 us per image): a folder
    whose manifest names another architecture is replaced, one that names this one is kept."""
    from bench.models import NULL_ARCH, ensure_model

    manifest = ensure_model("null-sampled", tmp_path, 32) / "1" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert json.loads(manifest.read_text())["architecture"] == NULL_ARCH
    ensure_model("null-sampled", tmp_path, 32)
    assert manifest.stat().st_mtime_ns == stamp  # current: reused
    manifest.write_text(manifest.read_text().replace(NULL_ARCH, "null (every 8th row and column, mean, linear)"))
    ensure_model("null-sampled", tmp_path, 32)
    assert json.loads(manifest.read_text())["architecture"] == NULL_ARCH
