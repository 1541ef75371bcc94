"""resnet-train used carelessly: --out naming a file, class folders whose names cannot be labels, resuming a run
whose data folder moved. Through the real console script: one line on stderr and exit 2, or a run that works."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.harness import one_error_line, run_cli

TINY = ["--max-steps-per-epoch", "1", "--batch-size", "4", "--input-size", "16", "--num-workers", "0", "--amp", "O0",
        "--no-augment"]


def _folder(root: Path, classes: tuple[str, ...] = ("red", "blue"), per_class: int = 6) -> Path:
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + i, 18), (200 * (k % 2), 40 * k % 256, 200 * (1 - k % 2))).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("flag", ["--out", "--write-holdout"])
@pytest.mark.parametrize("out", ["FILE", "FILE/sub"])
def test_out_naming_a_file_is_one_line(tmp_path: Path, out: str, flag: str) -> None:
    """Was a FileExistsError / NotADirectoryError traceback from mkdir."""
    (tmp_path / "FILE").write_text("not a folder")
    r = run_cli("resnet-train", "--epochs", "1", *TINY, flag, str(tmp_path / out))
    assert "FILE is a file, not a folder" in one_error_line(r)
    assert (tmp_path / "FILE").read_text() == "not a folder"


def test_class_folder_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """Such a name trained, then crashed resnet-export writing labels.txt (UnicodeEncodeError traceback)."""
    data = _folder(tmp_path / "data")
    bad = os.path.join(os.fsencode(data), b"caf\xe9")  # Latin-1 bytes, as an old archive would unpack
    os.mkdir(bad)
    for i in range(6):
        Image.new("RGB", (20, 20), (0, 200, 0)).save(os.path.join(bad, b"%d.png" % i))
    r = run_cli("resnet-train", "--data", str(data), "--epochs", "1", *TINY, "--out", str(tmp_path / "ck"))
    line = one_error_line(r)
    assert "caf\\udce9" in line and "not a printable UTF-8 name" in line
    assert not (tmp_path / "ck").exists()


def test_resume_after_the_data_folder_moved(tmp_path: Path) -> None:
    """--resume rebuilt the recorded folder path and refused the new one as a contradiction: a moved run could
    never be resumed."""
    data, ck = _folder(tmp_path / "data"), tmp_path / "ck"
    r = run_cli("resnet-train", "--data", str(data), "--epochs", "1", *TINY, "--out", str(ck))
    assert r.returncode == 0, r.stderr
    moved = data.rename(tmp_path / "moved")

    line = one_error_line(run_cli("resnet-train", "--resume", str(ck), "--epochs", "2"))
    assert f"the run's data folder {data} no longer exists" in line and "pass --data" in line

    other = _folder(tmp_path / "other", ("cat", "dog"))
    line = one_error_line(run_cli("resnet-train", "--resume", str(ck), "--epochs", "2", "--data", str(other)))
    assert "are no longer the resumed run's" in line

    r = run_cli("resnet-train", "--resume", str(ck), "--epochs", "2", "--data", str(moved))
    assert r.returncode == 0, r.stderr
    assert json.loads((ck / "epoch_002.json").read_text())["dataset"] == str(moved.resolve())


def test_checkpoint_files_appear_only_when_complete(tmp_path: Path) -> None:
    """A save that dies half way (here: the weights writer fails) leaves no epoch_NNN.pdparams and no temporary."""
    from resnet_serve.train import checkpoint as ckpt

    def broken(path: Path) -> None:
        path.write_bytes(b"half a tensor")
        raise OSError("killed")

    prefix = tmp_path / "epoch_002"
    with pytest.raises(OSError, match="killed"):
        ckpt.write_checkpoint(prefix, {".pdopt": lambda p: p.write_bytes(b"opt"), ".json": lambda p: p.write_text("{}"),
                                       ".pdparams": broken})
    assert not prefix.with_suffix(".pdparams").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_after_a_kill_while_saving(tmp_path: Path) -> None:
    """kill -9 between the renames leaves epoch 2's optimizer state and metadata but not its weights: --resume
    and export take epoch 1, and resuming writes a complete epoch 2 over the leftovers."""
    ck = tmp_path / "ck"
    r = run_cli("resnet-train", "--epochs", "2", *TINY, "--out", str(ck))
    assert r.returncode == 0, r.stderr
    (ck / "epoch_002.pdparams").rename(ck / ".epoch_002.pdparams.tmp")  # the state the kill leaves
    r = run_cli("resnet-train", "--resume", str(ck), "--num-workers", "0")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "epoch_001 at epoch 2" in r.stderr
    assert r.stdout.strip() == str(ck / "epoch_002.pdparams")
    assert json.loads((ck / "epoch_002.json").read_text())["epoch"] == 2


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_kill_9_mid_run_then_resume(tmp_path: Path) -> None:
    """The trainer killed outright: its DataLoader workers lingered for good (blocked flushing their output queue)
    holding the folder lock they inherited (flock), so --resume was refused as 'another resnet-train is writing'."""
    ck = tmp_path / "ck"
    with open(tmp_path / "log", "w") as log:  # a file, not a pipe: orphaned workers would hold a pipe open
        p = subprocess.Popen([str(Path(sys.executable).parent / "resnet-train"), "--epochs", "50", *TINY,
                              "--num-workers", "1", "--out", str(ck)], stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while not (ck / "epoch_001.pdparams").exists():
        assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.01)
    while not (workers := [int(c) for t in Path(f"/proc/{p.pid}/task").iterdir()
                           for c in (t / "children").read_text().split()]):  # mid-epoch: its workers are up
        assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    try:
        while alive := [pid for pid in workers if _running(pid)]:  # they die with the trainer, not linger
            assert time.monotonic() < deadline, f"DataLoader workers {alive} outlived the killed trainer"
            time.sleep(0.05)
        done = max(int(f.stem.split("_")[1]) for f in ck.glob("epoch_*.pdparams"))
        r = run_cli("resnet-train", "--resume", str(ck), "--epochs", str(done + 1), "--num-workers", "0")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(ck / f"epoch_{done + 1:03d}.pdparams")
    finally:
        for pid in workers:  # this test's own orphans
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("target", ["VERSION", "FILE", "MODEL"])
@pytest.mark.parametrize("flag", ["--init", "--resume"])
def test_an_exported_model_given_as_a_checkpoint_says_so(tmp_path: Path, target: str, flag: str) -> None:
    version = tmp_path / "models" / "digits" / "1"
    version.mkdir(parents=True)
    for name in ("manifest.json", "inference.json", "inference.pdiparams"):
        (version / name).write_text("{}")
    path = str({"VERSION": version, "FILE": version / "inference.pdiparams", "MODEL": version.parent}[target])
    line = one_error_line(run_cli("resnet-train", flag, path, "--epochs", "1", *TINY, "--out", str(tmp_path / "ck")))
    assert "it is an exported model (resnet-export's output)" in line


def test_classes_whose_images_are_all_held_out_are_named(tmp_path: Path) -> None:
    """Ten classes of one image each (the 10,000-classes case, small): two are held out whole and can never be
    predicted; the run said nothing and reported accuracy 0."""
    data = _folder(tmp_path / "data", tuple(f"c{i}" for i in range(10)), per_class=1)
    r = run_cli("resnet-train", "--data", str(data), "--epochs", "1", *TINY, "--out", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    assert "2 of 10 classes have no image in the training split" in r.stderr


def _png_header_only(path: Path, side: int) -> None:
    """A PNG whose header claims side x side pixels: PIL refuses it as a decompression bomb on open."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_giant_image_in_the_folder_is_one_line(tmp_path: Path) -> None:
    """A 20000 x 20000 image (PIL's DecompressionBombError, not an OSError) ended the run with a traceback."""
    data = _folder(tmp_path / "data")
    _png_header_only(data / "red" / "panorama.png", 20000)
    r = run_cli("resnet-train", "--data", str(data), "--epochs", "1", *TINY, "--batch-size", "8", "--holdout", "0.3",
                "--out", str(tmp_path / "ck"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot read image {data / 'red' / 'panorama.png'}: "
                                                     "Image size (400000000 pixels) exceeds limit")
