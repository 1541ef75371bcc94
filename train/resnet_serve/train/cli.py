"""`resnet-train`: train a ResNet with the AMP recipe and write checkpoints every epoch.

Every setting is checked against the data (and, on --resume, against the checkpoint) before Paddle is imported:
a mistake costs one line on stderr and exit 2, not a traceback or a silently useless model.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from resnet_serve.common.cli import add_verbose_flag, fail, quiet_frameworks, setup_logging

from . import checkpoint as ckpt
from .data import DIGITS, Augment, DatasetError, Source, open_source, report_source, split_indices

log = logging.getLogger("resnet_serve.train")

# A fresh run's defaults. On --resume these come from the checkpoint instead, and a flag that disagrees is refused.
DEFAULTS: dict[str, Any] = {"arch": "resnet18", "data": DIGITS, "input_size": 32, "epochs": 5, "batch_size": 64,
                            "lr": 0.05, "holdout": 0.2, "seed": 0, "amp": "O1", "max_steps_per_epoch": 0}
# The digits are 8x8 glyphs: a mirrored digit is another glyph and a small crop loses the strokes.
DIGITS_AUGMENT = Augment(crop_scale=0.6, flip=False)
FOLDER_AUGMENT = Augment(crop_scale=0.08, flip=True)
MIN_INPUT, MAX_INPUT = 16, 4096


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like every other mistake
        sys.exit(fail(f"{self.prog}: {message}"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="resnet-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", help=f"{'|'.join(ckpt.ARCHITECTURES)} (default resnet18)")
    p.add_argument("--data", help="'digits' (scikit-learn's handwritten digits, embedded; the default) or an image "
                                  "folder with one subfolder per class")
    p.add_argument("--input-size", type=int, help="square input side in pixels (default 32)")
    p.add_argument("--epochs", type=int, help="train until this epoch (default 5; on --resume: the run's own)")
    p.add_argument("--batch-size", type=int, help="default 64")
    p.add_argument("--lr", type=float, help="peak learning rate of the cosine schedule (default 0.05)")
    p.add_argument("--amp", choices=["O0", "O1", "O2"],
                   help="mixed precision level on GPU (default O1; CPU always trains fp32)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes decoding images (2)")
    p.add_argument("--out", type=Path, help="checkpoint folder (default checkpoints/<digits or the folder's name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out folder that already holds another run's checkpoints")
    p.add_argument("--resume", type=Path,
                   help="continue a run from its checkpoint (file, prefix or folder): data, architecture, sizes, "
                        "schedule and output folder come from it")
    p.add_argument("--init", type=Path,
                   help="start from these weights (.pdparams, checkpoint prefix or folder); head replaced if the "
                        "class count differs")
    p.add_argument("--init-partial", action="store_true",
                   help="allow --init weights that cover only part of the model (another architecture)")
    p.add_argument("--no-augment", action="store_true", help="train on the serving transform only")
    p.add_argument("--crop-scale", type=float,
                   help="smallest area fraction of the random resized crop (default 0.08; digits 0.6)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flip (default on; off for digits)")
    p.add_argument("--profile", action="store_true",
                   help="print a Paddle profiler summary of a few steps; the trace goes to OUT/profile")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--holdout", type=float, help="fraction of images held out for evaluation (default 0.2)")
    p.add_argument("--max-steps-per-epoch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--write-holdout", type=Path, metavar="DIR",
                   help="write the held-out images as PNG files under DIR/<class>/ and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    add_verbose_flag(p)
    return p.parse_args(argv)


def _data_key(data: str) -> str:
    """How a data source is recorded: 'digits' or the folder's absolute path (resume works from anywhere)."""
    return data if data == DIGITS else str(Path(data).resolve())


def _augment(args: argparse.Namespace, data: str) -> Augment | None:
    if args.no_augment:
        return None
    base = DIGITS_AUGMENT if data == DIGITS else FOLDER_AUGMENT
    return Augment(args.crop_scale if args.crop_scale is not None else base.crop_scale,
                   args.flip if args.flip is not None else base.flip)


