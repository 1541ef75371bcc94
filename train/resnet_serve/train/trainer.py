"""The AMP training loop people use for ResNet in Paddle: auto_cast + GradScaler, O1/O2, a DataLoader whose worker
processes decode and augment images from disk.

On a GPU the requested AMP level is used as is (O2: fp16 conv/linear weights, fp32 BatchNorm, fp32 master weights
in the optimizer). On CPU Paddle disables auto_cast and GradScaler (docs/paddle.md), so the same command trains
fp32 and says so once.

Every random choice is a function of (seed, epoch[, image index]): the shuffle order, the augmentation of each
image and Paddle's generator are re-derived at the start of each epoch, so a resumed run draws exactly what the
uninterrupted run would have, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import functools
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
from tqdm import tqdm

from resnet_serve.common.imaging import IMAGENET_MEAN, IMAGENET_STD, normalise

from . import checkpoint as ckpt
from .data import Augment, DatasetError, Source, open_source, split_indices
from .models import build_model, init_from

log = logging.getLogger(__name__)
EVAL_BATCH = 256


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    data: str = "digits"
    input_size: int = 32
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 1e-4
    amp: str = "O1"  # O0 (fp32) | O1 | O2
    num_workers: int = 2
    out: Path = Path("checkpoints/digits")
    resume: Path | None = None
    init: Path | None = None
    init_partial: bool = False
    profile: bool = False
    seed: int = 0
    holdout: float = 0.2
    augment: Augment | None = Augment()
    max_steps_per_epoch: int = 0  # 0 = whole epoch; tests use a few steps
    progress: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class Indices(paddle.io.Sampler):
    """Some of the dataset's indices: in order, or (shuffle) in a permutation drawn from (seed, epoch); the first
    `limit` of them when given, so a shortened epoch ends the DataLoader's iteration (its workers exit) instead of
    abandoning it mid-way with its workers alive until the run ends."""

    def __init__(self, indices: np.ndarray, seed: int = 0, shuffle: bool = False, limit: int = 0):
        self.indices, self.seed, self.shuffle, self.epoch = np.asarray(indices), seed, shuffle, 0
        self.limit = limit or len(self.indices)

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        return iter(order[:self.limit].tolist())

    def __len__(self) -> int:
        return min(self.limit, len(self.indices))


class ImageDataset(paddle.io.Dataset):
    """Image i -> (normalised float32 CHW, label), decoded and augmented in the DataLoader's worker processes."""

    def __init__(self, source: Source, size: int, mean, std, augment: Augment | None, seed: int):
        self.source, self.size, self.mean, self.std = source, size, mean, std
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, int(i)]) if self.augment else None
        try:
            pixels = self.source.pixels(int(i), self.size, self.augment, rng)
        except DatasetError:  # raised in a worker it would reach the user as Paddle's traceback: flag the image
            return np.zeros((3, self.size, self.size), np.float32), np.int64(-1 - int(i))
        return normalise(pixels, self.mean, self.std), self.source.labels[i]


def check_batch(labels: paddle.Tensor, source: Source) -> None:
    """A batch holding an image a worker could not decode -> that image's DatasetError, raised here."""
    lowest = int(labels.min())
    if lowest < 0:
        source.pixels(-1 - lowest, 16)  # decodes it again in this process: raises the DatasetError naming it
        raise DatasetError(f"image {-1 - lowest} of the data set could not be read")


def gpu_available() -> bool:
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def effective_amp(requested: str) -> str:
    if requested not in ("O0", "O1", "O2"):
        raise ValueError(f"--amp must be O0, O1 or O2, not {requested!r}")
    if requested != "O0" and not gpu_available():
        log.warning("AMP %s requested, but this is a CPU run: Paddle disables auto_cast/GradScaler on CPU, "
                    "so training runs in fp32 and writes an fp32 checkpoint", requested)
        return "O0"
    return requested


