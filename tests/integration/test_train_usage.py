"""Every nonsense training or export setting: one line on stderr, exit 2, no traceback, nothing written; checked
against the data before Paddle starts. Run through the real console scripts, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.harness import one_error_line, run_cli


def _folder(root: Path, per_class: int) -> Path:
    for c, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + i, 18), colour).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--holdout", "0"], "--holdout must be a fraction between 0 and 1"),
    (["--holdout", "1.5"], "--holdout must be a fraction between 0 and 1"),
    (["--holdout", "0.0001"], "leaves 1797 for training and 0 held out"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "500", "--data", "SMALL"], "--batch-size 500 is larger than the training split (16 of 20"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--input-size", "4"], "--input-size must be between"),
    (["--arch", "resnet19"], "unknown architecture 'resnet19'"),
    (["--crop-scale", "0"], "--crop-scale must be in (0, 1]"),
    (["--num-workers", "-1"], "--num-workers must be 0 or more"),
    (["--epochs", "x"], "invalid int value: 'x'"),
    (["--data", "MISSING"], "does not exist"),
    (["--init", "MISSING"], "does not exist"),
    (["--resume", "MISSING"], "does not exist"),
    (["--write-holdout", "OUT", "--holdout", "2"], "--holdout must be a fraction between 0 and 1"),
])
def test_nonsense_setting_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    subs = {"SMALL": str(_folder(tmp_path / "small", 10)) if "SMALL" in args else "",
            "MISSING": str(tmp_path / "missing"), "OUT": str(tmp_path / "held")}
    r = run_cli("resnet-train", "--out", str(tmp_path / "ck"), *[subs.get(a, a) for a in args])
    assert message in one_error_line(r)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "held").exists()


def test_cross_architecture_init_is_refused_before_paddle(trained_checkpoint: Path, tmp_path: Path) -> None:
    r = run_cli("resnet-train", "--arch", "resnet34", "--init", str(trained_checkpoint), "--out", str(tmp_path / "c"))
    line = one_error_line(r)
    assert "holds resnet18 weights and this run trains resnet34" in line and "--init-partial" in line


def test_cross_architecture_weights_file_is_refused(trained_checkpoint: Path, tmp_path: Path) -> None:
    """A bare .pdparams has no metadata: the tensor check refuses it (after Paddle started, still one error line)."""
    bare = tmp_path / "weights.pdparams"
    bare.write_bytes((trained_checkpoint / "epoch_002.pdparams").read_bytes())
    r = run_cli("resnet-train", "--arch", "resnet34", "--init", str(bare), "--epochs", "1", "--batch-size", "8",
                "--input-size", "16", "--num-workers", "0", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "matches only" in errors[0] and "--init-partial" in errors[0]
    assert not list((tmp_path / "c").glob("*.pdparams"))


def test_init_from_a_checkpoint_folder_and_partial_init(trained_checkpoint: Path, tmp_path: Path) -> None:
    common = ["--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "8", "--input-size", "16",
              "--num-workers", "0", "--amp", "O0"]
    r = run_cli("resnet-train", "--init", str(trained_checkpoint), *common, "--out", str(tmp_path / "same"))
    assert r.returncode == 0, r.stderr
    assert "init (partial)" not in r.stderr and "matches only" not in r.stderr
    r = run_cli("resnet-train", "--arch", "resnet34", "--init", str(trained_checkpoint), "--init-partial", *common,
                "--out", str(tmp_path / "partial"))
    assert r.returncode == 0, r.stderr
    loaded = [ln for ln in r.stderr.splitlines() if "init (partial): loaded" in ln]
    assert len(loaded) == 1 and "tensors from" in loaded[0] and "fresh initialisation" in loaded[0]
    assert json.loads((tmp_path / "partial" / "epoch_001.json").read_text())["arch"] == "resnet34"


def test_single_step_epoch_warns(tmp_path: Path) -> None:
    data = _folder(tmp_path / "d", 5)  # 10 images, 8 for training
    r = run_cli("resnet-train", "--data", str(data), "--batch-size", "8", "--epochs", "1", "--input-size", "16",
                "--num-workers", "0", "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert "--batch-size 8 on 8 training images makes every epoch a single step" in r.stderr


def test_export_input_size_other_than_training_needs_force(trained_checkpoint: Path, tmp_path: Path) -> None:
    r = run_cli("resnet-export", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m"),
                "--input-size", "64")
    line = one_error_line(r)
    assert "--input-size 64 differs from the 32x32 the checkpoint was trained at" in line and "--force" in line
    assert not (tmp_path / "m").exists()
    r = run_cli("resnet-export", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "m"),
                "--input-size", "64", "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "m" / "1" / "manifest.json").read_text())["input_size"] == [64, 64]


def test_profile_output_goes_under_out(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "ck"
    exe = str(Path(sys.executable).parent / "resnet-train")
    r = subprocess.run([exe, "--profile", "--epochs", "1", "--max-steps-per-epoch", "8", "--batch-size", "4",
                        "--input-size", "16", "--num-workers", "0", "--amp", "O0", "--out", str(out)],
                       cwd=cwd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert list(cwd.iterdir()) == []
    assert any((out / "profile").iterdir())


def test_image_that_fails_to_decode_in_a_worker_is_one_line(tmp_path: Path) -> None:
    """Its header is fine (the scan passes it), its pixels are cut short: the worker process that meets it must not
    end the run with Paddle's traceback."""
    data = _folder(tmp_path / "d", 6)
    whole = tmp_path / "whole.jpg"
    Image.new("RGB", (300, 300), (1, 2, 3)).save(whole)
    (data / "red" / "bad.jpg").write_bytes(whole.read_bytes()[:200])
    r = run_cli("resnet-train", "--data", str(data), "--batch-size", "2", "--epochs", "1", "--input-size", "16",
                "--num-workers", "2", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: cannot read image {data / 'red' / 'bad.jpg'}: Truncated File Read"]


def test_fresh_run_into_another_runs_folder_is_refused(trained_checkpoint: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in trained_checkpoint.iterdir()}
    r = run_cli("resnet-train", "--out", str(trained_checkpoint), "--epochs", "1", "--max-steps-per-epoch", "1")
    line = one_error_line(r)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert {p.name: p.stat().st_mtime_ns for p in trained_checkpoint.iterdir()} == before


def test_second_run_writing_the_same_folder_at_once_is_refused(tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "c"
    out.mkdir()
    with open(out / ".train.lock", "w") as held:  # what a running resnet-train holds for its whole run
        held.write("4242")
        held.flush()
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_cli("resnet-train", "--out", str(out), "--epochs", "1", "--max-steps-per-epoch", "1",
                    "--num-workers", "0")
    line = one_error_line(r)
    assert "another resnet-train (pid 4242) is writing to" in line
    assert not list(out.glob("epoch_*"))
