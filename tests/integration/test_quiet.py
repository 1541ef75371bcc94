"""Quiet by default: the commands `make demo` runs (train, here with --init; export, fp32 and INT8; the demo's
serve + client) print no framework chatter; `--verbose` brings it back."""

from __future__ import annotations

import re
from pathlib import Path

from tests.harness import run_cli

# Lines a user should not see without --verbose (each seen on this project's commands before they were hidden).
NOISE = {
    "Paddle's ccache warning": r"No ccache found",
    "a glog line": r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]",
    "PIR chatter": r"PIR not support input out tensor",
    "executor chatter": r"New Executor is Running",
    "a Python warning": r"\b\w*Warning: ",
    "terminal colour codes": r"\x1b\[",
    "oneDNN pass lines": r"^---\s",
    "INT8 calibration progress": r"Sampling stage|Adding quant",
    "Paddle's own logger": r"^\w{3} \w{3} \d\d \d\d:\d\d:\d\d-(INFO|WARNING)",
    "setuptools' licence banner": r"License classifiers are deprecated|project\.license.*(deprecated|TOML table)",
}


def noise(text: str) -> list[str]:
    """Every line of text that matches a NOISE pattern, with the pattern's name."""
    return [f"{what}: {line}" for line in text.splitlines() for what, pattern in NOISE.items()
            if re.search(pattern, line)]


def test_noise_filter_catches_the_lines_it_names() -> None:
    seen = ("/x/paddle/utils/cpp_extension/extension_utils.py:712: UserWarning: No ccache found. Please be aware",
            "W1201 00:45:37.790212  4409 eager_utils.cc:3584] Paddle static graph(PIR) not support input out tensor",
            "I1201 01:02:03.000001 77 interpretercore.cc:12] New Executor is Running.",
            "\x1b[37m---    quantized 12 fused_conv2d ops \x1b[0m",
            "Tue Dec 01 00:59:26-WARNING: The old way to load inference model is deprecated.",
            "Sampling stage, Run batch:|          | 0/1")
    assert all(noise(line) for line in seen)
    assert noise("2026-12-01 00:58:31,613 WARNING resnet_serve.train.trainer: AMP O1 requested, but ...") == []


def test_make_demo_steps_print_no_framework_noise(trained_checkpoint: Path, tmp_path: Path) -> None:
    weights = sorted(trained_checkpoint.glob("epoch_*.pdparams"))[-1]
    models = tmp_path / "models"
    steps = [
        ("resnet-train", "--init", str(weights), "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "16",
         "--num-workers", "1", "--out", str(tmp_path / "ckpt")),
        ("resnet-export", "--checkpoint", str(trained_checkpoint), "--out", str(models / "digits")),
        ("resnet-export", "--checkpoint", str(trained_checkpoint), "--out", str(models / "int8"), "--precision", "int8",
         "--calibration", "digits", "--calibration-samples", "16", "--force"),
        ("python", "-m", "resnet_serve.client.tools.demo", "--model-dir", str(models / "digits"), "--images",
         str(tmp_path / "holdout"), "--port", "0", "--metrics-port", "0", "--min-accuracy", "0"),
    ]
    for argv in steps:
        r = run_cli(*argv)
        assert r.returncode == 0, r.stdout + r.stderr
        assert noise(r.stdout + r.stderr) == [], " ".join(argv)
    assert "demo: server drained and exited with code 0" in r.stdout


def test_verbose_brings_the_framework_lines_back(trained_checkpoint: Path, tmp_path: Path) -> None:
    """The same fp32 export as in the quiet run above, with --verbose: Paddle's own lines are there."""
    loud = run_cli("resnet-export", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m"),
                   "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert any("No ccache found" in line for line in noise(loud.stderr)), loud.stderr
