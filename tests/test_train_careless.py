"""resnet-train used carelessly: --out naming a file, class folders whose names cannot be labels, resuming a run
whose data folder moved. Through the real console script: one line on stderr and exit 2, or a run that works."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

TINY = ["--max-steps-per-epoch", "1", "--batch-size", "4", "--input-size", "16", "--num-workers", "0", "--amp", "O0",
        "--no-augment"]


def _folder(root: Path, classes: tuple[str, ...] = ("red", "blue"), per_class: int = 6) -> Path:
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + i, 18), (200 * (k % 2), 40 * k % 256, 200 * (1 - k % 2))).save(root / c / f"{i}.png")
    return root


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("out", ["FILE", "FILE/sub"])
def test_out_naming_a_file_is_one_line(tmp_path: Path, out: str) -> None:
    """Was a FileExistsError / NotADirectoryError traceback from mkdir."""
    (tmp_path / "FILE").write_text("not a folder")
    r = run_cli("resnet-train", "--epochs", "1", *TINY, "--out", str(tmp_path / out))
    assert "FILE is a file, not a folder" in _one_error_line(r)
    assert (tmp_path / "FILE").read_text() == "not a folder"


def test_class_folder_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """Such a name trained, then crashed resnet-export writing labels.txt (UnicodeEncodeError traceback)."""
    data = _folder(tmp_path / "data")
    bad = os.path.join(os.fsencode(data), b"caf\xe9")  # Latin-1 bytes, as an old archive would unpack
    os.mkdir(bad)
    for i in range(6):
        Image.new("RGB", (20, 20), (0, 200, 0)).save(os.path.join(bad, b"%d.png" % i))
    r = run_cli("resnet-train", "--data", str(data), "--epochs", "1", *TINY, "--out", str(tmp_path / "ck"))
    line = _one_error_line(r)
    assert "caf\\udce9" in line and "not a printable UTF-8 name" in line
    assert not (tmp_path / "ck").exists()


def test_resume_after_the_data_folder_moved(tmp_path: Path) -> None:
    """--resume rebuilt the recorded folder path and refused the new one as a contradiction: a moved run could
    never be resumed."""
    data, ck = _folder(tmp_path / "data"), tmp_path / "ck"
    r = run_cli("resnet-train", "--data", str(data), "--epochs", "1", *TINY, "--out", str(ck))
    assert r.returncode == 0, r.stderr
    moved = data.rename(tmp_path / "moved")

    line = _one_error_line(run_cli("resnet-train", "--resume", str(ck), "--epochs", "2"))
    assert f"the run's data folder {data} no longer exists" in line and "pass --data" in line

    other = _folder(tmp_path / "other", ("cat", "dog"))
    line = _one_error_line(run_cli("resnet-train", "--resume", str(ck), "--epochs", "2", "--data", str(other)))
    assert "are no longer the resumed run's" in line

    r = run_cli("resnet-train", "--resume", str(ck), "--epochs", "2", "--data", str(moved))
    assert r.returncode == 0, r.stderr
    assert json.loads((ck / "epoch_002.json").read_text())["dataset"] == str(moved.resolve())
