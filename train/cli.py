"""`resnet-train`: train a ResNet with the AMP recipe and write checkpoints every epoch."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from resnet_serve.cli_util import DefaultsFormatter, add_verbose_flag, fail, quiet_frameworks, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="resnet-train", description=__doc__, formatter_class=DefaultsFormatter)
    p.add_argument("--arch", default="resnet18", help="resnet18|34|50|101|152")
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's handwritten digits, embedded) or an image folder "
                        "with one subfolder per class")
    p.add_argument("--input-size", type=int, default=32, help="square input side in pixels")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=64, help="images per training step")
    p.add_argument("--lr", type=float, default=0.05, help="initial learning rate (SGD momentum 0.9, cosine decay to 0)")
    p.add_argument("--amp", default="O1", choices=["O0", "O1", "O2"],
                   help="mixed precision level on GPU (CPU always trains fp32)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--out", type=Path, default=Path("checkpoints/digits"), help="checkpoint folder")
    p.add_argument("--resume", type=Path, help="continue from a checkpoint (file, prefix or folder)")
    p.add_argument("--init", type=Path, help="start from these weights (.pdparams); head replaced if classes differ")
    p.add_argument("--profile", action="store_true", help="print a Paddle profiler summary of a few steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split, the weights and the shuffling")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of images held out for evaluation")
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--write-holdout", type=Path, metavar="DIR",
                   help="write the held-out images as PNG files under DIR/<class>/ and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    add_verbose_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_frameworks(args.verbose)  # before `import paddle`
    setup_logging()
    from .data import DatasetError, load_dataset, write_images
    from .models import UnknownArchitecture
    from .trainer import TrainConfig, train

    try:
        if args.write_holdout:
            _, holdout = load_dataset(args.data, args.input_size, args.holdout, args.seed)
            n = write_images(holdout, args.write_holdout)
            logging.info("wrote %d held-out images under %s", n, args.write_holdout)
            return 0
        cfg = TrainConfig(arch=args.arch, data=args.data, input_size=args.input_size, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, amp=args.amp, num_workers=args.num_workers,
                          out=args.out, resume=args.resume, init=args.init, profile=args.profile,
                          seed=args.seed, holdout=args.holdout, max_steps_per_epoch=args.max_steps_per_epoch,
                          progress=not args.no_progress and sys.stderr.isatty())
        last = train(cfg)
    except (DatasetError, UnknownArchitecture, ValueError, FileNotFoundError) as e:
        return fail(str(e))
    print(last.with_suffix(".pdparams"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
