"""Checkpoint -> versioned, verified Paddle Inference model directory (docs/architecture.md).

Everything is written into a hidden temporary folder beside the target and renamed into place only after the
predictor has been verified, so a failed export never leaves a half-written version behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import filecmp
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import paddle

from resnet_serve.common import __version__
from resnet_serve.common.imaging import IMAGENET_MEAN, IMAGENET_STD, normalise
from resnet_serve.common.modeldir import (
    LABELS,
    MANIFEST,
    UINT8_NHWC,
    Manifest,
    list_versions,
    load_manifest,
    read_labels,
    sha256_file,
    version_of,
)
from resnet_serve.train import checkpoint as ckpt
from resnet_serve.train.models import build_model

from . import quantize, verify
from .checkpoint_reader import check_against, read_weights
from .pixels import FloatInput, PixelInput, float_spec, pixel_spec
from .quantize import CALIBRATION_SAMPLES, INT8_THRESHOLD

log = logging.getLogger(__name__)
FORMATS = ("pir", "legacy")


class ExportError(ValueError):
    pass


@dataclass
class ExportOptions:
    checkpoint: Path
    out: Path  # models/<name> (next version) or models/<name>/<version>
    name: str | None = None
    arch: str | None = None  # overrides the checkpoint metadata
    num_classes: int | None = None
    input_size: int | None = None
    format: str = "pir"
    precision: str = "fp32"
    use_master_weights: bool = True
    force: bool = False
    rtol: float = verify.DEFAULT_RTOL
    calibration: str | None = None  # int8: 'digits' (its training split) or a folder of images
    calibration_samples: int = CALIBRATION_SAMPLES
    eval_dir: Path | None = None  # int8: labelled held-out images (<label>/*); default: the checkpoint's hold-out
    threshold: float = INT8_THRESHOLD


def _is_version(name: str) -> bool:
    return name.isascii() and name.isdigit()


def target_dir(out: Path) -> Path:
    """models/<name>/<N> as given, or models/<name> -> the next free version number."""
    out = Path(out)
    if _is_version(out.name):
        if version_of(out.name) is None:
            raise ExportError(f"version folder {out} must be a positive number without leading zeros (the server "
                              f"looks for models/<name>/<N> by its number)")
        return out
    return out / str((list_versions(out) or [0])[-1] + 1)


@contextlib.contextmanager
def claim_version(out: Path, force: bool) -> Iterator[Path]:
    """The version folder this export writes, with models/<name>/.export.lock held until it is in place: two
    exports at once into one model folder never pick the same version nor replace each other's."""
    model_dir = Path(out) if not _is_version(Path(out).name) else Path(out).parent
    if model_dir.exists() and not model_dir.is_dir():
        raise ExportError(f"{model_dir} is a file, not a model folder: choose another --out")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(model_dir / ".export.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ExportError(f"cannot write the model folder {model_dir}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another resnet-export writing to %s", model_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in [*model_dir.glob(".tmp-*"), *model_dir.glob(".old-*")]:  # a killed export's; none runs now
            log.info("removing %s, left by an interrupted export", stale)
            shutil.rmtree(stale, ignore_errors=True)
        final = target_dir(out)
        if final.exists() and not force:
            raise ExportError(f"output {final} already exists (use --force to replace it)")
        yield final
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished version folder into place. A replaced version (--force) is first renamed aside to a hidden
    name, so the server never sees a half-deleted version folder."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _pir_enabled() -> bool:
    return os.environ.get("FLAGS_enable_pir_api", "1").lower() not in ("0", "false")


def export(opts: ExportOptions) -> Path:
    """Export, verify, write the manifest; returns the version folder."""
    if opts.format not in FORMATS:
        raise ExportError(f"unknown format {opts.format!r}; choose pir or legacy")
    if opts.precision == "int8":
        return export_int8(opts)
    if opts.precision != "fp32":
        raise ExportError(f"precision {opts.precision!r} is not available on this target: CPU Paddle has no fp16 "
                          "conv kernels; export fp32 and serve it with --device gpu --precision fp16 (TensorRT)")
    if (opts.format == "legacy") == _pir_enabled():
        raise ExportError("the legacy format needs FLAGS_enable_pir_api=0 set before Paddle is imported: "
                          "run it through `resnet-export --format legacy`")
    prefix = ckpt.resolve(opts.checkpoint)
    meta = ckpt.read_meta(prefix)
    arch = opts.arch or meta.get("arch")
    num_classes = opts.num_classes or meta.get("num_classes")
    size = opts.input_size or (meta.get("input_size") or [None])[0]
    missing = [n for n, v in (("--arch", arch), ("--num-classes", num_classes), ("--input-size", size)) if not v]
    if missing:
        raise ExportError(f"checkpoint {prefix} has no metadata JSON: pass {', '.join(missing)}")
    with claim_version(opts.out, opts.force) as final:
        return _export(opts, prefix, meta, arch, int(num_classes), int(size), final)


def _export(opts: ExportOptions, prefix: Path, meta: dict, arch: str, num_classes: int, size: int,
            final: Path) -> Path:
    model = build_model(arch, num_classes)
    weights = read_weights(prefix, opts.use_master_weights)
    check_against(model, weights.state, arch)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights.state.items()})
    model.eval()
    log.info("checkpoint %s: layout %s, %d tensors from fp32 master weights", prefix, weights.layout,
             weights.master_weights_used)

    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        manifest = _write(model, tmp, opts, meta, prefix, arch, num_classes, size, weights, final)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s v%d to %s (max|diff| %.3g, top-1 agreement %.0f%%)", manifest.name, manifest.version,
             final, manifest.verification["max_abs_diff"], 100 * manifest.verification["top1_agreement"])
    return final


