"""Paddle Inference predictor settings as plain data.

Why plain data: GPU settings cannot be exercised on the CPU wheel (``enable_tensorrt_engine`` raises
there), so settings are planned as an ordered list of ``(Config method name, args)`` calls that tests
check against a recording fake Config, and ``apply_plan`` replays them on a real
``paddle.inference.Config``. Nothing here imports Paddle at module level (the front stays Paddle-free).

Rules encoded here (measured on Paddle 3.3.1; docs/precision.md, docs/gpu.md):
- CPU: oneDNN explicitly on (0.4-0.6x the speed without it), math threads per instance, IR optim on.
- ``enable_memory_optim`` only for legacy ``.pdmodel``: it makes ``create_predictor`` fail for ``.json``.
- INT8 (oneDNN ``enable_mkldnn_int8``), OpenVINO and classic TensorRT need a legacy ``.pdmodel`` model.
- GPU: ``enable_use_gpu`` first; feed/fetch stay fp32 (``exp_disable_mixed_precision_ops``, as PaddleX does).
  Engine ``tensorrt`` (the GPU default): legacy models use classic TensorRT with dynamic shapes and a serialised
  engine cache; PIR ``.json`` models use PIR-TensorRT, an offline conversion (``paddle.tensorrt.convert``) that
  writes a new ``.json``/``.pdiparams`` pair. The plan carries it as a worker step (``PIR_TRT_CONVERT``, see
  ``pir_trt_step``) that trt_cache.py performs, once per cache key, before the Config is built; it is not
  a Config method, so ``apply_plan`` skips it. Engine ``cuda``: Paddle's own GPU kernels, fp32 or fp16
  (PaddleX's ``paddle_fp16``: ``enable_use_gpu(..., PrecisionType.Half)``), for GPUs or models where TensorRT
  is unavailable.
- INT8 is CPU only: int8 exports are oneDNN programs, which no GPU engine runs.
The GPU plans cannot run on a CPU-only machine; tests apply every Config call of every GPU plan to a real
``paddle.inference.Config`` (a wrong argument raises TypeError there) and the conversion to a stand-in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from resnet_serve.common.modeldir import Manifest

DEVICES = ("cpu", "gpu")
PRECISIONS = ("fp32", "fp16", "int8")
# paddle: the default (CPU: as the manifest says, oneDNN unless it names OpenVINO; GPU: TensorRT); onednn and
# openvino: CPU; tensorrt: GPU with TensorRT; cuda: GPU with Paddle's own kernels (no TensorRT); simulated: no
# Paddle at all, a + c*b ms per batch of b (benchmarks only: server/resnet_serve/server/simulated_engine.py).
ENGINES = ("paddle", "onednn", "openvino", "tensorrt", "cuda", "simulated")
SIMULATED = "simulated"
NORMALISE = ("auto", "graph", "worker")  # where uint8 pixels become model input (program_served)
CPU_ENGINES = ("onednn", "openvino")
GPU_ENGINES = ("tensorrt", "cuda")

# A plan step that is not a Config method: the worker converts the PIR model with PIR-TensorRT before
# building the Config, then loads the converted files (args: one dict, see pir_trt_step).
# Step names containing a dot are never Config calls.
PIR_TRT_CONVERT = "paddle.tensorrt.convert"

TRT_WORKSPACE_BYTES = 1 << 30
TRT_MIN_SUBGRAPH = 3

Plan = list[tuple[str, tuple]]


@dataclass(frozen=True)
class Precision:
    """A ``paddle.inference.PrecisionType`` member by name (Float32 | Half | Int8 | Bfloat16), resolved late.

    Keeps plans free of Paddle objects so they can be built and compared in the Paddle-free front process.
    """

    name: str


_TRT_PRECISION = {"fp32": Precision("Float32"), "fp16": Precision("Half"), "int8": Precision("Int8")}
_OPENVINO_PRECISION = {"fp32": Precision("Float32"), "int8": Precision("Int8")}
# paddle.tensorrt.PrecisionMode member names used by PIR-TensorRT.
_PIR_TRT_PRECISION = {"fp32": "FP32", "fp16": "FP16"}


def is_pir(manifest: Manifest) -> bool:
    """PIR (``.json``) vs legacy (``.pdmodel``) program, decided by the file actually served."""
    return manifest.model_file.endswith(".json")


def effective_precision(setting: str, manifest: Manifest) -> str:
    """What the predictor computes in: an int8 export always runs int8 (without ``enable_mkldnn_int8`` a quantised
    model is ~5x slower); ``int8`` asked of a model that was not quantised is refused."""
    if manifest.precision == "int8":
        if setting not in ("fp32", "int8"):
            raise ValueError(f"{manifest.name} v{manifest.version} is an int8 export; it cannot run as {setting}")
        return "int8"
    if setting == "int8":
        raise ValueError(f"precision int8 needs an int8 export (resnet-export --precision int8 --calibration ...); "
                         f"{manifest.name} v{manifest.version} is {manifest.precision}")
    return setting


def effective_engine(setting: str, manifest: Manifest, device: str = "cpu") -> str:
    """The engine that computes the answers: an explicit setting wins; the default ``paddle`` defers to the
    manifest on CPU and means TensorRT on GPU. OpenVINO cannot convert Paddle's quantised (QDQ) program
    (measured: 'Can't convert paddle model to openvino model'), so int8 exports run on oneDNN only."""
    if device == "gpu":
        return "tensorrt" if setting == "paddle" else setting
    engine = setting if setting != "paddle" else (manifest.engine or "paddle")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "openvino" and manifest.precision == "int8":
        raise ValueError("the OpenVINO engine cannot run Paddle's quantised int8 program; serve int8 exports with "
                         "--engine onednn (the default)")
    return engine


def default_trt_cache_dir(version_dir: Path) -> Path:
    """Where TensorRT engines are cached when no directory is given (Paddle's own default too). Absolute: the
    PIR-TensorRT program records its engine files by path, and a worker's working directory may differ."""
    return Path(version_dir).absolute() / "_opt_cache"


def plan_config(
    version_dir: Path,
    manifest: Manifest,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int = 2,
    max_batch_size: int = 8,
    trt_cache_dir: Path | None = None,
    gpu_id: int = 0,
    engine: str = "paddle",
    gpu_memory_mb: int = 256,
    simulated_cost_ms: tuple[float, float] = (0.0, 0.0),
) -> Plan:
    """The ordered Config calls for this model and device; raises ValueError for unsupported combinations.

    Raising here (not at predictor creation) lets the front process reject a bad configuration before it
    spawns any worker.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if engine == SIMULATED:  # no Config at all: the worker sleeps instead (simulated_engine.py)
        if device != "cpu":
            raise ValueError("the simulated engine runs on --device cpu (it stands for any device)")
        if min(simulated_cost_ms) < 0:
            raise ValueError(f"simulated_cost_ms must be >= 0, got {simulated_cost_ms}")
        return []
    pir = is_pir(manifest)
    if device == "gpu" and (precision == "int8" or manifest.precision == "int8"):
        raise ValueError("int8 runs on CPU only: int8 exports are oneDNN programs that no GPU engine runs; "
                         "serve them with --device cpu, or serve an fp32 export on GPU with --precision fp16")
    if precision == "int8" and pir:
        raise ValueError("int8 needs a legacy .pdmodel export (quantisation through PIR fails); "
                         f"{manifest.model_file} is PIR")
    if engine == "openvino":
        if device != "cpu":
            raise ValueError("the OpenVINO engine runs on CPU only")
        if pir:
            raise ValueError("the OpenVINO engine needs a legacy .pdmodel export; "
                             f"{manifest.model_file} is PIR")
    if engine == "onednn" and device != "cpu":
        raise ValueError("the oneDNN engine runs on CPU only")
    if engine in GPU_ENGINES and device != "gpu":
        raise ValueError(f"the {engine} engine runs on GPU only (--device gpu)")
    cache = Path(trt_cache_dir).absolute() if trt_cache_dir is not None else default_trt_cache_dir(version_dir)
    if device == "cpu":
        if precision == "fp16":
            raise ValueError("fp16 is a GPU precision: Paddle has no CPU fp16 conv kernel")
        return _plan_cpu(pir, precision, threads, engine, cache)
    if engine == "cuda":
        return _plan_gpu_cuda(pir, precision, gpu_id, gpu_memory_mb)
    return _plan_gpu(version_dir, manifest, pir, precision, max_batch_size, cache, gpu_id, gpu_memory_mb)


@dataclass(frozen=True)
class PredictorSettings:
    """How a predictor is asked to run, as plain picklable data; ``plan`` turns it into Config calls.

    The engine front computes the plan from these once and sends both to its workers; export verification, INT8
    calibration and the benchmarks build their predictors from the same settings (resnet_serve.server.predictor).
    ``gpu_id`` stays 0 for a worker given its own GPU: CUDA_VISIBLE_DEVICES makes that GPU device 0
    (trt_cache.select_gpu).
    """

    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 2
    max_batch_size: int = 8
    trt_cache_dir: Path | None = None
    engine: str = "paddle"
    gpu_id: int = 0
    gpu_memory_mb: int = 256
    simulated_cost_ms: tuple[float, float] = (0.0, 0.0)  # engine "simulated" only: (a, c), a + c*b ms per batch

    def plan(self, version_dir: Path, manifest: Manifest) -> Plan:
        """``plan_config`` with these settings; raises ValueError for unsupported combinations."""
        return plan_config(Path(version_dir), manifest, **asdict(self))


def _plan_cpu(pir: bool, precision: str, threads: int, engine: str, cache: Path) -> Plan:
    plan: Plan = [("disable_glog_info", ())]
    if engine == "openvino":
        # OpenVINO takes over the whole graph; oneDNN passes would only rewrite ops it then replaces.
        plan.append(("set_cpu_math_library_num_threads", (threads,)))
        plan.append(("enable_openvino_engine", (_OPENVINO_PRECISION[precision],)))
        # OpenVINO caches compiled models (~100 MB for ResNet-50) in ./__cache__ of whatever directory the server
        # runs in, unless given a directory: the same one TensorRT uses (--trt-cache-dir, else <version>/_opt_cache).
        plan.append(("set_optim_cache_dir", (str(cache),)))
    else:
        plan.append(("enable_mkldnn", ()))  # default in 3.x, said explicitly: 0.4-0.6x speed without it
        if precision == "int8":
            plan.append(("enable_mkldnn_int8", ()))  # without it a quantised model runs ~5x slower
        plan.append(("set_cpu_math_library_num_threads", (threads,)))
    plan.append(("switch_ir_optim", (True,)))
    if not pir:
        plan.append(("enable_memory_optim", (True,)))  # fails create_predictor for .json; fine for .pdmodel
    return plan


# Inputs and outputs stay float32 whatever the compute precision (PaddleX static_infer.py does the same), so the
# worker's shared float32 buffer and the logits it returns never change type.
FP32_FEED_FETCH = ("exp_disable_mixed_precision_ops", ({"feed", "fetch"},))


def _plan_gpu_cuda(pir: bool, precision: str, gpu_id: int, gpu_memory_mb: int) -> Plan:
    """Paddle's own GPU kernels; fp16 is PaddleX's ``paddle_fp16`` run mode."""
    plan: Plan = [
        FP32_FEED_FETCH,
        ("disable_mkldnn", ()),
        ("enable_use_gpu", (gpu_memory_mb, gpu_id, _TRT_PRECISION[precision])),
        ("disable_glog_info", ()),
        ("switch_ir_optim", (True,)),
    ]
    if not pir:
        plan.append(("enable_memory_optim", (True,)))
    return plan


def _plan_gpu(version_dir: Path, manifest: Manifest, pir: bool, precision: str, max_batch_size: int,
              cache: Path, gpu_id: int, gpu_memory_mb: int) -> Plan:
    name = manifest.input_name
    lo, hi = input_shape(manifest, 1), input_shape(manifest, max_batch_size)
    if pir:
        step = pir_trt_step(version_dir, manifest, precision, max_batch_size, cache)
        return [
            (PIR_TRT_CONVERT, (step,)),  # offline conversion first; the Config then loads its output
            FP32_FEED_FETCH,
            ("enable_use_gpu", (gpu_memory_mb, gpu_id)),  # no enable_tensorrt_engine: the program holds the engines
            ("disable_glog_info", ()),
            ("switch_ir_optim", (True,)),
        ]
    return [
        FP32_FEED_FETCH,
        ("enable_use_gpu", (gpu_memory_mb, gpu_id)),  # must precede enable_tensorrt_engine
        ("disable_glog_info", ()),
        ("switch_ir_optim", (True,)),
        ("enable_memory_optim", (True,)),
        # Positional, in the 3.3.1 signature order: workspace_size, max_batch_size, min_subgraph_size,
        # precision_mode, use_static, use_calib_mode. max_batch_size is ignored with dynamic shapes;
        # use_calib_mode=False: no TensorRT calibration (int8 never reaches a GPU plan).
        ("enable_tensorrt_engine", (TRT_WORKSPACE_BYTES, max_batch_size, TRT_MIN_SUBGRAPH,
                                    _TRT_PRECISION[precision], True, False)),
        ("set_trt_dynamic_shape_info", ({name: lo}, {name: hi}, {name: hi})),  # min, max, opt
        ("set_optim_cache_dir", (str(cache),)),  # use_static=True serialises engines here for reuse
    ]


def input_shape(manifest: Manifest, batch: int) -> list[int]:
    """The program's input shape for ``batch`` rows: uint8 [n, H, W, 3] pixels or float32 [n, 3, H, W] model input,
    as the manifest's input_format says (TensorRT's dynamic shapes name it)."""
    h, w = (int(x) for x in manifest.input_size)
    return [batch, h, w, 3] if manifest.takes_pixels else [batch, 3, h, w]


def pir_trt_step(version_dir: Path, manifest: Manifest, precision: str, max_batch_size: int,
                 cache: Path) -> dict[str, Any]:
    """Arguments of the PIR-TensorRT conversion, as plain data (server/resnet_serve/server/trt_cache.py performs it).

    ``model_prefix`` is the model path WITHOUT ``.json``: ``convert`` hands it to
    ``paddle.static.io.load_inference_model``, which appends ``.json`` itself (given ``inference.json`` it reads
    ``inference.json.json`` and fails with "json parse error"; PaddleX passes ``model_file.with_suffix("")``).
    ``save_model_dir`` is a path prefix too: Paddle writes ``<prefix>.json``/``.pdiparams`` and the engines into
    the directory ``<prefix>/``, recording their absolute paths in the program. ``cache`` is the keyed cache
    directory (trt_cache.cache_key), so settings, GPUs and versions never share one.
    """
    prefix = Path(cache).absolute() / "inference"
    return {
        "model_prefix": str((Path(version_dir) / manifest.model_file).absolute().with_suffix("")),
        "inputs": [{
            "name": manifest.input_name,
            "min_input_shape": input_shape(manifest, 1),
            "optim_input_shape": input_shape(manifest, max_batch_size),
            "max_input_shape": input_shape(manifest, max_batch_size),
            "input_data_type": "uint8" if manifest.takes_pixels else "float32",
        }],
        "precision_mode": _PIR_TRT_PRECISION[precision],
        "workspace_size": TRT_WORKSPACE_BYTES,
        "min_subgraph_size": TRT_MIN_SUBGRAPH,
        "save_model_dir": str(prefix),
    }


def model_files(version_dir: Path, manifest: Manifest, plan: Plan) -> tuple[str, str]:
    """The (model, params) files the Config must load: the PIR-TensorRT output when the plan converts."""
    for name, args in plan:
        if name == PIR_TRT_CONVERT:
            prefix = args[0]["save_model_dir"]
            return prefix + ".json", prefix + ".pdiparams"
    return str(Path(version_dir) / manifest.model_file), str(Path(version_dir) / manifest.params_file)


def config_steps(plan: Plan) -> Plan:
    """Only the steps that are Config method calls (worker steps like PIR_TRT_CONVERT contain a dot)."""
    return [(name, args) for name, args in plan if "." not in name]


def _resolve(arg: Any, precision_type: Any) -> Any:
    if isinstance(arg, Precision):
        return getattr(precision_type, arg.name)
    return arg


def apply_plan(config: Any, plan: Iterable[tuple[str, tuple]], precision_type: Any = None) -> None:
    """Call the plan's Config methods, in order, on ``config`` (a real paddle.inference.Config or a fake).

    ``precision_type`` resolves ``Precision`` markers; by default ``paddle.inference.PrecisionType`` (imported
    only when a marker is present, so fakes need no Paddle).
    """
    steps = config_steps(list(plan))
    if precision_type is None and any(isinstance(a, Precision) for _, args in steps for a in args):
        from paddle.inference import PrecisionType

        precision_type = PrecisionType
    for name, args in steps:
        getattr(config, name)(*(_resolve(a, precision_type) for a in args))


def check_normalise(normalise: str) -> None:
    """ValueError unless ``normalise`` is one of NORMALISE (Settings checks it at start, program_served at load)."""
    if normalise not in NORMALISE:
        raise ValueError(f"normalise must be {', '.join(NORMALISE)}, not {normalise!r}")


def program_served(manifest: Manifest, device: str, engine: str, normalise: str = "auto") -> Manifest:
    """The program of the export the workers run, as a manifest (docs/architecture.md, "Where normalisation
    happens"). ``graph``: the pixel program, which normalises uint8 pixels itself; ``worker``: the float program,
    the worker normalising pixels in numpy (an older float export has nothing else). ``auto``: the worker on CPU,
    where numpy's one pass costs a fraction of the graph's operators (bench `normalisation`); the graph on GPU,
    which then receives a quarter of the bytes and does the work, with the simulated engine, which stands for
    a GPU, and with OpenVINO, which cannot load a float program. Raises ValueError when the export has no such
    program or the engine cannot run it."""
    check_normalise(normalise)
    if normalise == "auto":
        worker = device == "cpu" and engine not in (SIMULATED, "openvino") and bool(manifest.float_model_file)
        normalise = "worker" if worker or not manifest.takes_pixels else "graph"
    if normalise == "graph":
        if not manifest.takes_pixels:
            raise ValueError(f"--normalise graph: {manifest.name} v{manifest.version} takes float input (an "
                             "export older than its input stage); serve it with --normalise auto or worker")
        return manifest
    if manifest.takes_pixels and not manifest.float_model_file:
        raise ValueError(f"--normalise worker: {manifest.name} v{manifest.version} has no float program "
                         "(float_model_file); serve it with --normalise auto or graph")
    if manifest.takes_pixels and engine == "openvino":  # its Paddle frontend wants <program>.pdiparams
        raise ValueError("--normalise worker: the OpenVINO engine cannot load an export's float program (it shares "
                         "the pixel program's parameters file); serve it with --normalise auto or graph")
    return manifest.float_program()
