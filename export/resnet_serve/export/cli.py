"""`resnet-export`: a training checkpoint -> a verified, versioned Paddle Inference model directory."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from resnet_serve.common.cli import (
    EXIT_INTERRUPTED,
    DefaultsFormatter,
    add_verbose_flag,
    fail,
    quiet_frameworks,
    setup_logging,
)
from resnet_serve.common.modeldir import version_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="resnet-export", description=__doc__, formatter_class=DefaultsFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint: a .pdparams file, its prefix, or a folder (latest epoch)")
    p.add_argument("--out", type=Path, required=True,
                   help="models/<name>/<version>, or models/<name> for the next free version")
    p.add_argument("--name", help="model name in the manifest (default: the folder name)")
    p.add_argument("--arch", help="override the checkpoint metadata's architecture")
    p.add_argument("--num-classes", type=int, help="override the class count")
    p.add_argument("--input-size", type=int,
                   help="override the square input side; refused unless --force when it differs from training's")
    p.add_argument("--format", choices=["pir", "legacy"], default="pir",
                   help="pir: inference.json; legacy: inference.pdmodel (INT8, OpenVINO, classic TRT)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="fp32, or int8 (oneDNN VNNI; legacy format, needs --calibration; gated on top-1 agreement "
                        "with fp32). fp16 runs through TensorRT at serve time")
    p.add_argument("--calibration", metavar="digits|DIR",
                   help="int8: calibration images: 'digits' (its training split) or a folder of images")
    p.add_argument("--calibration-samples", type=int, default=256, help="int8: calibration images used")
    p.add_argument("--eval", dest="eval_dir", type=Path, metavar="DIR",
                   help="int8: labelled held-out images in DIR/<label>/ (default: the checkpoint's held-out split)")
    p.add_argument("--threshold", type=float, default=0.99,
                   help="int8: minimum top-1 agreement with fp32 on the held-out images")
    p.add_argument("--no-master-weights", action="store_true",
                   help="AMP-O2: ignore the fp32 master weights in .pdopt and cast the fp16 weights")
    p.add_argument("--rtol", type=float, default=1e-3, help="verification bound, relative to max |logit|")
    p.add_argument("--force", action="store_true",
                   help="replace an existing version folder; int8: write it even if under --threshold; export at an "
                        "--input-size other than the training one")
    add_verbose_flag(p)
    return p.parse_args(argv)


def out_problem(out: Path) -> str | None:
    """What is wrong with --out, checked before Paddle starts (the exporter checks again under its lock)."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a model folder: choose another --out"
    if out.name.isascii() and out.name.isdigit() and version_of(out.name) is None:
        return (f"version folder {out} must be a positive number without leading zeros (the server looks for "
                "models/<name>/<N> by its number)")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_frameworks(args.verbose)  # before `import paddle`
    if args.precision == "int8":
        args.format = "legacy"  # INT8 works only through the legacy program
    if args.format == "legacy":
        os.environ["FLAGS_enable_pir_api"] = "0"  # must precede `import paddle`
    setup_logging()
    for path in (args.checkpoint,):
        if not path.exists() and not path.with_suffix(".pdparams").exists():
            return fail(f"checkpoint {path} does not exist")
    if problem := out_problem(args.out):
        return fail(problem)
    from resnet_serve.train.checkpoint import CheckpointError, read_meta, resolve

    if args.input_size is not None and not args.force:
        try:
            trained = (read_meta(resolve(args.checkpoint)).get("input_size") or [None])[0]
        except CheckpointError as e:
            return fail(str(e))
        if trained is not None and args.input_size != trained:
            return fail(f"--input-size {args.input_size} differs from the {trained}x{trained} the checkpoint was "
                        "trained at (the model would see differently scaled images); add --force to export anyway")
    from resnet_serve.train.models import UnknownArchitecture

    from .checkpoint_reader import CheckpointReadError
    from .exporter import ExportError, ExportOptions, export

    opts = ExportOptions(checkpoint=args.checkpoint, out=args.out, name=args.name, arch=args.arch,
                         num_classes=args.num_classes, input_size=args.input_size, format=args.format,
                         precision=args.precision, use_master_weights=not args.no_master_weights,
                         force=args.force, rtol=args.rtol, calibration=args.calibration,
                         calibration_samples=args.calibration_samples, eval_dir=args.eval_dir,
                         threshold=args.threshold)
    try:
        out = export(opts)
    except (ExportError, CheckpointError, CheckpointReadError, UnknownArchitecture) as e:
        return fail(str(e))
    except KeyboardInterrupt:  # the exporter removes its hidden work folder on the way out
        return fail("interrupted: no version was published", EXIT_INTERRUPTED)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
