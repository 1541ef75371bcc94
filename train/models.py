"""ResNet architectures from paddle.vision, with any class count, and weight initialisation from a file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import paddle
from paddle.vision import models as pvm

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, Callable[..., paddle.nn.Layer]] = {
    "resnet18": pvm.resnet18,
    "resnet34": pvm.resnet34,
    "resnet50": pvm.resnet50,
    "resnet101": pvm.resnet101,
    "resnet152": pvm.resnet152,
}
HEAD_PREFIX = "fc."


class UnknownArchitecture(ValueError):
    pass


def build_model(arch: str, num_classes: int) -> paddle.nn.Layer:
    if arch not in ARCHITECTURES:
        raise UnknownArchitecture(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes=num_classes)


def init_from(model: paddle.nn.Layer, path: Path) -> list[str]:
    """Fine-tuning start: copy weights from a .pdparams file (e.g. downloaded ImageNet weights).

    Tensors whose shape differs from the model's (the classification head when the class count differs) keep
    their fresh initialisation. Returns the keys that were not copied.
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
    model.set_state_dict(copied)
    head = [k for k in skipped if k.startswith(HEAD_PREFIX)]
    if head:
        log.info("init: replaced the classification head (%s): class count differs from %s", ", ".join(head), path)
    other = [k for k in skipped if not k.startswith(HEAD_PREFIX)]
    if other:
        log.warning("init: %d tensors not found or of another shape in %s, e.g. %s", len(other), path, other[0])
    return skipped
