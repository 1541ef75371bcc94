"""INT8 export: post-training quantisation of a legacy fp32 export, gated on top-1 agreement with fp32.

Steps (docs/paddle.md, "INT8 on CPU"; resnet_serve.export.exporter runs them for ``--precision int8``): export
fp32 legacy (``FLAGS_enable_pir_api=0``) into a temporary folder; calibrate
``paddle.static.quantization.PostTrainingQuantization`` on real images (``onnx_format=True``,
``deploy_backend=None``: ``'MKLDNN'`` crashes in 3.3.1); widen the ranges of the residual stream (below); then run
fp32 and int8 predictors, built exactly as a server worker builds them (resnet_serve.server.predictor), on held-out
labelled images and refuse the export when their top-1 agreement falls under the threshold.

Residual stream: with ``enable_mkldnn_int8`` Paddle 3.3.1 fuses ``conv + elementwise_add (residual) + relu`` and
then saturates that op's output at half of the range calibrated for it (measured: on the digits ResNet-18 the logits
of 15-20% of images shrank to 0.5-0.8x and agreement fell to 95-98%, while the same quantised program run without
oneDNN INT8 stayed within 0.6 of fp32). Doubling the calibrated scale of every residual-add output (the ``relu``
after it) removes that: max |int8 - fp32| 25 -> 1.1, agreement 98.9% -> 100%, no speed cost.
"""

from __future__ import annotations

import filecmp
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet_serve.common.cli import framework_output
from resnet_serve.common.imaging import IMAGENET_MEAN, IMAGENET_STD, decode_file, normalise, resize_crop
from resnet_serve.common.modeldir import Manifest
from resnet_serve.server.predictor import build_predictor
from resnet_serve.server.predictor_config import PredictorSettings
from resnet_serve.train.data import DIGITS, IMAGE_SUFFIXES, held_out, load_dataset

from . import verify

log = logging.getLogger(__name__)

INT8_THRESHOLD = 0.99  # minimum top-1 agreement of int8 with fp32 on held-out images
CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 32
ALGO = "abs_max"  # best agreement of abs_max | hist | mse | avg | KL on digits (KL: 64%, avg: 75%)
RESIDUAL_RANGE_FACTOR = 2.0
EVAL_BATCH = 64


class QuantizeError(ValueError):
    """Calibration or evaluation data that cannot be used, or an int8 model that fails its gate."""


