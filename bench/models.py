"""Models for `make bench`: ResNet-50 at 224x224 with random weights (speed does not depend on the weights)
and 'null-sampled', a model whose compute is negligible (it reads every 8th row and column of the pixels it is
fed: no normalisation, which a GPU engine does on the GPU), to measure what the serving path itself costs; plus the
legacy-format ResNet-50 (OpenVINO needs it) and its INT8 quantisation. The INT8 one is calibrated on digits images
upscaled to 224: with random weights its accuracy means nothing, but its speed is that of any ResNet-50 INT8."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The null model's architecture as its manifest states it: a folder exported by an older bench/null_model.py (which
# cast every pixel before sampling: ~300 us of worker CPU per image) says otherwise and is exported again.
NULL_ARCH = "null (every 8th row and column sampled, then cast; mean, linear)"
EXPORT = """
import os
import sys
from pathlib import Path
import paddle
from resnet_serve.common.modeldir import Manifest, sha256_file
kind, out, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
paddle.seed(0)
d = out / "1"
d.mkdir(parents=True, exist_ok=True)
mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
if kind == "null-sampled":  # bench/null_model.py: two programs over one Linear, so one parameters file
    from bench.models import NULL_ARCH
    from bench.null_model import Sampled
    from resnet_serve.export.pixels import float_spec, pixel_spec
    fc = paddle.nn.Linear(3, 1000)
    arch = NULL_ARCH
    for prefix, pixels, spec in (("inference", True, pixel_spec(size)), ("inference_float", False, float_spec(size))):
        paddle.jit.save(paddle.jit.to_static(Sampled(fc, pixels), input_spec=spec, full_graph=True), str(d / prefix))
    for extra in ("inference_float.pdiparams", "inference_float.pdiparams.info"):
        (d / extra).unlink(missing_ok=True)
    model_file, fmt = "inference.json", "pir"
    extra = dict(input_format="uint8_nhwc", float_model_file="inference_float.json")
else:
    from paddle.vision.models import resnet50
    model, arch = resnet50(num_classes=1000).eval(), kind
    if os.environ.get("FLAGS_enable_pir_api", "1").lower() not in ("0", "false"):
        # as resnet-export writes it: uint8 NHWC in, normalised in the graph, plus the float program
        from resnet_serve.export.exporter import save_programs
        model_file, float_model_file = save_programs(model, d, size, mean, std, "pir")
        fmt, extra = "pir", dict(input_format="uint8_nhwc", float_model_file=float_model_file)
    else:  # legacy (OpenVINO, INT8): float32 NCHW in, normalised by the worker
        spec = [paddle.static.InputSpec([None, 3, size, size], "float32", "image")]
        paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), str(d / "inference"))
        model_file, fmt, extra = "inference.pdmodel", "legacy", dict(input_format="float32_nchw")
(d / "labels.txt").write_text("\\n".join(f"class_{i}" for i in range(1000)) + "\\n")
m = Manifest(name=kind, version=1, architecture=arch, num_classes=1000, input_size=[size, size], mean=mean, std=std,
             format=fmt, model_file=model_file, **extra)
m.files = {p.name: sha256_file(p) for p in d.iterdir()}
(d / "manifest.json").write_text(m.to_json())
"""


QUANTIZE = """
import sys
from pathlib import Path
from resnet_serve.export.quantize import quantize_model
from resnet_serve.common.modeldir import load_manifest, sha256_file
from resnet_serve.train.data import load_digits
src, out, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
train, _ = load_digits(size)
m = load_manifest(src)
d = out / "1"
figures = quantize_model(src, d, train.images[:64], m.mean, m.std)
(d / "labels.txt").write_text((src / "labels.txt").read_text())
m.name, m.precision, m.engine, m.verification = "resnet50-int8", "int8", "onednn", {"calibration": {
    "source": "digits training split, first 64 images upscaled (random weights: for speed only)", **figures}}
m.files = {p.name: sha256_file(p) for p in d.iterdir()}
(d / "manifest.json").write_text(m.to_json())
"""


def ensure_int8_model(root: Path, size: int = 224) -> Path:
    """models/resnet50-int8/1: the legacy ResNet-50 after post-training quantisation (resnet_serve.export.quantize)."""
    src = ensure_model("resnet50", root, size, legacy=True)
    out = root / "resnet50-int8"
    if not (out / "1" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-c", QUANTIZE, str(src / "1"), str(out), str(size)], check=True,
                       env={**os.environ, "FLAGS_enable_pir_api": "0"}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return out


def ensure_model(kind: str, root: Path, size: int = 224, legacy: bool = False) -> Path:
    """models/<kind>-pixels/1 (uint8 NHWC input, normalised in the graph, as resnet-export writes it) or
    models/<kind>-legacy/1 (float32 input) under root, exported once and reused. The folder is the model's
    repository; the model's name (manifest) is <kind>."""
    out = root / (kind + ("-legacy" if legacy else "-pixels"))
    manifest = out / "1" / "manifest.json"
    if kind == "null-sampled" and manifest.is_file() and json.loads(manifest.read_text()).get("architecture") != \
            NULL_ARCH:
        shutil.rmtree(out / "1")
    if not manifest.is_file():
        env = {**os.environ, **({"FLAGS_enable_pir_api": "0"} if legacy else {})}
        subprocess.run([sys.executable, "-c", EXPORT, kind, str(out), str(size)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)  # cwd: imports bench
    return out