def _from_checkpoint(args: argparse.Namespace) -> tuple[dict[str, Any], Path, Augment | None]:
    """--resume: the run's settings from its metadata; a flag that contradicts one of them is a UsageError."""
    prefix = ckpt.resolve(args.resume)
    meta = ckpt.read_meta(prefix)
    if not meta:
        raise UsageError(f"checkpoint {prefix} has no metadata ({prefix.with_suffix(ckpt.META).name}): "
                         "it cannot be resumed")
    latest = ckpt.resolve(prefix.parent)
    if latest != prefix:
        raise UsageError(f"resuming {prefix.name} would overwrite the later {latest.name} in {prefix.parent}: "
                         f"resume from {latest} (or copy {prefix.name} to another folder)")
    if args.init:
        raise UsageError("--init contradicts --resume: the resumed checkpoint holds the weights")
    recorded = {"arch": meta.get("arch"), "data": meta.get("dataset"), "input_size": (meta.get("input_size") or
                [None])[0], "batch_size": meta.get("batch_size"), "lr": meta.get("lr"), "holdout": meta.get("holdout"),
                "seed": meta.get("seed"), "amp": meta.get("amp_requested"),
                "max_steps_per_epoch": meta.get("max_steps_per_epoch")}
    run = {}
    for key, value in recorded.items():
        given = getattr(args, key)
        if key == "data" and given is not None:
            given = _data_key(given)
        if key == "data" and value not in (None, DIGITS) and not Path(value).exists():
            if given is None:
                raise UsageError(f"the run's data folder {value} no longer exists: if it moved, pass --data with its "
                                 "new place (the classes must be the run's)")
            value = given  # the folder moved: its classes are checked against the run's below
        if value is None:  # metadata of an older resnet-train: the flag or the default
            value = given if given is not None else DEFAULTS[key]
        elif given is not None and given != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {getattr(args, key)} contradicts the run being resumed ({value}, from "
                             f"{prefix.with_suffix(ckpt.META)}): drop {flag}")
        run[key] = value
    if args.out is not None and Path(args.out).resolve() != prefix.parent.resolve():
        raise UsageError(f"--out {args.out} contradicts the run being resumed, which writes to {prefix.parent}: "
                         "drop --out")
    saved = int(meta.get("epoch", 0))
    run["epochs"] = args.epochs if args.epochs is not None else int(meta.get("epochs", saved))
    if run["epochs"] <= saved:
        raise UsageError(f"nothing left to train: {prefix} is epoch {saved} and the run ends at epoch "
                         f"{run['epochs']}; pass --epochs N with N > {saved} to train further")
    if "augment" not in meta:  # metadata of an older resnet-train
        return run, prefix.parent, _augment(args, run["data"])
    recorded_aug = Augment(**meta["augment"]) if meta["augment"] else None
    if args.no_augment or args.crop_scale is not None or args.flip is not None:
        base = recorded_aug or (DIGITS_AUGMENT if run["data"] == DIGITS else FOLDER_AUGMENT)
        wanted = None if args.no_augment else Augment(
            args.crop_scale if args.crop_scale is not None else base.crop_scale,
            args.flip if args.flip is not None else base.flip)
        if wanted != recorded_aug:
            raise UsageError(f"augmentation {wanted or 'off'} contradicts the run being resumed "
                             f"({recorded_aug or 'off'}): drop --no-augment/--crop-scale/--flip")
    return run, prefix.parent, recorded_aug


def _fresh(args: argparse.Namespace) -> tuple[dict[str, Any], Path, Augment | None]:
    run = {key: getattr(args, key) if getattr(args, key) is not None else default for key, default in DEFAULTS.items()}
    run["data"] = _data_key(run["data"])
    out = args.out or Path("checkpoints") / (DIGITS if run["data"] == DIGITS else Path(run["data"]).name)
    return run, out, _augment(args, run["data"])