@dataclass
class Images:
    """uint8 [N, H, W, 3] images, optional int64 labels, and where they came from (for the manifest)."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str


def _folder_images(root: Path, size: int) -> list[tuple[Path, np.ndarray]]:
    """Every image under root, prepared exactly as the server prepares it (the one decoder, the serving resize)."""
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    out = []
    for f in files:
        try:
            out.append((f, resize_crop(decode_file(f, (size, size)), size, size)))
        except (OSError, SyntaxError, ValueError) as e:
            raise QuantizeError(f"cannot read image {f}: {e}") from e
    return out


def calibration_images(source: str, size: int, meta: dict[str, Any], n: int = CALIBRATION_SAMPLES,
                       seed: int = 0) -> Images:
    """'digits': a seeded sample of the digits TRAINING split (never the held-out one); else every image under a
    folder (any depth), at most n of them."""
    if source == DIGITS:
        train, _ = load_dataset(DIGITS, size, float(meta.get("holdout", 0.2)), int(meta.get("seed", 0)))
        pick = np.random.default_rng(seed).permutation(len(train.images))[:n]
        return Images(train.images[np.sort(pick)], None, f"digits training split ({len(pick)} of "
                      f"{len(train.images)} images)")
    root = Path(source)
    if not root.is_dir():
        raise QuantizeError(f"calibration source {source!r} is neither 'digits' nor a folder")
    found = _folder_images(root, size)
    if not found:
        raise QuantizeError(f"calibration folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    pick = np.sort(np.random.default_rng(seed).permutation(len(found))[:n])
    return Images(np.stack([found[i][1] for i in pick]), None, f"folder {root} ({len(pick)} of {len(found)} images)")


def evaluation_images(meta: dict[str, Any], size: int, labels: list[str], eval_dir: Path | None = None) -> Images:
    """Labelled held-out images: ``eval_dir/<label>/*`` if given, else the held-out split of the checkpoint's
    dataset (its metadata records dataset, holdout fraction and seed)."""
    if eval_dir is not None:
        eval_dir = Path(eval_dir)
        if not eval_dir.is_dir():
            raise QuantizeError(f"evaluation folder {eval_dir} does not exist")
        index = {name: i for i, name in enumerate(labels)}
        unknown = sorted(p.name for p in eval_dir.iterdir() if p.is_dir() and p.name not in index)
        if unknown:
            raise QuantizeError(f"evaluation folder {eval_dir} has class folders that are not model labels: "
                                f"{', '.join(unknown[:5])}")
        found = [(f, img) for f, img in _folder_images(eval_dir, size) if f.parent.parent == eval_dir]
        if not found:
            raise QuantizeError(f"evaluation folder {eval_dir} holds no images in <label>/ subfolders")
        return Images(np.stack([img for _, img in found]),
                      np.array([index[f.parent.name] for f, _ in found], np.int64), f"folder {eval_dir}")
    dataset = meta.get("dataset")
    if not dataset:
        raise QuantizeError("the checkpoint metadata names no dataset: pass --eval DIR (held-out images in "
                            "<label>/ subfolders)")
    try:
        held = held_out(dataset, size, float(meta.get("holdout", 0.2)), int(meta.get("seed", 0)))
    except (ValueError, OSError) as e:
        raise QuantizeError(f"cannot load the checkpoint's held-out split ({dataset}): {e}; pass --eval DIR") from e
    return Images(held.images, held.labels, f"held-out split of {dataset} (holdout {meta.get('holdout', 0.2)}, "
                  f"seed {meta.get('seed', 0)})")


def _base(name: str) -> str:
    """An activation's name without the quantise/dequantise suffixes PTQ appends."""
    return name.split(".quantized")[0]


def residual_outputs(program: Any) -> list[str]:
    """Activations leaving a residual add: the add's relu output, or the add output when no relu follows.

    A residual add sums two activations (a bias add has a persistable operand, and is not one)."""
    block = program.global_block()
    producer = {name: op for op in block.ops for name in op.output_arg_names}
    out = []
    for op in block.ops:
        if op.type != "elementwise_add":
            continue
        ins = op.input("X") + op.input("Y")
        if any(block.var(n).persistable for n in ins) or not all(n in producer for n in ins):
            continue
        add_out = op.output("Out")[0]
        relu = next((o for o in block.ops if o.type == "relu" and [_base(n) for n in o.input("X")] == [add_out]),
                    None)
        out.append(relu.output("Out")[0] if relu is not None else add_out)
    return out


# The legacy ops of the pixel program's input stage (resnet_serve.export.pixels.PixelInput), in order.
NORMALISATION_OPS = ("cast", "transpose2", "elementwise_mul", "elementwise_sub")


def normalisation_chain(block: Any, feed: str) -> list[str]:
    """The activations from the feed through the pixel program's input stage: [feed, ..., normalised model input].
    Just [feed] for a float program. Quantise/dequantise pairs that PTQ put on the way are stepped over."""
    consumers: dict[str, list[Any]] = {}
    for op in block.ops:
        for name in op.input_arg_names:
            consumers.setdefault(name, []).append(op)
    chain, var = [feed], feed
    while True:
        users = consumers.get(var, [])
        while len(users) == 1 and users[0].type in ("quantize_linear", "dequantize_linear"):
            users = consumers.get(users[0].output("Y")[0], [])
        if len(users) != 1 or users[0].type not in NORMALISATION_OPS:
            return chain
        var = users[0].output("Out")[0]
        chain.append(var)


def drop_quantisation(block: Any, names: list[str]) -> int:
    """Remove the quantise/dequantise pairs on ``names``, reconnecting their readers to the float activation.

    PTQ's export pass puts such a pair after every op it observes, the input stage's cast, transpose and multiply
    included: quantising pixels to int8 steps of 2 and more. The float model's quantisation had nothing there, and
    neither has this one (its first quantised activation is the normalised input, as before)."""
    removed = 0
    for name in names:
        for q in [op for op in block.ops if op.type == "quantize_linear" and op.input("X") == [name]]:
            quantized = q.output("Y")[0]
            for dq in [op for op in block.ops if op.type == "dequantize_linear" and op.input("X") == [quantized]]:
                dequantized = dq.output("Y")[0]
                for op in block.ops:
                    if dequantized in op.input_arg_names:
                        op._rename_input(dequantized, name)
                block._remove_op(list(block.ops).index(dq))
            block._remove_op(list(block.ops).index(q))
            removed += 1
    return removed


def quantize_model(fp32_dir: Path, out_dir: Path, calib: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   algo: str = ALGO, residual_factor: float = RESIDUAL_RANGE_FACTOR,
                   pixels_in: bool = False) -> dict[str, Any]:
    """fp32_dir/inference.pdmodel -> out_dir/inference.{pdmodel,pdiparams} (quantise-dequantise program).

    ``pixels_in``: fp32_dir holds a pixel-input export (manifest input_format uint8_nhwc): calibration feeds it
    the uint8 images as they are, and out_dir also gets ``inference_float.pdmodel``, the quantised program cut
    after its input stage, over the same parameters file. Needs FLAGS_enable_pir_api=0 set before Paddle was
    imported. Returns figures for the manifest."""
    import paddle
    from paddle.static.quantization import PostTrainingQuantization

    x = calib if pixels_in else normalise(calib, mean, std)
    batches = (len(x) + CALIBRATION_BATCH - 1) // CALIBRATION_BATCH

    def loader():
        for i in range(0, len(x), CALIBRATION_BATCH):
            yield {"image": x[i:i + CALIBRATION_BATCH]}

    out_dir = Path(out_dir)
    raw = out_dir.parent / (out_dir.name + "-ptq")
    paddle.enable_static()
    try:
        scope = paddle.static.Scope()
        exe = paddle.static.Executor(paddle.CPUPlace())
        with paddle.static.scope_guard(scope), framework_output():  # calibration's bars: only with -v
            ptq = PostTrainingQuantization(
                executor=exe, model_dir=str(fp32_dir), model_filename="inference.pdmodel",
                params_filename="inference.pdiparams", data_loader=loader, batch_nums=batches,
                batch_size=CALIBRATION_BATCH, algo=algo, onnx_format=True, deploy_backend=None)
            ptq.quantize()
            ptq.save_quantized_model(str(raw), model_filename="inference.pdmodel",
                                     params_filename="inference.pdiparams")
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            with framework_output():  # "the old way to load inference model is deprecated"
                program, feeds, fetches = paddle.static.load_inference_model(str(raw / "inference"), exe)
            widened = []
            for name in residual_outputs(program):
                var = scope.find_var(f"{name}@scale")
                if var is None:
                    continue
                t = var.get_tensor()
                t.set(np.array(t) * residual_factor, paddle.CPUPlace())
                widened.append(name)
            block = program.global_block()
            chain = normalisation_chain(block, feeds[0]) if pixels_in else [feeds[0]]
            if pixels_in and len(chain) != 1 + len(NORMALISATION_OPS):
                raise QuantizeError(f"{fp32_dir}: the program's input stage is not {' -> '.join(NORMALISATION_OPS)}"
                                    f" (found {len(chain) - 1} of its ops): cannot quantise it as a pixel program")
            dropped = drop_quantisation(block, chain[1:-1])
            out_dir.mkdir(parents=True, exist_ok=True)
            programs = [("inference", chain[0])] + ([("inference_float", chain[-1])] if pixels_in else [])
            for prefix, feed in programs:
                paddle.static.save_inference_model(str(out_dir / prefix), [block.var(feed)], fetches, exe,
                                                   program=program)
    finally:
        paddle.disable_static()
        shutil.rmtree(raw, ignore_errors=True)
    for stray in out_dir.glob("inference*.pdiparams.info"):
        stray.unlink()
    if pixels_in:
        shared, copy = out_dir / "inference.pdiparams", out_dir / "inference_float.pdiparams"
        if not filecmp.cmp(shared, copy, shallow=False):
            raise QuantizeError("the quantised float program's parameters differ from the pixel program's: they "
                                f"cannot share {shared.name}")
        copy.unlink()
    return {"algo": algo, "samples": int(len(x)), "onnx_format": True,
            "residual_range_factor": residual_factor, "residual_tensors_widened": len(widened),
            "input_stage_quantisation_dropped": dropped}


def logits(version_dir: Path, manifest: Manifest, images: np.ndarray, threads: int = 2,
           engine: str = "paddle") -> np.ndarray:
    """Logits of uint8 images [N, H, W, 3] from a predictor built as a server worker builds it (the same plan and
    the same normalisation), EVAL_BATCH at a time."""
    settings = PredictorSettings(precision=manifest.precision, threads=threads, max_batch_size=EVAL_BATCH,
                                 engine=engine)
    predictor = build_predictor(version_dir, manifest, settings)
    return np.concatenate([predictor.run(images[i:i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH)])


def float_program_figures(version_dir: Path, manifest: Manifest, images: np.ndarray, pixel_logits: np.ndarray,
                          threads: int = 2) -> dict[str, Any]:
    """How the float program of a pixel-input model agrees with its pixel program (``pixel_logits``) on the first
    EVAL_BATCH ``images`` normalised in numpy (verify.compare's figures)."""
    first = images[:EVAL_BATCH]
    settings = PredictorSettings(precision=manifest.precision, threads=threads, max_batch_size=EVAL_BATCH)
    floats = build_predictor(version_dir, manifest.float_program(), settings).run(
        normalise(first, manifest.mean, manifest.std))
    return verify.compare(pixel_logits[:len(first)], floats)


def gate(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Top-1 accuracy of both, their top-1 agreement, and the logit deviation measured on the evaluation set."""
    per_image = np.abs(fp32 - int8).max(axis=1)
    agreement = float((fp32.argmax(1) == int8.argmax(1)).mean())
    return {
        "fp32_top1": float((fp32.argmax(1) == labels).mean()),
        "int8_top1": float((int8.argmax(1) == labels).mean()),
        "top1_agreement": agreement, "n_eval": int(len(labels)), "threshold": threshold,
        # The measured tolerance: serving checks compare int8 answers with fp32 against these.
        "max_abs_diff": float(per_image.max()), "p99_abs_diff": float(np.quantile(per_image, 0.99)),
        "max_abs_reference": float(np.abs(fp32).max()),
        "passed": bool(agreement >= threshold),
    }


def write_int8(fp32_dir: Path, tmp: Path, fp32_manifest: Manifest, calib: Images, evaluation: Images,
               threshold: float, force: bool) -> Manifest:
    """Quantise fp32_dir into tmp, evaluate, gate; returns the int8 manifest (not yet written). Raises
    QuantizeError when the gate fails and force is off."""
    figures = quantize_model(fp32_dir, tmp, calib.images, fp32_manifest.mean, fp32_manifest.std,
                             pixels_in=fp32_manifest.takes_pixels)
    shutil.copy(fp32_dir / fp32_manifest.labels_file, tmp / fp32_manifest.labels_file)
    m = Manifest(**{**json.loads(fp32_manifest.to_json()), "precision": "int8", "format": "legacy",
                    "model_file": "inference.pdmodel", "engine": "onednn"})
    ref = logits(fp32_dir, fp32_manifest, evaluation.images)
    got = logits(tmp, m, evaluation.images)
    result = gate(ref, got, evaluation.labels, threshold)
    m.verification = {**result, "forced": bool(force and not result["passed"]),
                      "calibration": {"source": calib.source, **figures}, "eval_source": evaluation.source,
                      "fp32_export": fp32_manifest.verification}
    if m.takes_pixels:
        # The int8 float program is the pixel program cut after its input stage: it must compute the same.
        f = m.verification["float_program"] = float_program_figures(tmp, m, evaluation.images, got)
        if not f["passed"]:
            raise QuantizeError(f"the int8 float program differs from the int8 pixel program by "
                                f"{f['max_abs_diff']:.3g} (tolerance {f['tolerance']:.3g})")
    log.info("int8: fp32 top-1 %.4f, int8 top-1 %.4f, agreement %.4f on %d images (threshold %.4f); "
             "max |int8 - fp32| %.3g", result["fp32_top1"], result["int8_top1"], result["top1_agreement"],
             result["n_eval"], threshold, result["max_abs_diff"])
    if not result["passed"] and not force:
        raise QuantizeError(
            f"int8 top-1 agreement with fp32 is {100 * result['top1_agreement']:.2f}% on {result['n_eval']} "
            f"held-out images, under the {100 * threshold:.2f}% threshold (fp32 top-1 "
            f"{100 * result['fp32_top1']:.2f}%, int8 {100 * result['int8_top1']:.2f}%; calibration: "
            f"{calib.source}); use better calibration images, or --force to write it anyway")
    return m