def _write(model, tmp: Path, opts: ExportOptions, meta: dict, prefix: Path, arch: str, num_classes: int,
           size: int, weights, final: Path) -> Manifest:
    mean, std = list(meta.get("mean", IMAGENET_MEAN)), list(meta.get("std", IMAGENET_STD))
    model_file, float_model_file = save_programs(model, tmp, size, mean, std, opts.format)

    manifest = Manifest(
        name=opts.name or final.parent.name, version=int(final.name), architecture=arch, num_classes=num_classes,
        input_size=[size, size], mean=mean, std=std, input_format=UINT8_NHWC, float_model_file=float_model_file,
        precision=opts.precision, format=opts.format, model_file=model_file,
        source_checkpoint={"path": str(prefix.with_suffix(ckpt.PARAMS)),
                           "sha256": sha256_file(prefix.with_suffix(ckpt.PARAMS)),
                           "layout": weights.layout, "master_weights_used": weights.master_weights_used,
                           "epoch": meta.get("epoch"), "eval_accuracy": meta.get("eval_accuracy"),
                           "amp": meta.get("amp")},
        exporter_version=f"resnet-serve {__version__}, paddle {paddle.__version__}",
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    # Verified with the server's own predictor, built from this manifest as a server worker would build it: the
    # pixel program on uint8 pixels, the float program on those pixels normalised in numpy, both against the
    # trained network fed the numpy-normalised pixels (the server's normalisation before it moved into the graph).
    pixels = verify.fixed_pixels([size, size])
    reference = verify.dygraph_logits(model, pixels, mean, std)
    from_pixels, from_floats = verify.predictor_logits(tmp, manifest, pixels, normalise(pixels, mean, std))
    figures = verify.compare(reference, from_pixels, opts.rtol)
    figures["float_program"] = verify.compare(reference, from_floats, opts.rtol)
    for what, f in (("predictor", figures), ("float program", figures["float_program"])):
        if not f["passed"]:
            raise ExportError(f"verification failed: max|dygraph - {what}| = {f['max_abs_diff']:.3g} "
                              f"(tolerance {f['tolerance']:.3g}), top-1 agreement {100 * f['top1_agreement']:.1f}%")
    manifest.verification = figures

    labels = list(meta.get("labels") or [str(i) for i in range(num_classes)])
    if len(labels) != num_classes:
        raise ExportError(f"checkpoint metadata has {len(labels)} labels for {num_classes} classes")
    (tmp / LABELS).write_text("\n".join(labels) + "\n")
    manifest.files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "manifest.json").write_text(manifest.to_json())
    return manifest


