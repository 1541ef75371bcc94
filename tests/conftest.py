"""Shared fixtures: one tiny exported ResNet per test session (small input, few classes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_INPUT = 32
TINY_CLASSES = 10


def make_tiny_model_dir(out: Path, version: int = 1, seed: int = 0, fmt: str = "pir") -> Path:
    """Export a random-weight ResNet-18 (10 classes, 32x32) into out/<version> in a subprocess.

    A subprocess keeps Paddle (and its SIGTERM handler) out of the test process where that matters,
    and lets FLAGS_enable_pir_api be chosen per format.
    """
    code = f"""
import json, time
from pathlib import Path
import paddle
from paddle.vision.models import resnet18
from resnet_serve.modeldir import Manifest, sha256_file
paddle.seed({seed})
m = resnet18(num_classes={TINY_CLASSES}); m.eval()
d = Path({str(out)!r}) / "{version}"; d.mkdir(parents=True, exist_ok=True)
spec = [paddle.static.InputSpec([None, 3, {TINY_INPUT}, {TINY_INPUT}], "float32", "image")]
paddle.jit.save(paddle.jit.to_static(m, input_spec=spec, full_graph=True), str(d / "inference"))
(d / "labels.txt").write_text("\\n".join(f"digit_{{i}}" for i in range({TINY_CLASSES})) + "\\n")
model_file = "inference.json" if (d / "inference.json").exists() else "inference.pdmodel"
man = Manifest(name="tiny", version={version}, architecture="resnet18", num_classes={TINY_CLASSES},
               input_size=[{TINY_INPUT}, {TINY_INPUT}], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
               format="{fmt}", model_file=model_file)
man.files = {{p.name: sha256_file(p) for p in d.iterdir()}}
(d / "manifest.json").write_text(man.to_json())
"""
    env = dict(os.environ)
    if fmt == "legacy":
        env["FLAGS_enable_pir_api"] = "0"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/tiny with version 1: a random ResNet-18, 10 classes, 32x32 input, PIR format."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the project's console commands as a user would, capturing its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([str(Path(sys.executable).parent / args[0]), *args[1:]], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """A user's mistake as every command reports it: exit 2, one `error:` line on stderr, no traceback."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real training run on the embedded digits: ResNet-18, 32x32, 2 epochs of 3 steps."""
    out = tmp_path_factory.mktemp("ckpt") / "digits"
    r = run_cli("resnet-train", "--epochs", "2", "--max-steps-per-epoch", "3", "--batch-size", "32",
                "--num-workers", "1", "--out", str(out), "--amp", "O2")
    assert r.returncode == 0, r.stderr
    return out
