"""The engine worker process: owns one Paddle predictor and runs batches the front process hands it.

Why a process: ``predictor.run()`` holds the GIL for the whole batch, so the gRPC front never runs one
(docs/architecture.md, "Process model"). Paddle is imported only inside functions here, so the front can import this
module (it needs ``worker_main`` as the spawn target) without loading Paddle.

Protocol over the control pipe (the batch itself travels through shared memory):
  worker -> front, once:  ("ready", load_seconds, warmup_seconds, input_name, output_name, build_info)
                          or ("error", message) if the model cannot be loaded (then the worker exits)
  front -> worker:        ("run", n)   batch = first n rows of the shared float32 [max_batch, 3, H, W] buffer
                          -> ("ok", logits float32 [n, C], compute_seconds) | ("error", message)
                          ("fail", message)   test hook: fails like a predictor exception -> ("error", ...)
                          ("stop",)   exit cleanly
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from resnet_serve.common.cli import framework_output
from resnet_serve.common.imaging import Normaliser
from resnet_serve.common.modeldir import Manifest, load_manifest
from resnet_serve.server.predictor_config import apply_plan, model_files, plan_config


def shm_bytes(max_batch: int, input_shape: tuple[int, int, int]) -> int:
    return max_batch * int(np.prod(input_shape)) * (4 + 1)


def shm_views(buf, max_batch: int, input_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One worker's shared memory: float32 [max_batch, 3, H, W] model input, then uint8 [max_batch, H, W, 3]."""
    c, h, w = input_shape
    f32 = np.ndarray((max_batch, c, h, w), dtype=np.float32, buffer=buf)
    u8 = np.ndarray((max_batch, h, w, c), dtype=np.uint8, buffer=buf, offset=f32.nbytes)
    return f32, u8


def build_predictor(version_dir: Path | str, manifest: Manifest | None = None, device: str = "cpu",
                    precision: str = "fp32", threads: int = 2, max_batch_size: int = 8,
                    trt_cache_dir: Path | str | None = None, engine: str = "paddle",
                    gpu_id: int = 0) -> Any:
    """A paddle.inference predictor configured by ``plan_config``.

    Shared by the worker and the in-process benchmark so both measure the same configuration.
    """
    return build(version_dir, manifest, device=device, precision=precision, threads=threads,
                 max_batch_size=max_batch_size, trt_cache_dir=trt_cache_dir, engine=engine, gpu_id=gpu_id)[0]


def build(version_dir: Path | str, manifest: Manifest | None = None, device: str = "cpu",
          **plan_args: Any) -> tuple[Any, dict[str, Any]]:
    """The predictor and what was built (on GPU: engine, precision actually built, cache; see trt_cache)."""
    version_dir = Path(version_dir)
    manifest = manifest if manifest is not None else load_manifest(version_dir)
    if device == "gpu":
        from .trt_cache import build_gpu_predictor  # the TensorRT conversion and its cache live there

        return build_gpu_predictor(version_dir, manifest, **plan_args)
    import paddle.inference as paddle_infer

    cache = plan_args.pop("trt_cache_dir", None)
    plan = plan_config(version_dir, manifest, device=device, trt_cache_dir=Path(cache) if cache else None,
                       **plan_args)
    config = paddle_infer.Config(*model_files(version_dir, manifest, plan))
    apply_plan(config, plan)
    with framework_output():  # oneDNN INT8 passes print to stderr even with glog info off
        return paddle_infer.create_predictor(config), {}


TEST_GATE_ENV = "RESNET_SERVE_TEST_WORKER_GATE"
_gate_fd: int | None = None


def _test_gate() -> None:
    """Tests only: with RESNET_SERVE_TEST_WORKER_GATE naming a FIFO, every run (warm-up included) first reads
    one byte from it, so a test decides exactly when a batch may finish. Unset in production: costs nothing."""
    global _gate_fd
    path = os.environ.get(TEST_GATE_ENV)
    if not path:
        return
    if _gate_fd is None:
        _gate_fd = os.open(path, os.O_RDONLY)
    os.read(_gate_fd, 1)


