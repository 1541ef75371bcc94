"""resnet-export used carelessly: concurrent exports into one model folder, --out naming a file or a malformed
version, Ctrl-C mid-export. Through the real console script; the server must never see a half version folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_serve.common.modeldir import list_versions
from tests.harness import one_error_line, run_cli

EXPORT = str(Path(sys.executable).parent / "resnet-export")


def test_two_exports_at_once_get_distinct_versions(trained_checkpoint: Path, tmp_path: Path) -> None:
    """Both pick 'the next free version' at the same moment: without the model folder lock both wrote v1 and the
    second silently replaced the first."""
    model_dir = tmp_path / "models" / "digits"
    (model_dir / ".tmp-7-99999").mkdir(parents=True)  # what a kill -9 mid-export leaves behind
    procs = [subprocess.Popen([EXPORT, "--checkpoint", str(trained_checkpoint / f"epoch_00{e}"), "--out",
                               str(model_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for e in (1, 2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert sorted(Path(o[0].strip()).name for o in outs) == ["1", "2"]
    assert list_versions(model_dir) == [1, 2]
    epochs = set()
    for v in ("1", "2"):
        manifest = json.loads((model_dir / v / "manifest.json").read_text())
        assert manifest["version"] == int(v)
        epochs.add(manifest["source_checkpoint"]["epoch"])
    assert epochs == {1, 2}
    assert not list(model_dir.glob(".tmp-*"))


@pytest.mark.parametrize(("out", "message"), [
    ("FILE", "is a file, not a model folder"),
    ("FILE/sub", "FILE is a file, not a model folder"),
    ("models/m/007", "must be a positive number without leading zeros"),
    ("models/m/0", "must be a positive number without leading zeros"),
])
def test_bad_out_is_one_line(trained_checkpoint: Path, tmp_path: Path, out: str, message: str) -> None:
    (tmp_path / "FILE").write_text("not a folder")
    r = run_cli("resnet-export", "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / out))
    assert message in one_error_line(r)
    assert not (tmp_path / "models" / "m" / "007").exists() and not (tmp_path / "models" / "m" / "0").exists()


def test_ctrl_c_mid_export_leaves_no_version_folder(trained_checkpoint: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "digits"
    p = subprocess.Popen([EXPORT, "--checkpoint", str(trained_checkpoint), "--out", str(model_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(model_dir.glob(".tmp-*")) and p.poll() is None:  # the export has started writing
        assert time.monotonic() < deadline, "export never started writing"
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    if p.returncode == 0:  # it had already finished: then the version is complete
        assert list_versions(model_dir) == [1]
    else:  # one line, the shell's Ctrl-C status, no traceback
        assert not [q for q in model_dir.iterdir() if q.name[:1].isdigit()], err
        assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1] == "error: interrupted: no version was published", err[-2000:]
    assert not list(model_dir.glob(".tmp-*")) and not list(model_dir.glob(".old-*"))
