"""ResNet architectures from paddle.vision, with any class count, and weight initialisation from a file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import paddle
from paddle.vision import models as pvm

from .checkpoint import ARCHITECTURES as ARCH_NAMES

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, Callable[..., paddle.nn.Layer]] = {name: getattr(pvm, name) for name in ARCH_NAMES}
HEAD_PREFIX = "fc."


class UnknownArchitecture(ValueError):
    pass


def build_model(arch: str, num_classes: int) -> paddle.nn.Layer:
    if arch not in ARCHITECTURES:
        raise UnknownArchitecture(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes=num_classes)


class InitError(ValueError):
    pass


def init_from(model: paddle.nn.Layer, path: Path, partial: bool = False) -> list[str]:
    """Fine-tuning start: copy weights from a .pdparams file (e.g. downloaded ImageNet weights).

    Tensors whose shape differs from the model's (the classification head when the class count differs) keep
    their fresh initialisation. Any other tensor missing or of another shape (weights of another architecture)
    is an InitError unless `partial`, which loads what matches and logs what it loaded. Returns the keys not copied.
    """
    state = paddle.load(str(path))
    own = model.state_dict()
    copied, skipped = {}, []
    for key, value in own.items():
        src = state.get(key)
        if src is not None and list(src.shape) == list(value.shape):
            copied[key] = paddle.cast(paddle.to_tensor(src), value.dtype)
        else:
            skipped.append(key)
    other = [k for k in skipped if not k.startswith(HEAD_PREFIX)]
    if other and not partial:
        raise InitError(f"--init {path} matches only {len(copied)} of the model's {len(own)} tensors (e.g. "
                        f"{other[0]} is missing or of another shape: weights of another architecture?); "
                        "pass --init-partial to start from the tensors that match")
    model.set_state_dict(copied)
    head = [k for k in skipped if k.startswith(HEAD_PREFIX)]
    if head:
        log.info("init: replaced the classification head (%s): class count differs from %s", ", ".join(head), path)
    if partial:
        log.warning("init (partial): loaded %d of %d tensors from %s (in %s); %d keep their fresh initialisation "
                    "(in %s)", len(copied), len(own), path, ", ".join(_modules(list(copied))) or "none",
                    len(skipped), ", ".join(_modules(skipped)) or "none")
    return skipped


def _modules(keys: list[str]) -> list[str]:
    """layer4.1.conv2.weight -> layer4: a short summary of which parts of the model a key list covers."""
    return sorted({k.split(".")[0] for k in keys})
