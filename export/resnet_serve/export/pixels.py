"""The exported program's own input stage: uint8 pixels [N, H, W, 3] -> normalised float32 [N, 3, H, W].

Why in the graph (docs/architecture.md, "Where normalisation happens"): the worker then copies the front's pixels
into the predictor as they are, instead of spending ~390 µs of CPU per 224x224 image converting them in numpy, and
a GPU receives a quarter of the bytes. The operations and constants are those of
resnet_serve.common.imaging.Normaliser (``normalisation_constants``): cast to float32, x * scale - shift per RGB
channel; only where they run changes.

``FloatInput`` is the same network behind no input stage: exported beside the pixel program, it takes float32 model
input for the requests that send it, and its parameters are the very same tensors (one ``.pdiparams`` file).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import paddle

from resnet_serve.common.imaging import normalisation_constants


class PixelInput(paddle.nn.Layer):
    """``net`` behind cast, NHWC -> NCHW and per-channel normalisation. The constants are embedded in the program
    (assign_value ops), not parameters: the parameter set, hence the ``.pdiparams`` file, stays the network's."""

    def __init__(self, net: paddle.nn.Layer, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        scale, shift = normalisation_constants(mean, std)
        self.scale = np.ascontiguousarray(scale.reshape(1, 3, 1, 1))
        self.shift = np.ascontiguousarray(shift.reshape(1, 3, 1, 1))

    def forward(self, pixels: paddle.Tensor) -> paddle.Tensor:
        x = paddle.transpose(paddle.cast(pixels, "float32"), [0, 3, 1, 2])
        return self.net(x * paddle.to_tensor(self.scale) - paddle.to_tensor(self.shift))


class FloatInput(paddle.nn.Layer):
    """``net`` as is, in a layer of its own: ``paddle.jit.to_static`` replaces the ``forward`` of the layer it is
    given, and the trained network must stay callable in dygraph (export verification calls it)."""

    def __init__(self, net: paddle.nn.Layer):
        super().__init__()
        self.net = net

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.net(x)


def pixel_spec(size: int) -> list[paddle.static.InputSpec]:
    return [paddle.static.InputSpec([None, size, size, 3], "uint8", "image")]


def float_spec(size: int) -> list[paddle.static.InputSpec]:
    return [paddle.static.InputSpec([None, 3, size, size], "float32", "image")]
