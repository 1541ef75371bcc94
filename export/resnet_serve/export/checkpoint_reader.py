"""Read a training checkpoint into an fp32 state dict that matches a freshly built model.

Handles the three layouts training writes: fp32; AMP-O1 (fp32 parameters too); AMP-O2 (fp16/bf16 conv and
linear parameters, fp32 BatchNorm, fp32 master weights in the `.pdopt` keyed by runtime parameter name). The map
from state-dict key to runtime name lives in the state dict under `StructuredToParameterName@@` and survives
`paddle.load` only with `keep_name_table=True` (docs/paddle.md). `set_state_dict` does not cast and only warns on
missing keys or wrong shapes, so keys and shapes are checked here, naming the first problem.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle

from resnet_serve.train import checkpoint as ckpt

log = logging.getLogger(__name__)
NAME_TABLE = "StructuredToParameterName@@"


class CheckpointReadError(ValueError):
    pass


@dataclass
class LoadedWeights:
    state: dict[str, np.ndarray]
    stored_dtypes: set[str] = field(default_factory=set)  # dtypes found in .pdparams, e.g. {"float16", "float32"}
    master_weights_used: int = 0  # tensors taken from the fp32 master weights
    low_precision_cast: int = 0  # fp16/bf16 tensors cast up with no master weight available

    @property
    def layout(self) -> str:
        low = self.stored_dtypes & {"float16", "bfloat16"}
        return f"amp-o2 ({'/'.join(sorted(low))})" if low else "fp32"


def _dtype_name(t) -> str:
    return str(t.dtype).replace("paddle.", "")


def _to_numpy32(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(np.float32) if t.dtype.kind == "f" else t
    if _dtype_name(t) in ("float16", "bfloat16", "float64"):
        t = t.astype("float32")  # bf16 has no numpy dtype: cast in Paddle first
    return t.numpy()


def _load(path: Path, **kw):
    try:
        return paddle.load(str(path), **kw)
    except Exception as e:  # paddle raises many types on foreign files
        raise CheckpointReadError(f"{path} is not a Paddle checkpoint ({type(e).__name__}: {e})") from e


def read_weights(prefix: Path, use_master_weights: bool = True) -> LoadedWeights:
    """Load `<prefix>.pdparams` (+ `.pdopt` master weights if present and wanted) as fp32 numpy arrays."""
    params = _load(Path(prefix).with_suffix(ckpt.PARAMS), keep_name_table=True)
    if not isinstance(params, dict) or not params:
        raise CheckpointReadError(f"{Path(prefix).with_suffix(ckpt.PARAMS)} is not a Paddle state dict")
    name_table = params.pop(NAME_TABLE, {}) or {}
    masters: dict = {}
    opt_path = Path(prefix).with_suffix(ckpt.OPT)
    if use_master_weights and opt_path.is_file():
        opt = _load(opt_path)
        masters = opt.get("master_weights", {}) if isinstance(opt, dict) else {}
    out = LoadedWeights(state={})
    for key, value in params.items():
        if not hasattr(value, "shape"):
            raise CheckpointReadError(f"entry {key!r} of {prefix}.pdparams is not a tensor")
        dtype = _dtype_name(value) if not isinstance(value, np.ndarray) else str(value.dtype)
        out.stored_dtypes.add(dtype)
        if dtype in ("float16", "bfloat16"):
            master = masters.get(name_table.get(key, ""))
            if master is not None:
                out.state[key] = _to_numpy32(master)
                out.master_weights_used += 1
                continue
            out.low_precision_cast += 1
        out.state[key] = _to_numpy32(value)
    if out.low_precision_cast:
        log.warning("%d %s parameters had no fp32 master weight and were cast up: expect small logit changes",
                    out.low_precision_cast, "/".join(sorted(out.stored_dtypes & {"float16", "bfloat16"})))
    return out


def check_against(model: paddle.nn.Layer, state: dict[str, np.ndarray], arch: str) -> None:
    """Fail on the first missing key, unexpected key or shape mismatch (sorted for a stable message)."""
    own = model.state_dict()
    for key in own:
        if key not in state:
            raise CheckpointReadError(f"checkpoint does not match {arch}: missing key {key!r}")
    for key in state:
        if key not in own:
            raise CheckpointReadError(f"checkpoint does not match {arch}: unexpected key {key!r}")
    for key, value in own.items():
        if list(value.shape) != list(state[key].shape):
            raise CheckpointReadError(f"checkpoint does not match {arch}: {key!r} has shape "
                                      f"{list(state[key].shape)}, the model expects {list(value.shape)}")
