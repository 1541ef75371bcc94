"""Checkpoint files written by training and read by export and --resume.

A checkpoint is three files with one prefix: `<dir>/epoch_003.pdparams` (model state dict, saved as trained:
fp32, or fp16 conv/linear for AMP-O2), `.pdopt` (optimizer state; AMP-O2 keeps fp32 `master_weights` there) and
`.json` (metadata everything downstream needs: arch, classes, input size, normalisation, labels, accuracy).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARAMS, OPT, META = ".pdparams", ".pdopt", ".json"
# The architectures training builds (models.py) and metadata names; here so the command line can check a name
# without importing Paddle.
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_EPOCH = re.compile(r"^epoch_(\d+)\.pdparams$")


class CheckpointError(ValueError):
    pass


def prefix_for(out_dir: Path, epoch: int) -> Path:
    return Path(out_dir) / f"epoch_{epoch:03d}"


def resolve(path: Path) -> Path:
    """A checkpoint given as a folder (latest epoch in it), a prefix, or any of its files -> its prefix."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    exported = (folder / "manifest.json").is_file() or any(folder.glob("*/manifest.json"))
    hint = ": it is an exported model (resnet-export's output); give the resnet-train checkpoint folder" \
        if exported else ""
    if path.is_dir():
        epochs = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _EPOCH.match(p.name)))
        if not epochs:
            raise CheckpointError(f"no checkpoint (epoch_NNN.pdparams) in folder {path}{hint}")
        return epochs[-1][1].with_suffix("")
    if path.suffix in (PARAMS, OPT, META):
        path = path.with_suffix("")
    if not path.with_suffix(PARAMS).is_file():
        raise CheckpointError(f"{path} is not a training checkpoint{hint}" if hint else
                              f"checkpoint {path.with_suffix(PARAMS)} does not exist")
    return path


def read_meta(prefix: Path) -> dict[str, Any]:
    meta = Path(prefix).with_suffix(META)
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint metadata {meta} is not valid JSON: {e}") from e


def write_checkpoint(prefix: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write each file of a checkpoint (suffix -> writer) under a hidden temporary name, then rename them into
    place with .pdparams last: a run killed while saving leaves no epoch_NNN.pdparams, so --resume and export
    (which look for it) take the previous, complete epoch instead of a truncated or metadata-less one."""
    prefix = Path(prefix)
    tmp = {suffix: prefix.parent / f".{prefix.name}{suffix}.tmp" for suffix in writers}
    try:
        for suffix, write in writers.items():
            write(tmp[suffix])
        for suffix in sorted(writers, key=lambda s: s == PARAMS):
            os.replace(tmp[suffix], prefix.with_suffix(suffix))
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
