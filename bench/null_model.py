"""The benchmark's 'null-sampled' model (bench/models.py): compute negligible, its input stage included. It takes
what resnet-export's models take (uint8 NHWC pixels; float32 NCHW in its float program) and answers from the mean of
every 8th row and column through one linear layer: no normalisation, which a GPU engine runs on the GPU, so what the
server spends around it is what it spends around any engine. A module of its own: paddle.jit.to_static reads the
source of the layer it converts."""

from __future__ import annotations

import paddle

STRIDE = 8


class Sampled(paddle.nn.Layer):
    """``pixels``: uint8 [N, H, W, 3] input, else float32 [N, 3, H, W]; ``fc`` is shared by both programs, so they
    have one parameters file."""

    def __init__(self, fc: paddle.nn.Linear, pixels: bool):
        super().__init__()
        self.fc, self.pixels = fc, pixels

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # Sample first, then cast: a cast of every pixel would cost the worker more than the rest of the path.
        if self.pixels:
            x = paddle.cast(x[:, ::STRIDE, ::STRIDE, :], "float32").mean(axis=[1, 2])
        else:
            x = x[:, :, ::STRIDE, ::STRIDE].mean(axis=[2, 3])
        return self.fc(x)
