"""The model directory contract shared by export (writes it) and the server (reads it).

Layout (docs/architecture.md, "Model directory"): models/<name>/<version>/{inference.json|.pdmodel, inference.pdiparams,
manifest.json, labels.txt}. Versions are positive integers; the server serves the highest unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LABELS = "labels.txt"
# 2: `input_format` and `float_model_file` (a reader of schema 1 would feed float32 to a uint8 program).
SCHEMA_VERSION = 2
# What the program's input is. float32_nchw: normalised model input [N, 3, H, W] (every export before schema 2,
# and a manifest without the field). uint8_nhwc: pixels [N, H, W, 3]; the program normalises them with mean/std.
FLOAT32_NCHW = "float32_nchw"
UINT8_NHWC = "uint8_nhwc"
INPUT_FORMATS = (FLOAT32_NCHW, UINT8_NHWC)


class ModelDirError(ValueError):
    """A model directory that cannot be served, with a message naming what is wrong."""


@dataclass
class Manifest:
    name: str
    version: int
    architecture: str
    num_classes: int
    input_size: list[int]  # [H, W]
    mean: list[float]  # per RGB channel, applied to pixels scaled to [0, 1]
    std: list[float]
    precision: str = "fp32"  # fp32 | fp16 | int8
    format: str = "pir"  # pir (inference.json) | legacy (inference.pdmodel)
    model_file: str = "inference.json"
    params_file: str = "inference.pdiparams"
    input_name: str = "image"
    labels_file: str = LABELS
    engine: str = "paddle"  # paddle (oneDNN on CPU / TensorRT on GPU) | openvino
    source_checkpoint: dict[str, Any] = field(default_factory=dict)
    exporter_version: str = ""
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    verification: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    input_format: str = FLOAT32_NCHW  # absent from older manifests: float input, normalised by the server
    # uint8_nhwc only: the same network taking float32 [N, 3, H, W] model input, loaded with the same params_file
    # (docs/architecture.md, "Where normalisation happens"); "" when the export has none.
    float_model_file: str = ""

    @property
    def takes_pixels(self) -> bool:
        """Whether the program's input is uint8 pixels [N, H, W, 3] (it normalises them itself)."""
        return self.input_format == UINT8_NHWC

    def float_program(self) -> Manifest:
        """This manifest as the description of its float program (uint8_nhwc exports only): same weights, float32
        NCHW input. Raises ModelDirError when the export has no float program."""
        if not self.takes_pixels:
            return self
        if not self.float_model_file:
            raise ModelDirError(f"{self.name} v{self.version} takes uint8 pixels only: its export has no float "
                                "program (float_model_file) for float32 model input")
        return replace(self, model_file=self.float_model_file, input_format=FLOAT32_NCHW, float_model_file="")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("name", "version", "architecture", "num_classes", "input_size", "mean", "std")
                   if k not in data]
        if missing:
            raise ModelDirError(f"manifest lacks required field(s): {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def version_of(name: str) -> int | None:
    """The version a folder name stands for: ASCII digits only, no leading zero, above 0; else None
    (str.isdigit() also accepts '²', which int() then refuses)."""
    if name.isascii() and name.isdigit() and not name.startswith("0"):
        return int(name)
    return None


def list_versions(model_dir: Path) -> list[int]:
    """Versions present under models/<name>/ (numeric subfolders holding a manifest), ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(v for p in model_dir.iterdir()
                  if (v := version_of(p.name)) is not None and p.is_dir() and (p / MANIFEST).is_file())


def resolve_version_dir(model_dir: Path, version: int | None = None) -> Path:
    """models/<name> (+ optional version) -> the version folder to serve.

    Also accepts a path that is itself a version folder (holds manifest.json).
    """
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST).is_file() and version is None:
        return model_dir
    versions = list_versions(model_dir)
    if not versions:
        raise ModelDirError(f"no model versions (numeric folders with {MANIFEST}) under {model_dir}")
    if version is None:
        return model_dir / str(versions[-1])
    if version not in versions:
        raise ModelDirError(f"version {version} not found under {model_dir}; have {versions}")
    return model_dir / str(version)


def inside(version_dir: Path, name: str) -> Path:
    """version_dir/name, refused unless it resolves inside version_dir: a manifest names files of its own
    folder, never an absolute path, a `..` way out, or a symlink leading elsewhere."""
    version_dir = Path(version_dir)
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise ModelDirError(f"{version_dir / MANIFEST}: file name {name!r} must be relative to its version folder")
    path = version_dir / name
    base, target = version_dir.resolve(), path.resolve()
    if target == base or base not in target.parents:
        raise ModelDirError(f"{version_dir / MANIFEST}: {name!r} leads outside its version folder")
    return path


def load_manifest(version_dir: Path, verify_checksums: bool = False) -> Manifest:
    """The version's manifest, every file name it gives checked to stay inside the folder. With
    verify_checksums, every file the server reads must be listed in `files` and match its sha256."""
    version_dir = Path(version_dir)
    path = version_dir / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelDirError(f"{path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelDirError(f"{path} is not a manifest: a JSON {type(data).__name__}, not an object")
    try:
        manifest = Manifest.from_dict(data)
    except ModelDirError as e:
        raise ModelDirError(f"{path}: {e}") from None
    except TypeError as e:  # a field of the wrong kind
        raise ModelDirError(f"{path} is not a manifest object: {e}") from e
    if not isinstance(manifest.schema_version, int) or manifest.schema_version > SCHEMA_VERSION:
        raise ModelDirError(f"{path}: schema_version {manifest.schema_version!r} is newer than this server reads "
                            f"({SCHEMA_VERSION}): upgrade resnet-serve to serve it")
    if manifest.input_format not in INPUT_FORMATS:
        raise ModelDirError(f"{path}: input_format {manifest.input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
    if not isinstance(manifest.files, dict):
        raise ModelDirError(f"{path}: files must map file names to sha256 digests")
    programs = [manifest.model_file, manifest.params_file]
    if manifest.float_model_file:
        programs.append(manifest.float_model_file)
    for name in (*programs, manifest.labels_file, *manifest.files):
        inside(version_dir, name)
    for name in programs:
        if not (version_dir / name).is_file():
            raise ModelDirError(f"{version_dir / name} is missing")
    if verify_checksums:
        needed = list(programs)
        if (version_dir / manifest.labels_file).exists():
            needed.append(manifest.labels_file)
        unlisted = [n for n in needed if n not in manifest.files]
        if unlisted:
            raise ModelDirError(f"{path} lists no sha256 for {', '.join(unlisted)} (in `files`)")
        for name, digest in manifest.files.items():
            if name == MANIFEST:
                continue  # a manifest cannot list its own checksum; one that tries is not held against it
            file = version_dir / name
            if not file.is_file():
                raise ModelDirError(f"{file} is missing (listed in {MANIFEST})")
            if sha256_file(file) != digest:
                raise ModelDirError(f"checksum mismatch for {file}: the file differs from what {MANIFEST} lists")
    return manifest


def read_labels(version_dir: Path, manifest: Manifest) -> list[str]:
    """Labels from labels.txt, one per line; class ids stand in where the file is absent or short."""
    path = inside(version_dir, manifest.labels_file)
    labels = path.read_text().splitlines() if path.is_file() else []
    return [labels[i] if i < len(labels) else str(i) for i in range(manifest.num_classes)]
