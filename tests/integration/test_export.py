"""Export: fp32 and AMP-O2 checkpoints -> verified model directories; every bad input is one clear line."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

from resnet_serve.common.imaging import normalise
from resnet_serve.common.modeldir import load_manifest, sha256_file
from resnet_serve.export import verify
from resnet_serve.export.checkpoint_reader import read_weights
from resnet_serve.export.exporter import ExportOptions, export
from resnet_serve.train.models import build_model
from tests.harness import run_cli

# From fp16 weights alone the logits move (docs/paddle.md: up to 0.027 on ResNet-18); our stated bound.
FP16_ONLY_RTOL = 2e-2


def predictor_out(version_dir: Path, x: np.ndarray) -> np.ndarray:
    return verify.predictor_logits(version_dir, load_manifest(version_dir), x)


def fabricate_o2(fp32_prefix: Path, out_dir: Path) -> Path:
    """A genuine AMP-O2 checkpoint made with Paddle's own helpers: fp16 conv/linear, fp32 BN, fp32 masters."""
    amp = importlib.import_module("paddle.amp.auto_cast")
    model = build_model("resnet18", 10)
    model.set_state_dict(paddle.load(str(fp32_prefix.with_suffix(".pdparams"))))
    originals = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    opt = paddle.optimizer.Momentum(parameters=model.parameters(), multi_precision=True)
    amp.amp_initialize([model], "float16", [])
    state = model.state_dict()
    for key, value in state.items():
        if value.dtype == paddle.float16:
            opt._create_master_weight(value)
            opt._master_weights[value.name].set_value(paddle.to_tensor(originals[key]))
    assert {str(v.dtype) for v in state.values()} == {"paddle.float16", "paddle.float32"}
    out_dir.mkdir(parents=True)
    prefix = out_dir / "epoch_002"
    paddle.save(state, str(prefix.with_suffix(".pdparams")))
    paddle.save(opt.state_dict(), str(prefix.with_suffix(".pdopt")))
    shutil.copy(fp32_prefix.with_suffix(".json"), prefix.with_suffix(".json"))
    return prefix


@pytest.fixture(scope="module")
def fp32_export(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(ExportOptions(checkpoint=trained_checkpoint, out=tmp_path_factory.mktemp("m") / "digits"))


def test_fp32_export_writes_the_design_directory(fp32_export: Path) -> None:
    assert fp32_export.name == "1"
    assert {p.name for p in fp32_export.iterdir()} == {"inference.json", "inference_float.json", "inference.pdiparams",
                                                        "manifest.json", "labels.txt"}
    m = load_manifest(fp32_export, verify_checksums=True)
    assert (m.name, m.version, m.architecture, m.num_classes) == ("digits", 1, "resnet18", 10)
    assert m.input_size == [32, 32] and m.precision == "fp32" and m.format == "pir"
    assert (m.input_format, m.float_model_file, m.schema_version) == ("uint8_nhwc", "inference_float.json", 2)
    assert m.source_checkpoint["layout"] == "fp32" and m.source_checkpoint["epoch"] == 2
    v = m.verification
    assert v["passed"] and v["top1_agreement"] == 1.0
    assert v["max_abs_diff"] <= 1e-3 * max(1.0, v["max_abs_reference"])
    f = v["float_program"]  # the float program, on the same pixels normalised in numpy
    assert f["passed"] and f["top1_agreement"] == 1.0 and f["n_inputs"] == v["n_inputs"]


def test_pixels_in_give_the_trained_network_on_numpy_normalised_pixels(fp32_export: Path,
                                                                      trained_checkpoint: Path) -> None:
    """The program normalises in the graph exactly as the server normalised in numpy before (within the export's
    bound), and its float program answers the normalised pixels the same."""
    model = build_model("resnet18", 10)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in read_weights(trained_checkpoint / "epoch_002")
                          .state.items()})
    m = load_manifest(fp32_export)
    x = verify.fixed_pixels([32, 32], n=4, seed=7)
    reference = verify.dygraph_logits(model, normalise(x, m.mean, m.std))
    from_pixels, from_floats = verify.predictor_logits(fp32_export, m, x, normalise(x, m.mean, m.std))
    assert verify.compare(reference, from_pixels)["passed"] and verify.compare(reference, from_floats)["passed"]
    assert m.files["inference.pdiparams"] == sha256_file(fp32_export / "inference.pdiparams")
    assert (fp32_export / "labels.txt").read_text().split() == [str(i) for i in range(10)]


