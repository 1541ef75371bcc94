"""common/resnet_serve/common/modeldir.py: the model folder contract, on folders of stand-in files (the contract
reads names, presence and checksums, never the model; a real export: tests/integration/test_model_trust.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from resnet_serve.common.modeldir import (
    MANIFEST,
    Manifest,
    ModelDirError,
    inside,
    list_versions,
    load_manifest,
    read_labels,
    resolve_version_dir,
    sha256_file,
    version_of,
)

REQUIRED = {"name": "m", "version": 1, "architecture": "resnet18", "num_classes": 3, "input_size": [32, 32],
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def version(root: Path, v: int | str, labels: str | None = "cat\ndog\n", checksums: bool = True,
            **fields) -> Path:
    """root/<v>/ with stand-in model files, labels and a manifest listing their sha256."""
    d = root / str(v)
    d.mkdir(parents=True)
    (d / "inference.json").write_text("{}")
    (d / "inference.pdiparams").write_bytes(b"\0" * 16)
    if labels is not None:
        (d / "labels.txt").write_text(labels)
    files = {p.name: sha256_file(p) for p in d.iterdir()} if checksums else {}
    data = {**REQUIRED, "version": int(v) if str(v).isdigit() else 1, "files": files, **fields}
    (d / MANIFEST).write_text(json.dumps(data))
    return d


def error(call, *args, **kw) -> str:
    with pytest.raises(ModelDirError) as err:
        call(*args, **kw)
    return str(err.value)


@pytest.mark.parametrize(("name", "v"), [("1", 1), ("12", 12), ("0", None), ("01", None), ("-1", None),
                                         ("1.0", None), ("²", None), ("v1", None), ("", None)])
def test_version_of_accepts_plain_positive_integers_only(name: str, v: int | None) -> None:
    assert version_of(name) == v


def test_list_versions_counts_numeric_folders_with_a_manifest(tmp_path: Path) -> None:
    for v in (10, 2, 1):
        version(tmp_path, v)
    (tmp_path / "3").mkdir()  # no manifest: being written, or not a version
    (tmp_path / "4").write_text("a file")
    version(tmp_path, "007")  # leading zero: not a version name
    version(tmp_path, "tmp-5")
    assert list_versions(tmp_path) == [1, 2, 10]  # numeric order, not text order
    assert list_versions(tmp_path / "missing") == []


def test_resolve_serves_the_highest_unless_pinned(tmp_path: Path) -> None:
    for v in (1, 2, 10):
        version(tmp_path, v)
    assert resolve_version_dir(tmp_path) == tmp_path / "10"
    assert resolve_version_dir(tmp_path, 2) == tmp_path / "2"
    assert resolve_version_dir(tmp_path / "2") == tmp_path / "2"  # a version folder itself
    assert error(resolve_version_dir, tmp_path, 3) == f"version 3 not found under {tmp_path}; have [1, 2, 10]"
    assert error(resolve_version_dir, tmp_path / "none") == \
        f"no model versions (numeric folders with manifest.json) under {tmp_path / 'none'}"


def test_manifest_round_trips_and_ignores_fields_it_does_not_know(tmp_path: Path) -> None:
    m = Manifest(**REQUIRED, files={"a": "b"})
    again = Manifest.from_dict({**json.loads(m.to_json()), "added_later": True})
    assert again == m
    assert m.to_json().endswith("\n") and json.loads(m.to_json())["schema_version"] == 2


def test_a_manifest_without_input_format_is_an_older_float_export(tmp_path: Path) -> None:
    """Folders exported before schema 2 name no input_format: their program takes normalised float32 NCHW."""
    m = load_manifest(version(tmp_path, 1, schema_version=1))
    assert (m.input_format, m.takes_pixels, m.float_model_file) == ("float32_nchw", False, "")
    assert m.float_program() is m  # already the float program


def test_a_pixel_export_names_its_float_program_which_must_be_there_and_checksummed(tmp_path: Path) -> None:
    d = version(tmp_path, 1, input_format="uint8_nhwc", float_model_file="inference_float.json")
    assert error(load_manifest, d) == f"{d / 'inference_float.json'} is missing"
    (d / "inference_float.json").write_text("{}")
    assert error(load_manifest, d, verify_checksums=True) == \
        f"{d / MANIFEST} lists no sha256 for inference_float.json (in `files`)"
    m = load_manifest(d)
    assert m.takes_pixels
    f = m.float_program()
    assert (f.model_file, f.params_file, f.input_format) == ("inference_float.json", "inference.pdiparams",
                                                             "float32_nchw")
    assert not f.takes_pixels
    alone = version(tmp_path, 2, input_format="uint8_nhwc")
    assert "takes uint8 pixels only" in error(load_manifest(alone).float_program)
    outside = version(tmp_path, 3, input_format="uint8_nhwc", float_model_file="../1/inference_float.json")
    assert error(load_manifest, outside) == f"{outside / MANIFEST}: '../1/inference_float.json' leads outside its " \
        "version folder"


def test_an_unknown_input_format_or_a_newer_schema_is_refused(tmp_path: Path) -> None:
    d = version(tmp_path, 1, input_format="float16_nhwc")
    assert "input_format 'float16_nhwc' is not one of float32_nchw, uint8_nhwc" in error(load_manifest, d)
    d = version(tmp_path, 2, schema_version=3)
    assert "schema_version 3 is newer than this server reads (2): upgrade resnet-serve" in error(load_manifest, d)


def test_manifest_names_the_required_fields_it_lacks() -> None:
    data = {k: v for k, v in REQUIRED.items() if k not in ("mean", "num_classes")}
    assert error(Manifest.from_dict, data) == "manifest lacks required field(s): num_classes, mean"


def test_load_manifest_checks_presence_and_checksums(tmp_path: Path) -> None:
    d = version(tmp_path, 1)
    assert load_manifest(d, verify_checksums=True).architecture == "resnet18"
    (d / "inference.pdiparams").write_bytes(b"\1" * 16)
    assert load_manifest(d).name == "m"  # without verification the contents are not read
    assert error(load_manifest, d, verify_checksums=True) == \
        f"checksum mismatch for {d / 'inference.pdiparams'}: the file differs from what manifest.json lists"
    (d / "inference.pdiparams").unlink()
    assert error(load_manifest, d) == f"{d / 'inference.pdiparams'} is missing"


def test_verification_needs_every_file_the_server_reads_listed(tmp_path: Path) -> None:
    d = version(tmp_path, 1, checksums=False)
    assert error(load_manifest, d, verify_checksums=True) == \
        f"{d / MANIFEST} lists no sha256 for inference.json, inference.pdiparams, labels.txt (in `files`)"


def test_a_listed_file_that_is_gone_is_named(tmp_path: Path) -> None:
    d = version(tmp_path, 1)
    (d / "labels.txt").unlink()
    assert error(load_manifest, d, verify_checksums=True) == f"{d / 'labels.txt'} is missing (listed in manifest.json)"


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON"),
    ("5", "is not a manifest: a JSON int, not an object"),
    ("[1, 2]", "is not a manifest: a JSON list, not an object"),
    ('"name"', "is not a manifest: a JSON str, not an object"),
    ('{"name": "x"}', "manifest lacks required field(s): version, architecture"),
    ('{"name": "x", "version": 1, "architecture": "r", "num_classes": 2, "input_size": [8, 8], "mean": [0], '
     '"std": [1], "bogus_kind": 1, "files": [1]}', "files must map file names"),
])
def test_a_broken_manifest_is_named(tmp_path: Path, content: str | bytes, message: str) -> None:
    d = version(tmp_path, 1)
    if isinstance(content, bytes):
        (d / MANIFEST).write_bytes(content)
    else:
        (d / MANIFEST).write_text(content)
    msg = error(load_manifest, d)
    assert msg.startswith(str(d / MANIFEST)) and message in msg, msg  # the file is named, then what is wrong
    assert error(load_manifest, tmp_path / "9") == f"{tmp_path / '9' / MANIFEST} does not exist"


@pytest.mark.parametrize("name", ["/etc/passwd", "../2/inference.json", "..", ".", "a/../../x", ""])
def test_names_that_leave_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    d = version(tmp_path, 1)
    msg = error(inside, d, name)
    assert msg.startswith(f"{d / MANIFEST}: ") and ("must be relative" in msg or "leads outside" in msg), msg


def test_a_way_out_and_back_in_is_inside() -> None:
    """Names are judged by where they resolve: 1/../1/x is 1/x."""
    d = Path("/models/m/1")
    assert inside(d, "../1/inference.json") == d / "../1/inference.json"


def test_a_symlink_out_of_the_folder_is_refused_one_inside_is_fine(tmp_path: Path) -> None:
    d = version(tmp_path, 1)
    os.symlink(tmp_path / "elsewhere.txt", d / "out.txt")
    os.symlink("labels.txt", d / "alias.txt")
    assert error(inside, d, "out.txt") == f"{d / MANIFEST}: 'out.txt' leads outside its version folder"
    assert inside(d, "alias.txt") == d / "alias.txt"


def test_every_name_a_manifest_gives_is_checked(tmp_path: Path) -> None:
    d = version(tmp_path, 1, labels_file="../../secrets.txt")
    assert error(load_manifest, d) == f"{d / MANIFEST}: '../../secrets.txt' leads outside its version folder"
    d2 = version(tmp_path, 2, files={"/etc/shadow": "0" * 64})
    assert error(load_manifest, d2) == f"{d2 / MANIFEST}: file name '/etc/shadow' must be relative to its version " \
                                       "folder"
    d3 = version(tmp_path, 3, files=["inference.json"])
    assert error(load_manifest, d3) == f"{d3 / MANIFEST}: files must map file names to sha256 digests"


def test_labels_fall_back_to_class_ids(tmp_path: Path) -> None:
    d = version(tmp_path, 1)  # two labels for three classes
    assert read_labels(d, load_manifest(d)) == ["cat", "dog", "2"]
    d2 = version(tmp_path, 2, labels=None)
    assert read_labels(d2, load_manifest(d2)) == ["0", "1", "2"]