def _run(predictor: Any, input_name: str, output_name: str, batch: np.ndarray) -> np.ndarray:
    _test_gate()
    handle = predictor.get_input_handle(input_name)
    handle.reshape(list(batch.shape))
    handle.copy_from_cpu(batch)
    predictor.run()
    return predictor.get_output_handle(output_name).copy_to_cpu()


def worker_main(conn: Connection, shm_name: str, version_dir: str, plan_args: dict[str, Any],
                buckets: Sequence[int], input_shape: Sequence[int]) -> None:
    """Process body: load and warm the predictor, report ready, then serve ("run", n) until ("stop",).

    ``plan_args`` are the keyword arguments of ``build_predictor`` after ``manifest`` (device, precision,
    threads, max_batch_size, trt_cache_dir, engine, gpu_id), plus ``visible_gpu`` on GPU (trt_cache.select_gpu).
    """
    from .trt_cache import select_gpu

    plan_args = select_gpu(plan_args)  # CUDA_VISIBLE_DEVICES, before anything imports Paddle
    # The front owns shutdown: Ctrl-C in a terminal reaches the whole process group, but only the front
    # should react (it drains, then stops us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shm: SharedMemory | None = None
    view: np.ndarray | None = None
    try:
        t0 = time.perf_counter()
        try:
            manifest = load_manifest(Path(version_dir))
            predictor, build_info = build(version_dir, manifest, **plan_args)
            # `import paddle` installs a SIGTERM handler that aborts with a crash dump; a terminate() from
            # the front should just end the process.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            input_name = predictor.get_input_names()[0]
            output_name = predictor.get_output_names()[0]
            shm = SharedMemory(name=shm_name)
            max_batch = int(plan_args.get("max_batch_size", max(buckets)))
            view, u8 = shm_views(shm.buf, max_batch, tuple(input_shape))
            normalise = Normaliser(manifest.mean, manifest.std)
            t1 = time.perf_counter()
            for b in buckets:  # every new shape costs a slow first run: pay it before serving
                _run(predictor, input_name, output_name, np.zeros((b, *input_shape), dtype=np.float32))
            t2 = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - report any load failure to the front, which raises it
            conn.send(("error", f"loading {version_dir} failed: {type(e).__name__}: {e}"))
            return
        conn.send(("ready", t1 - t0, t2 - t1, input_name, output_name, build_info))
        _serve(conn, predictor, input_name, output_name, view, u8, normalise)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front went away: nothing left to serve
    finally:
        view = None  # release the buffer export before closing the mapping
        if shm is not None:
            shm.close()
        conn.close()


def _prepare(view: np.ndarray, u8: np.ndarray, n: int, float_rows: Sequence[int], normalise: Normaliser) -> None:
    """Normalise the uint8 rows of the batch into the model input; float rows are already there."""
    if not float_rows:
        normalise(u8[:n], view[:n])
        return
    for i in sorted(set(range(n)) - set(float_rows)):
        normalise(u8[i], view[i])


def _serve(conn: Connection, predictor: Any, input_name: str, output_name: str, view: np.ndarray,
           u8: np.ndarray, normalise: Normaliser) -> None:
    while True:
        msg = conn.recv()
        cmd = msg[0]
        if cmd == "stop":
            return
        try:
            t0 = time.perf_counter()
            if cmd == "run":
                n = int(msg[1])
                if not 1 <= n <= view.shape[0]:
                    raise ValueError(f"batch size {n} outside 1..{view.shape[0]}")
                float_rows = msg[2] if len(msg) > 2 else range(n)  # ("run", n): all rows already float
                _prepare(view, u8, n, float_rows, normalise)
                out = _run(predictor, input_name, output_name, view[:n])
            elif cmd == "fail":
                raise RuntimeError(str(msg[1]))
            else:
                raise ValueError(f"unknown command {cmd!r}")
            reply: tuple = ("ok", np.ascontiguousarray(out, dtype=np.float32), time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a failed batch must not take the worker down
            reply = ("error", f"{type(e).__name__}: {e}")
        conn.send(reply)
