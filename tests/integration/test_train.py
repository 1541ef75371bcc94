"""Training: the AMP recipe on CPU (falls back to fp32, says so), checkpoints with metadata, resume, bad data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.harness import run_cli


def test_checkpoint_every_epoch_with_metadata(trained_checkpoint: Path) -> None:
    for epoch in (1, 2):
        for suffix in (".pdparams", ".pdopt", ".json"):
            assert (trained_checkpoint / f"epoch_{epoch:03d}{suffix}").is_file()
    meta = json.loads((trained_checkpoint / "epoch_002.json").read_text())
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 10 and meta["input_size"] == [32, 32]
    assert meta["labels"] == [str(i) for i in range(10)] and meta["epoch"] == 2
    assert 0.0 <= meta["eval_accuracy"] <= 1.0
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
    # CPU run: AMP O2 was requested, Paddle cannot do it here, fp32 is what ran and what is recorded.
    assert meta["amp_requested"] == "O2" and meta["amp"] == "O0"


def test_cpu_amp_fallback_is_logged_once(tmp_path: Path) -> None:
    r = run_cli("resnet-train", "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "16",
                "--num-workers", "0", "--out", str(tmp_path / "c"), "--amp", "O1")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "CPU run" in ln]
    assert len(lines) == 1 and "fp32" in lines[0]


def test_resume_continues_from_saved_epoch(trained_checkpoint: Path, tmp_path: Path) -> None:
    """The run's own settings (batch size, steps, AMP level, data) come from the checkpoint; --epochs extends it;
    the new epoch is written next to the checkpoint it continues."""
    run = tmp_path / "digits"
    shutil.copytree(trained_checkpoint, run)
    r = run_cli("resnet-train", "--epochs", "3", "--num-workers", "0", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "at epoch 3" in r.stderr and "extending the run from 2 to 3" in r.stderr
    assert sorted(p.name for p in run.glob("*.pdparams")) == [f"epoch_00{i}.pdparams" for i in (1, 2, 3)]
    meta = json.loads((run / "epoch_003.json").read_text())
    assert meta["epoch"] == 3 and meta["epochs"] == 3 and meta["batch_size"] == 32 and meta["amp_requested"] == "O2"


def test_empty_dataset_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data" / "cats").mkdir(parents=True)
    r = run_cli("resnet-train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"))
    assert r.returncode == 2
    assert "holds no images" in r.stderr and "Traceback" not in r.stderr


def test_unreadable_image_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data" / "cats").mkdir(parents=True)
    (tmp_path / "data" / "cats" / "x.png").write_bytes(b"not a png")
    r = run_cli("resnet-train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"))
    assert r.returncode == 2
    assert "cannot read image" in r.stderr and "Traceback" not in r.stderr


def test_image_folder_dataset_trains(tmp_path: Path) -> None:
    from PIL import Image

    for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40 + i, 30), colour).save(tmp_path / "data" / c / f"{i}.jpg")
    r = run_cli("resnet-train", "--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "4",
                "--num-workers", "0", "--out", str(tmp_path / "c"), "--input-size", "24")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "c" / "epoch_001.json").read_text())
    assert meta["labels"] == ["blue", "red"] and meta["input_size"] == [24, 24]
