"""--resume restores the run it resumes: bit-identical to the uninterrupted run on CPU, flags that contradict the
checkpoint refused in one line, nothing left to train refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.harness import run_cli

RUN = ["--epochs", "3", "--max-steps-per-epoch", "2", "--batch-size", "8", "--input-size", "16", "--amp", "O0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three short epochs on the digits (augmentation on: the random crops must replay too), no worker processes."""
    out = tmp_path_factory.mktemp("resume") / "a"
    r = run_cli("resnet-train", *RUN, "--num-workers", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _params(path: Path) -> dict[str, np.ndarray]:
    import paddle

    return {k: np.asarray(v) for k, v in paddle.load(str(path)).items()}


def test_resume_equals_uninterrupted_bit_for_bit(uninterrupted: Path, tmp_path: Path) -> None:
    interrupted = tmp_path / "b"
    interrupted.mkdir()
    for f in uninterrupted.glob("epoch_001.*"):  # the run stopped after its first epoch
        shutil.copy(f, interrupted)
    r = run_cli("resnet-train", "--resume", str(interrupted), "--num-workers", "0")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in interrupted.glob("*.pdparams")) == [f"epoch_00{i}.pdparams" for i in (1, 2, 3)]
    for epoch in (2, 3):
        want, got = (_params(d / f"epoch_00{epoch}.pdparams") for d in (uninterrupted, interrupted))
        assert want.keys() == got.keys()
        for key in want:
            assert np.array_equal(want[key], got[key]), (epoch, key)
    metas = [json.loads((d / "epoch_003.json").read_text()) for d in (uninterrupted, interrupted)]
    assert metas[0]["eval_accuracy"] == metas[1]["eval_accuracy"]


@pytest.mark.parametrize("flag", [
    ["--arch", "resnet34"], ["--data", "DATA_FOLDER"], ["--input-size", "32"], ["--out", "OTHER"],
    ["--batch-size", "16"], ["--lr", "0.1"], ["--holdout", "0.3"], ["--seed", "1"], ["--amp", "O2"],
    ["--max-steps-per-epoch", "5"], ["--no-augment"], ["--crop-scale", "0.2"], ["--flip"], ["--init", "INIT"],
])
def test_contradicting_flag_is_refused(uninterrupted: Path, tmp_path: Path, flag: list[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for f in uninterrupted.glob("epoch_001.*"):
        shutil.copy(f, run)
    (tmp_path / "data" / "x").mkdir(parents=True)
    subs = {"DATA_FOLDER": str(tmp_path / "data"), "OTHER": str(tmp_path / "other"),
            "INIT": str(uninterrupted / "epoch_001.pdparams")}
    r = run_cli("resnet-train", "--resume", str(run), *[subs.get(a, a) for a in flag])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "contradicts" in lines[0], r.stderr
    assert flag[0] in lines[0] or "augmentation" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == ["epoch_001.json", "epoch_001.pdopt", "epoch_001.pdparams"]


def test_a_flag_equal_to_the_checkpoint_is_accepted(uninterrupted: Path, tmp_path: Path) -> None:
    """Repeating the run's own settings is no contradiction (only the check runs: --epochs 1 is refused next)."""
    r = run_cli("resnet-train", "--resume", str(uninterrupted), "--batch-size", "8", "--input-size", "16",
                "--data", "digits", "--out", str(uninterrupted), "--epochs", "3")
    assert r.returncode == 2 and "nothing left to train" in r.stderr and "contradicts" not in r.stderr


@pytest.mark.parametrize("extra", [[], ["--epochs", "2"], ["--epochs", "3"]])
def test_resume_past_the_end_is_refused(uninterrupted: Path, extra: list[str]) -> None:
    before = sorted(p.name for p in uninterrupted.iterdir())
    r = run_cli("resnet-train", "--resume", str(uninterrupted), *extra)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: nothing left to train: {uninterrupted / 'epoch_003'} is epoch 3 and the run ends at epoch "
        f"{extra[1] if extra else 3}; pass --epochs N with N > 3 to train further"]
    assert sorted(p.name for p in uninterrupted.iterdir()) == before


def test_resume_from_an_older_epoch_would_overwrite_and_is_refused(uninterrupted: Path) -> None:
    r = run_cli("resnet-train", "--resume", str(uninterrupted / "epoch_001"))
    assert r.returncode == 2 and "would overwrite the later epoch_003" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