def _check_settings(run: dict[str, Any], args: argparse.Namespace, augment: Augment | None) -> None:
    if run["epochs"] < 1:
        raise UsageError(f"--epochs must be at least 1, got {run['epochs']}")
    if run["batch_size"] < 1:
        raise UsageError(f"--batch-size must be at least 1, got {run['batch_size']}")
    if not 0 < run["holdout"] < 1:
        raise UsageError(f"--holdout must be a fraction between 0 and 1 (exclusive), got {run['holdout']}")
    if not (math.isfinite(run["lr"]) and run["lr"] > 0):
        raise UsageError(f"--lr must be a positive number, got {run['lr']}")
    if not MIN_INPUT <= run["input_size"] <= MAX_INPUT:
        raise UsageError(f"--input-size must be between {MIN_INPUT} and {MAX_INPUT}, got {run['input_size']}")
    if run["arch"] not in ckpt.ARCHITECTURES:
        raise UsageError(f"unknown architecture {run['arch']!r}; choose one of {', '.join(ckpt.ARCHITECTURES)}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if run["max_steps_per_epoch"] < 0:
        raise UsageError("--max-steps-per-epoch must be 0 (whole epochs) or more")
    if augment is not None and not 0 < augment.crop_scale <= 1:
        raise UsageError(f"--crop-scale must be in (0, 1], got {augment.crop_scale}")


def _check_data(source: Source, run: dict[str, Any], resumed: dict[str, Any]) -> None:
    n = len(source)
    if resumed.get("labels") and list(source.classes) != resumed["labels"]:
        raise UsageError(f"the classes of {run['data']} ({', '.join(source.classes)}) are no longer the resumed "
                         f"run's ({', '.join(resumed['labels'])}): the data set changed since the run began")
    train_idx, test_idx = split_indices(n, run["holdout"], run["seed"])
    if len(test_idx) == 0 or len(train_idx) == 0:
        raise UsageError(f"--holdout {run['holdout']} of {n} images leaves {len(train_idx)} for training and "
                         f"{len(test_idx)} held out: both need at least one")
    if run["batch_size"] > len(train_idx):
        raise UsageError(f"--batch-size {run['batch_size']} is larger than the training split ({len(train_idx)} of "
                         f"{n} images with --holdout {run['holdout']}): an epoch would be 0 steps")
    steps = len(train_idx) // run["batch_size"]
    if resumed.get("steps_per_epoch") and min(steps, run["max_steps_per_epoch"] or steps) != resumed["steps_per_epoch"]:
        log.warning("the data set's size changed since the run began (an epoch is now %d steps, was %d): the "
                    "resumed run will differ from an uninterrupted one", steps, resumed["steps_per_epoch"])
    unseen = len(source.classes) - len(np.unique(source.labels[train_idx]))
    if unseen:
        log.warning("%d of %d classes have no image in the training split (all theirs are held out): the model "
                    "cannot learn them; add images or lower --holdout", unseen, len(source.classes))
    if steps == 1:
        log.warning("--batch-size %d on %d training images makes every epoch a single step: the model will barely "
                    "train; lower --batch-size", run["batch_size"], len(train_idx))


def _folder_or_none(path: Path, flag: str) -> None:
    """A folder to write: it, or its nearest existing parent, must not be a file."""
    existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")


def _check_out(out: Path, args: argparse.Namespace) -> None:
    """A fresh run never silently overwrites another run's epochs (export would later take the mixture)."""
    _folder_or_none(out, "--out")
    if args.resume or args.overwrite or not Path(out).is_dir():
        return
    with contextlib.suppress(ckpt.CheckpointError):
        last = ckpt.resolve(out)
        raise UsageError(f"{out} already holds a run (latest {last.name}): continue it with --resume {out}, "
                         "choose another --out, or pass --overwrite to start over there")


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """One training run per checkpoint folder at a time: a second one writing the same epochs would interleave.
    A POSIX record lock (lockf), not flock: DataLoader worker processes fork from the trainer and would inherit a
    flock, keeping the folder locked after the trainer is killed (kill -9) while they linger."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(out) / ".train.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"cannot write the checkpoint folder {out}: {e.strerror}") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise UsageError(f"cannot lock the checkpoint folder {out}: {e.strerror}") from None
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            raise UsageError(f"another resnet-train (pid {holder}) is writing to {out}: wait for it, or choose "
                             "another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def _check_init(args: argparse.Namespace, arch: str) -> None:
    if args.init is None:
        return
    prefix = ckpt.resolve(args.init)
    init_arch = ckpt.read_meta(prefix).get("arch")
    if init_arch and init_arch != arch and not args.init_partial:
        raise UsageError(f"--init {args.init} holds {init_arch} weights and this run trains {arch}: pass "
                         "--init-partial to load only the tensors that match")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_frameworks(args.verbose)  # before `import paddle`
    setup_logging()
    try:
        if args.write_holdout:
            return _write_holdout(args)
        run, out, augment = _from_checkpoint(args) if args.resume else _fresh(args)
        _check_settings(run, args, augment)
        _check_out(out, args)
        _check_init(args, run["arch"])
        source = open_source(run["data"], report=False)
        resumed = ckpt.read_meta(ckpt.resolve(args.resume)) if args.resume else {}
        _check_data(source, run, resumed)  # before the report: a refused run prints its one line and nothing else
        report_source(source)
        if resumed and run["epochs"] != resumed.get("epochs"):
            log.warning("extending the run from %s to %d epochs: the cosine schedule now spans %d epochs",
                        resumed.get("epochs"), run["epochs"], run["epochs"])
        if args.profile:
            log.info("profiler trace: %s", Path(out) / "profile")
    except (UsageError, DatasetError, ckpt.CheckpointError) as e:
        return fail(str(e))

    try:
        with run_lock(out):  # before Paddle is imported: a refused second run costs one line, nothing else
            return _train(args, run, out, augment, source)
    except UsageError as e:
        return fail(str(e))


def _train(args: argparse.Namespace, run: dict[str, Any], out: Path, augment: Augment | None,
           source: Source) -> int:
    from .models import InitError
    from .trainer import TrainConfig, train

    cfg = TrainConfig(out=Path(out), resume=args.resume, init=args.init, init_partial=args.init_partial,
                      profile=args.profile, augment=augment, num_workers=args.num_workers,
                      progress=not args.no_progress and sys.stderr.isatty(), **run)
    try:
        last = train(cfg, source)
    except (DatasetError, InitError, ckpt.CheckpointError) as e:
        return fail(str(e))
    print(last.with_suffix(".pdparams"))
    return 0


def _write_holdout(args: argparse.Namespace) -> int:
    from .data import held_out, write_images

    run = _fresh(args)[0]
    _check_settings(run, args, None)
    _folder_or_none(args.write_holdout, "--write-holdout")
    n = write_images(held_out(run["data"], run["input_size"], run["holdout"], run["seed"]), args.write_holdout)
    log.info("wrote %d held-out images under %s", n, args.write_holdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