def test_next_export_gets_next_version(fp32_export: Path, trained_checkpoint: Path) -> None:
    second = export(ExportOptions(checkpoint=trained_checkpoint, out=fp32_export.parent))
    assert second.name == "2" and load_manifest(second).version == 2


def test_o2_with_master_weights_is_bit_identical(trained_checkpoint: Path, fp32_export: Path,
                                                 tmp_path: Path) -> None:
    prefix = fabricate_o2(trained_checkpoint / "epoch_002", tmp_path / "o2")
    out = export(ExportOptions(checkpoint=prefix, out=tmp_path / "models" / "o2"))
    m = load_manifest(out)
    assert m.source_checkpoint["layout"] == "amp-o2 (float16)"
    assert m.source_checkpoint["master_weights_used"] == 22  # 20 convs + fc weight + fc bias
    o2_state = read_weights(prefix).state
    fp32_state = read_weights(trained_checkpoint / "epoch_002").state
    assert all(np.array_equal(o2_state[k], fp32_state[k]) for k in fp32_state)
    x = verify.fixed_inputs([32, 32])
    assert np.array_equal(predictor_out(out, x), predictor_out(fp32_export, x))


def test_o2_from_fp16_weights_alone_within_stated_tolerance(trained_checkpoint: Path, fp32_export: Path,
                                                            tmp_path: Path) -> None:
    prefix = fabricate_o2(trained_checkpoint / "epoch_002", tmp_path / "o2")
    out = export(ExportOptions(checkpoint=prefix, out=tmp_path / "models" / "o2", use_master_weights=False))
    assert load_manifest(out).source_checkpoint["master_weights_used"] == 0
    x = verify.fixed_inputs([32, 32])
    ref, got = predictor_out(fp32_export, x), predictor_out(out, x)
    assert not np.array_equal(ref, got)  # the fp16 rounding is real...
    assert np.abs(ref - got).max() <= FP16_ONLY_RTOL * max(1.0, np.abs(ref).max())  # ...and small


def test_legacy_format_via_cli(trained_checkpoint: Path, tmp_path: Path) -> None:
    r = run_cli("resnet-export", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "lg"),
                "--format", "legacy")
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "lg" / "1", verify_checksums=True)
    assert m.format == "legacy" and m.model_file == "inference.pdmodel" and m.verification["passed"]
    assert (m.input_format, m.float_model_file) == ("uint8_nhwc", "inference_float.pdmodel")
    assert m.verification["float_program"]["passed"]
    assert not (tmp_path / "lg" / "1" / "inference_float.pdiparams").exists()  # one params file for both


def _bad(tmp_path: Path, *args: str) -> str:
    r = run_cli("resnet-export", *args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.rglob(".tmp-*")), "a failed export left a temporary folder"
    return lines[0]


def test_missing_checkpoint(tmp_path: Path) -> None:
    msg = _bad(tmp_path, "--checkpoint", str(tmp_path / "nope.pdparams"), "--out", str(tmp_path / "m"))
    assert "does not exist" in msg and not (tmp_path / "m").exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "junk.pdparams").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "junk.json").write_text(json.dumps({"arch": "resnet18", "num_classes": 10, "input_size": [32, 32]}))
    msg = _bad(tmp_path, "--checkpoint", str(tmp_path / "junk.pdparams"), "--out", str(tmp_path / "m"))
    assert "is not a Paddle checkpoint" in msg and not (tmp_path / "m" / "1").exists()


def test_architecture_mismatch_names_the_key(trained_checkpoint: Path, tmp_path: Path) -> None:
    msg = _bad(tmp_path, "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m"), "--arch", "resnet34")
    assert "does not match resnet34" in msg and "missing key 'layer1.2.conv1.weight'" in msg


def test_class_count_mismatch_names_the_shape(trained_checkpoint: Path, tmp_path: Path) -> None:
    msg = _bad(tmp_path, "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m"),
               "--num-classes", "7")
    assert "'fc.weight' has shape [512, 10], the model expects [512, 7]" in msg


def test_unknown_architecture(trained_checkpoint: Path, tmp_path: Path) -> None:
    msg = _bad(tmp_path, "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m"), "--arch", "vgg16")
    assert "unknown architecture 'vgg16'" in msg


def test_existing_output_needs_force(trained_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "keep.txt").write_text("x")
    msg = _bad(tmp_path, "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m" / "1"))
    assert "already exists" in msg and (tmp_path / "m" / "1" / "keep.txt").exists()
    r = run_cli("resnet-export", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m" / "1"),
                "--force")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "m" / "1" / "keep.txt").exists() and (tmp_path / "m" / "1" / "manifest.json").exists()
