"""The model directory contract shared by export (writes it) and the server (reads it).

Layout (DESIGN.md "Model directory"):  models/<name>/<version>/{inference.json|.pdmodel, inference.pdiparams,
manifest.json, labels.txt}. Versions are positive integers; the server serves the highest unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LABELS = "labels.txt"
SCHEMA_VERSION = 1


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


def list_versions(model_dir: Path) -> list[int]:
    """Versions present under models/<name>/ (numeric subfolders holding a manifest), ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / MANIFEST).is_file())


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


def load_manifest(version_dir: Path, verify_checksums: bool = False) -> Manifest:
    version_dir = Path(version_dir)
    path = version_dir / MANIFEST
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except FileNotFoundError as e:
        raise ModelDirError(f"{path} does not exist") from e
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path} is not valid JSON: {e}") from e
    for name in (manifest.model_file, manifest.params_file):
        if not (version_dir / name).is_file():
            raise ModelDirError(f"{version_dir / name} is missing")
    if verify_checksums:
        for name, digest in manifest.files.items():
            if sha256_file(version_dir / name) != digest:
                raise ModelDirError(f"checksum mismatch for {version_dir / name}")
    return manifest


def read_labels(version_dir: Path, manifest: Manifest) -> list[str]:
    """Labels from labels.txt, one per line; class ids stand in where the file is absent or short."""
    path = Path(version_dir) / manifest.labels_file
    labels = path.read_text().splitlines() if path.is_file() else []
    return [labels[i] if i < len(labels) else str(i) for i in range(manifest.num_classes)]