def _die_with_parent(parent: int, worker_id: int) -> None:
    """DataLoader worker start-up: exit when the trainer dies. Paddle's own parent check runs only between batches
    and a worker blocked flushing its output queue outlived a kill -9 of the trainer for good (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the trainer died before prctl took effect
        os._exit(1)


def loader(dataset: ImageDataset, sampler: Indices, batch_size: int, drop_last: bool,
           num_workers: int) -> paddle.io.DataLoader:
    batches = paddle.io.BatchSampler(sampler=sampler, batch_size=batch_size, drop_last=drop_last)
    return paddle.io.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                worker_init_fn=functools.partial(_die_with_parent, os.getpid()))


def evaluate(model: paddle.nn.Layer, data: paddle.io.DataLoader, amp: str) -> float:
    """Held-out accuracy, the images prepared exactly as the server prepares them."""
    model.eval()
    correct = seen = 0
    with paddle.no_grad():
        for x, y in data:
            check_batch(y, data.dataset.source)
            with paddle.amp.auto_cast(enable=amp != "O0", level=amp if amp != "O0" else "O1"):
                logits = model(x)
            correct += int((logits.argmax(axis=1) == y).astype("int64").sum())
            seen += int(y.shape[0])
    model.train()
    return correct / max(1, seen)


def steps_per_epoch(n_train: int, cfg: TrainConfig) -> int:
    steps = n_train // cfg.batch_size
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 1]).integers(2**31 - 1))


def train(cfg: TrainConfig, source: Source | None = None) -> Path:
    """Train and checkpoint every epoch; returns the prefix of the last checkpoint written. `cfg` is final: the
    command line has already checked it against the data and, on resume, against the checkpoint."""
    paddle.seed(cfg.seed)
    amp = effective_amp(cfg.amp)
    source = source if source is not None else open_source(cfg.data)
    train_idx, test_idx = split_indices(len(source), cfg.holdout, cfg.seed)
    num_classes = len(source.classes)
    log.info("data: %s, %d train / %d held-out images, %d classes, %dx%d, augmentation %s", cfg.data,
             len(train_idx), len(test_idx), num_classes, cfg.input_size, cfg.input_size, cfg.augment or "off")

    model = build_model(cfg.arch, num_classes)
    if cfg.init:
        init_from(model, ckpt.resolve(cfg.init).with_suffix(ckpt.PARAMS), partial=cfg.init_partial)
    steps = steps_per_epoch(len(train_idx), cfg)
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(cfg.lr, T_max=cfg.epochs * steps)
    optimizer = paddle.optimizer.Momentum(learning_rate=schedule, momentum=0.9, parameters=model.parameters(),
                                          weight_decay=cfg.weight_decay, multi_precision=amp == "O2")
    if amp == "O2":
        model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level="O2", master_weight=True)
    scaler = paddle.amp.GradScaler(enable=amp != "O0", init_loss_scaling=1024)

    start_epoch, last = 1, None
    if cfg.resume:
        last = ckpt.resolve(cfg.resume)
        meta = ckpt.read_meta(last)
        model.set_state_dict(paddle.load(str(last.with_suffix(ckpt.PARAMS))))
        optimizer.set_state_dict(paddle.load(str(last.with_suffix(ckpt.OPT))))
        if meta.get("grad_scaler"):
            scaler.load_state_dict(meta["grad_scaler"])
        start_epoch = int(meta.get("epoch", 0)) + 1
        log.info("resumed from %s at epoch %d", last, start_epoch)

    train_set = ImageDataset(source, cfg.input_size, cfg.mean, cfg.std, cfg.augment, cfg.seed)
    order = Indices(train_idx, cfg.seed, shuffle=True, limit=steps * cfg.batch_size)
    train_data = loader(train_set, order, cfg.batch_size, True, cfg.num_workers)
    eval_data = loader(ImageDataset(source, cfg.input_size, cfg.mean, cfg.std, None, cfg.seed), Indices(test_idx),
                       EVAL_BATCH, False, cfg.num_workers)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    profiler = _profiler(out / "profile") if cfg.profile else None
    model.train()
    for epoch in range(start_epoch, cfg.epochs + 1):
        paddle.seed(epoch_seed(cfg.seed, epoch))
        train_set.epoch = order.epoch = epoch  # before iter(): worker processes copy the dataset then
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for x, y in train_data:
            check_batch(y, source)
            with paddle.amp.auto_cast(enable=amp != "O0", level=amp if amp != "O0" else "O1"):
                loss = F.cross_entropy(model(x), y)
            scaled = scaler.scale(loss)
            scaled.backward()
            scaler.minimize(optimizer, scaled)
            optimizer.clear_grad()
            schedule.step()
            seen += x.shape[0]
            loss_sum += float(loss) * x.shape[0]
            bar.set_postfix(loss=f"{float(loss):.3f}")
            bar.update()
            if profiler:
                profiler.step()
        bar.close()
        if profiler:
            profiler.stop()
            profiler.summary(op_detail=False, thread_sep=False, time_unit="ms")
            profiler = None
        accuracy = evaluate(model, eval_data, amp)
        elapsed = time.perf_counter() - t0
        log.info("epoch %d: loss %.4f, held-out accuracy %.4f, %.0f images/s", epoch,
                 loss_sum / max(1, seen), accuracy, seen / elapsed)
        last = ckpt.prefix_for(out, epoch)
        meta = {
            "arch": cfg.arch, "num_classes": num_classes, "input_size": [cfg.input_size, cfg.input_size],
            "mean": list(cfg.mean), "std": list(cfg.std), "labels": list(source.classes), "epoch": epoch,
            "epochs": cfg.epochs, "eval_accuracy": accuracy, "amp": amp, "amp_requested": cfg.amp,
            "dataset": cfg.data, "holdout": cfg.holdout, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "weight_decay": cfg.weight_decay, "max_steps_per_epoch": cfg.max_steps_per_epoch,
            "steps_per_epoch": steps, "augment": asdict(cfg.augment) if cfg.augment else None,
            "init": str(cfg.init) if cfg.init else None,
            "grad_scaler": {k: _plain(v) for k, v in scaler.state_dict().items()} if amp != "O0" else {},
            "paddle_version": paddle.__version__, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        ckpt.write_checkpoint(last, {
            ckpt.OPT: lambda p: paddle.save(optimizer.state_dict(), str(p)),
            ckpt.META: lambda p, meta=meta: p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"),
            ckpt.PARAMS: lambda p: paddle.save(model.state_dict(), str(p)),
        })
    if last is None or start_epoch > cfg.epochs:
        raise ValueError(f"nothing to train: resumed at epoch {start_epoch} of {cfg.epochs}")
    return last


def _plain(value):
    """GradScaler state holds tensors and numpy scalars; JSON wants plain numbers."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _profiler(folder: Path):
    """Profile steps 2-6 of the first epoch (skipping the slow first steps), print Paddle's summary and write the
    Chrome trace under the run's output folder (never the working directory)."""
    import paddle.profiler as profiler

    targets = [profiler.ProfilerTarget.CPU] + ([profiler.ProfilerTarget.GPU] if gpu_available() else [])
    prof = profiler.Profiler(targets=targets, scheduler=(2, 7), timer_only=False,
                             on_trace_ready=profiler.export_chrome_tracing(str(folder)))
    prof.start()
    return prof
