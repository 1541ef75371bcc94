"""Shared fixtures: one tiny exported ResNet per test session (small input, few classes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import make_tiny_model_dir, run_cli


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/tiny with version 1: a random ResNet-18, 10 classes, 32x32 input, PIR format; its manifest as exports
    wrote it before schema 2 (float32 NCHW input, normalised by the worker)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_pixel_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/tiny with version 1 as resnet-export writes it now: tiny_model_dir's network and weights, its
    program taking uint8 NHWC pixels (normalised in the graph), plus its float program over the same params."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny", pixels=True)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real training run on the embedded digits: ResNet-18, 32x32, 2 epochs of 3 steps."""
    out = tmp_path_factory.mktemp("ckpt") / "digits"
    r = run_cli("resnet-train", "--epochs", "2", "--max-steps-per-epoch", "3", "--batch-size", "32",
                "--num-workers", "1", "--out", str(out), "--amp", "O2")
    assert r.returncode == 0, r.stderr
    return out
