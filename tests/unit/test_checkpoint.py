"""train checkpoint: where a checkpoint's files are, its metadata, and writing it so that a run killed while saving
leaves the previous epoch as the latest (train/resnet_serve/train/checkpoint.py). Plain files, no Paddle."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_serve.train.checkpoint import (
    META,
    OPT,
    PARAMS,
    CheckpointError,
    prefix_for,
    read_meta,
    resolve,
    write_checkpoint,
)


def checkpoint(folder: Path, epoch: int, meta: str = '{"arch": "resnet18"}') -> Path:
    prefix = prefix_for(folder, epoch)
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((PARAMS, "p"), (OPT, "o"), (META, meta)):
        prefix.with_suffix(suffix).write_text(text)
    return prefix


def test_a_prefix_is_the_epoch_in_three_digits_or_more(tmp_path: Path) -> None:
    assert prefix_for(tmp_path, 3) == tmp_path / "epoch_003"
    assert prefix_for(tmp_path, 1234) == tmp_path / "epoch_1234"


def test_a_folder_resolves_to_its_latest_epoch_by_number(tmp_path: Path) -> None:
    for epoch in (9, 10, 999, 1000):
        checkpoint(tmp_path, epoch)
    (tmp_path / "epoch_2000.pdopt").write_text("an optimizer state without its params is no checkpoint")
    assert resolve(tmp_path) == tmp_path / "epoch_1000"


@pytest.mark.parametrize("given", ["epoch_005", "epoch_005.pdparams", "epoch_005.pdopt", "epoch_005.json"])
def test_a_prefix_or_any_of_its_files_resolves_to_the_prefix(tmp_path: Path, given: str) -> None:
    checkpoint(tmp_path, 5)
    assert resolve(tmp_path / given) == tmp_path / "epoch_005"


def test_an_empty_folder_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "best.pdparams").write_text("not named epoch_NNN")
    with pytest.raises(CheckpointError) as raised:
        resolve(tmp_path)
    assert str(raised.value) == f"no checkpoint (epoch_NNN.pdparams) in folder {tmp_path}"


def test_a_missing_checkpoint_names_the_params_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as raised:
        resolve(tmp_path / "epoch_007.json")
    assert str(raised.value) == f"checkpoint {tmp_path / 'epoch_007.pdparams'} does not exist"
    assert isinstance(raised.value, ValueError)  # command lines report it as a bad argument


def test_an_exported_model_given_as_a_checkpoint_says_what_to_give_instead(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "manifest.json").write_text("{}")
    hint = ": it is an exported model (resnet-export's output); give the resnet-train checkpoint folder"
    with pytest.raises(CheckpointError) as raised:
        resolve(tmp_path)
    assert str(raised.value) == f"no checkpoint (epoch_NNN.pdparams) in folder {tmp_path}{hint}"
    with pytest.raises(CheckpointError) as raised:
        resolve(tmp_path / "1" / "inference.json")
    assert str(raised.value) == f"{tmp_path / '1' / 'inference'} is not a training checkpoint{hint}"


def test_metadata_is_read_and_absent_metadata_is_empty(tmp_path: Path) -> None:
    assert read_meta(checkpoint(tmp_path, 1, '{"arch": "resnet34", "num_classes": 10}')) == {
        "arch": "resnet34", "num_classes": 10}
    assert read_meta(tmp_path / "epoch_404") == {}


def test_unreadable_metadata_is_refused_naming_the_file(tmp_path: Path) -> None:
    prefix = checkpoint(tmp_path, 1, "{truncated")
    with pytest.raises(CheckpointError) as raised:
        read_meta(prefix)
    assert str(raised.value).startswith(f"checkpoint metadata {prefix.with_suffix(META)} is not valid JSON: ")


def test_a_written_checkpoint_has_every_file_and_no_temporary_one(tmp_path: Path) -> None:
    prefix = prefix_for(tmp_path, 2)
    write_checkpoint(prefix, {suffix: (lambda s: lambda p: p.write_text(s))(suffix) for suffix in (PARAMS, OPT, META)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_002.json", "epoch_002.pdopt", "epoch_002.pdparams"]
    assert prefix.with_suffix(OPT).read_text() == OPT
    assert resolve(tmp_path) == prefix


def test_a_save_that_fails_midway_leaves_the_previous_epoch_the_latest(tmp_path: Path) -> None:
    previous = checkpoint(tmp_path, 1)

    def broken(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(prefix_for(tmp_path, 2), {PARAMS: lambda p: p.write_text("p"), OPT: broken,
                                                   META: lambda p: p.write_text("{}")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_001.json", "epoch_001.pdopt", "epoch_001.pdparams"]
    assert resolve(tmp_path) == previous
