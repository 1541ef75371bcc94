"""Recording stand-in for ``paddle.tensorrt.export`` (absent from Paddle's CPU wheel).

Parameter names from PaddlePaddle/Paddle ``python/paddle/tensorrt/export.py`` as stored at commit 7357bc7f (a Paddle
3.x revision: ``TensorRTConfig`` has ``use_cuda_graph`` and ``refit_params_path``). ``Input``, ``TensorRTConfig``,
``PrecisionMode`` and ``convert(model_path, config)`` have the same names at commit 02a5e4e0 and in the v3.0 API
reference ("Paddle-TensorRT 接口类", paddlepaddle.org.cn/inference/v3.0). A call with a wrong keyword fails here as
it would there.

``convert`` does what Paddle's does to the path it is given: with STANDIN_LOAD=1 it loads it with the real
``paddle.static.io.load_inference_model`` under ``paddle.pir_utils.IrGuard()`` (CPU executor instead of
CUDAPlace(0)); otherwise it reads ``model_path + ".json"``, the file Paddle's loader opens. Then it writes what
Paddle writes: ``<save_model_dir>.json`` (one op turned into ``pd_op.tensorrt_engine``), ``.pdiparams`` and the
engine files in the directory ``<save_model_dir>/``. Each call is appended to STANDIN_RECORD (one JSON line).
STANDIN_MODE=die stops the process after the program file, as a conversion killed midway; STANDIN_MODE=no_params
returns without writing the params file; STANDIN_GATE names a FIFO to read one byte from before writing anything
(the test decides when the conversion may finish).
"""

from __future__ import annotations

import json
import os
import shutil
from enum import Enum
from pathlib import Path


class Input:
    def __init__(self, warmup_data=None, min_input_shape=None, max_input_shape=None, optim_input_shape=None,
                 input_data_type="float32", input_range=None, name=None) -> None:
        if warmup_data is None and None in (min_input_shape, max_input_shape, optim_input_shape):
            raise ValueError("When warm_data is None, min/max/optim shapes must be specified.")
        self.min_input_shape, self.optim_input_shape, self.max_input_shape = (min_input_shape, optim_input_shape,
                                                                              max_input_shape)
        self.name, self.input_data_type = name, input_data_type


class PrecisionMode(Enum):
    FP32 = "FP32"
    FP16 = "FP16"
    BF16 = "BF16"
    INT8 = "INT8"


class TensorRTConfig:
    def __init__(self, inputs, min_subgraph_size=3, save_model_dir=None, disable_ops=None,
                 precision_mode=PrecisionMode.FP32, ops_run_float=None, optimization_level=3, disable_passes=None,
                 workspace_size=1 << 30, use_cuda_graph=False, refit_params_path=None) -> None:
        self.inputs, self.min_subgraph_size, self.save_model_dir = inputs, min_subgraph_size, save_model_dir
        self.precision_mode, self.workspace_size = precision_mode, workspace_size


def _record(event: dict) -> None:
    with open(os.environ["STANDIN_RECORD"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), **event}) + "\n")


def convert(model_path, config):
    if os.path.abspath(config.save_model_dir) == os.path.abspath(model_path):  # as Paddle's convert checks
        raise ValueError("The `config.save_model_dir` and `model_path` cannot be the same.")
    _record({"event": "convert", "model_path": model_path, "save_model_dir": config.save_model_dir,
             "precision_mode": config.precision_mode.value, "workspace_size": config.workspace_size,
             "inputs": [{"name": i.name, "min": list(i.min_input_shape), "opt": list(i.optim_input_shape),
                         "max": list(i.max_input_shape), "dtype": i.input_data_type} for i in config.inputs]})
    if os.environ.get("STANDIN_LOAD") == "1":
        import paddle

        with paddle.pir_utils.IrGuard():
            exe = paddle.static.Executor(paddle.CPUPlace())
            _, feeds, _ = paddle.static.io.load_inference_model(model_path, executor=exe)
        _record({"event": "loaded", "feeds": list(feeds)})
    program = Path(model_path + ".json").read_text()
    gate = os.environ.get("STANDIN_GATE")
    if gate:
        with open(gate, "rb") as f:
            f.read(1)
    save = Path(config.save_model_dir)
    # Paddle's PIR files name ops by dialect number: "1.tensorrt_engine" is pd_op.tensorrt_engine.
    save.with_name(save.name + ".json").write_text(program.replace('"1.conv2d"', '"1.tensorrt_engine"', 1))
    if os.environ.get("STANDIN_MODE") == "die":
        os._exit(9)
    if os.environ.get("STANDIN_MODE") != "no_params":  # a convert that returns without writing everything
        shutil.copyfile(model_path + ".pdiparams", save.with_name(save.name + ".pdiparams"))
    save.mkdir(parents=True, exist_ok=True)
    (save / "engine_12345678_1.trt").write_bytes(b"serialized engine")
    _record({"event": "done"})
