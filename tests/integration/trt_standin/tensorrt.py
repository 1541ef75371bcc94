"""Stand-in for NVIDIA's ``tensorrt`` module: only what resnet_serve.server.trt_cache asks of it after a conversion.
STANDIN_FAST_FP16=0 plays a GPU without fast fp16 (e.g. compute capability 6.1)."""

import os

__version__ = "10.5.0"


class Logger:
    ERROR = 1

    def __init__(self, level: int = 1) -> None:
        self.level = level


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.platform_has_fast_fp16 = os.environ.get("STANDIN_FAST_FP16", "1") == "1"
