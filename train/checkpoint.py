"""Checkpoint files written by training and read by export and --resume.

A checkpoint is three files with one prefix: `<dir>/epoch_003.pdparams` (model state dict, saved as trained:
fp32, or fp16 conv/linear for AMP-O2), `.pdopt` (optimizer state; AMP-O2 keeps fp32 `master_weights` there) and
`.json` (metadata everything downstream needs: arch, classes, input size, normalisation, labels, accuracy).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PARAMS, OPT, META = ".pdparams", ".pdopt", ".json"
# The architectures training builds (train/models.py) and metadata names; here so the command line can check a name
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
    if path.is_dir():
        epochs = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _EPOCH.match(p.name)))
        if not epochs:
            raise CheckpointError(f"no checkpoint (epoch_NNN.pdparams) in folder {path}")
        return epochs[-1][1].with_suffix("")
    if path.suffix in (PARAMS, OPT, META):
        path = path.with_suffix("")
    if not path.with_suffix(PARAMS).is_file():
        raise CheckpointError(f"checkpoint {path.with_suffix(PARAMS)} does not exist")
    return path


def read_meta(prefix: Path) -> dict[str, Any]:
    meta = Path(prefix).with_suffix(META)
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint metadata {meta} is not valid JSON: {e}") from e


def write_meta(prefix: Path, meta: dict[str, Any]) -> None:
    Path(prefix).with_suffix(META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