def save_programs(model: paddle.nn.Layer, tmp: Path, size: int, mean: list[float], std: list[float],
                  fmt: str) -> tuple[str, str]:
    """Write the pixel program (uint8 NHWC in, normalised in the graph: resnet_serve.export.pixels) and the float
    program (float32 NCHW model input) over one parameters file; returns their file names.

    Both are saved from the same parameter tensors, so Paddle writes the same ``.pdiparams`` twice: the second copy
    is checked byte for byte and removed, and the float program is loaded with the first (tests check that both
    programs load it and agree)."""
    suffix = ".json" if fmt == "pir" else ".pdmodel"
    for prefix, layer, spec in (("inference", PixelInput(model, mean, std), pixel_spec(size)),
                                ("inference_float", FloatInput(model), float_spec(size))):
        paddle.jit.save(paddle.jit.to_static(layer, input_spec=spec, full_graph=True), str(tmp / prefix))
        if not (tmp / (prefix + suffix)).is_file():
            raise ExportError(f"paddle.jit.save did not write {prefix + suffix} (format {fmt})")
    params, float_params = tmp / "inference.pdiparams", tmp / "inference_float.pdiparams"
    if not filecmp.cmp(params, float_params, shallow=False):
        raise ExportError("the float program's parameters differ from the pixel program's: they cannot share "
                          f"{params.name}")
    for extra in (float_params, tmp / "inference_float.pdiparams.info"):
        extra.unlink(missing_ok=True)
    return "inference" + suffix, "inference_float" + suffix


def export_int8(opts: ExportOptions) -> Path:
    """``resnet-export --precision int8``: fp32 legacy export into a temporary folder, quantise and gate it
    (resnet_serve.export.quantize), then rename the int8 version into place (nothing is left behind on failure)."""
    if _pir_enabled():
        raise ExportError("int8 needs the legacy program: FLAGS_enable_pir_api=0 set before Paddle is imported; "
                          "run it through `resnet-export --precision int8`")
    if not opts.calibration:
        raise ExportError("--precision int8 needs --calibration: 'digits' or a folder of representative images")
    if not 0.0 < opts.threshold <= 1.0:
        raise ExportError(f"--threshold must be in (0, 1], got {opts.threshold}")
    meta = ckpt.read_meta(ckpt.resolve(opts.checkpoint))
    with claim_version(opts.out, opts.force) as final:
        try:
            return _export_int8(opts, meta, final)
        except quantize.QuantizeError as e:
            raise ExportError(str(e)) from e


def _export_int8(opts: ExportOptions, meta: dict, final: Path) -> Path:
    work = final.parent / f".tmp-{final.name}-{os.getpid()}-int8"
    shutil.rmtree(work, ignore_errors=True)
    try:
        fp32_dir = export(replace(opts, precision="fp32", format="legacy", out=work / "fp32" / "1", force=True,
                                  name=opts.name or final.parent.name))
        fp32_manifest = load_manifest(fp32_dir)
        size = int(fp32_manifest.input_size[0])
        calib = quantize.calibration_images(opts.calibration, size, meta, opts.calibration_samples)
        evaluation = quantize.evaluation_images(meta, size, read_labels(fp32_dir, fp32_manifest), opts.eval_dir)
        tmp = work / "int8"
        m = quantize.write_int8(fp32_dir, tmp, fp32_manifest, calib, evaluation, opts.threshold, opts.force)
        m.version = int(final.name)
        m.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        m.files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(m.to_json())
        publish(tmp, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
