"""The AMP training loop people use for ResNet in Paddle: auto_cast + GradScaler, O1/O2, async data loading.

On a GPU the requested AMP level is used as is (O2: fp16 conv/linear weights, fp32 BatchNorm, fp32 master weights
in the optimizer). On CPU Paddle disables auto_cast and GradScaler (PADDLE_FACTS.md), so the same command trains
fp32 and says so once.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
from tqdm import tqdm

from resnet_serve.imaging import IMAGENET_MEAN, IMAGENET_STD, normalise

from . import checkpoint as ckpt
from .data import Split, load_dataset
from .models import build_model, init_from

log = logging.getLogger(__name__)


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
    profile: bool = False
    seed: int = 0
    holdout: float = 0.2
    max_steps_per_epoch: int = 0  # 0 = whole epoch; tests use a few steps
    progress: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra: dict = field(default_factory=dict)


class ArrayDataset(paddle.io.Dataset):
    """uint8 HWC images normalised in the DataLoader's worker processes (the async part of data loading)."""

    def __init__(self, split: Split, mean, std):
        self.split, self.mean, self.std = split, mean, std

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int):
        return normalise(self.split.images[i], self.mean, self.std), self.split.labels[i]


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


def evaluate(model: paddle.nn.Layer, split: Split, cfg: TrainConfig, amp: str) -> float:
    model.eval()
    correct = 0
    with paddle.no_grad():
        for start in range(0, len(split.labels), 256):
            x = paddle.to_tensor(normalise(split.images[start:start + 256], cfg.mean, cfg.std))
            with paddle.amp.auto_cast(enable=amp != "O0", level=amp if amp != "O0" else "O1"):
                logits = model(x)
            correct += int((logits.argmax(axis=1).numpy() == split.labels[start:start + 256]).sum())
    model.train()
    return correct / max(1, len(split.labels))


def train(cfg: TrainConfig) -> Path:
    """Train and checkpoint every epoch; returns the prefix of the last checkpoint written."""
    paddle.seed(cfg.seed)
    np.random.seed(cfg.seed)
    amp = effective_amp(cfg.amp)
    train_split, val_split = load_dataset(cfg.data, cfg.input_size, cfg.holdout, cfg.seed)
    num_classes = len(train_split.classes)
    log.info("data: %s, %d train / %d held-out images, %d classes, %dx%d", cfg.data, len(train_split.labels),
             len(val_split.labels), num_classes, cfg.input_size, cfg.input_size)

    model = build_model(cfg.arch, num_classes)
    if cfg.init:
        init_from(model, cfg.init)
    steps_per_epoch = max(1, len(train_split.labels) // cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(cfg.lr, T_max=cfg.epochs * steps_per_epoch)
    optimizer = paddle.optimizer.Momentum(learning_rate=schedule, momentum=0.9, parameters=model.parameters(),
                                          weight_decay=cfg.weight_decay, multi_precision=amp == "O2")
    if amp == "O2":
        model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level="O2", master_weight=True)
    scaler = paddle.amp.GradScaler(enable=amp != "O0", init_loss_scaling=1024)

    start_epoch = 1
    if cfg.resume:
        prefix = ckpt.resolve(cfg.resume)
        meta = ckpt.read_meta(prefix)
        model.set_state_dict(paddle.load(str(prefix.with_suffix(ckpt.PARAMS))))
        optimizer.set_state_dict(paddle.load(str(prefix.with_suffix(ckpt.OPT))))
        if meta.get("grad_scaler"):
            scaler.load_state_dict(meta["grad_scaler"])
        start_epoch = int(meta.get("epoch", 0)) + 1
        log.info("resumed from %s at epoch %d", prefix, start_epoch)

    loader = paddle.io.DataLoader(ArrayDataset(train_split, cfg.mean, cfg.std), batch_size=cfg.batch_size,
                                  shuffle=True, drop_last=True, num_workers=cfg.num_workers)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    profiler = _profiler() if cfg.profile else None
    last = ckpt.resolve(cfg.resume) if cfg.resume else None
    model.train()
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress,
                   leave=False)
        for step, (x, y) in enumerate(loader):
            if step >= steps_per_epoch:
                break
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
        accuracy = evaluate(model, val_split, cfg, amp)
        elapsed = time.perf_counter() - t0
        log.info("epoch %d: loss %.4f, held-out accuracy %.4f, %.0f images/s", epoch,
                 loss_sum / max(1, seen), accuracy, seen / elapsed)
        last = ckpt.prefix_for(out, epoch)
        paddle.save(model.state_dict(), str(last.with_suffix(ckpt.PARAMS)))
        paddle.save(optimizer.state_dict(), str(last.with_suffix(ckpt.OPT)))
        ckpt.write_meta(last, {
            "arch": cfg.arch, "num_classes": num_classes, "input_size": [cfg.input_size, cfg.input_size],
            "mean": list(cfg.mean), "std": list(cfg.std), "labels": train_split.classes, "epoch": epoch,
            "epochs": cfg.epochs, "eval_accuracy": accuracy, "amp": amp, "amp_requested": cfg.amp,
            "dataset": cfg.data, "holdout": cfg.holdout, "seed": cfg.seed,
            "grad_scaler": {k: _plain(v) for k, v in scaler.state_dict().items()} if amp != "O0" else {},
            "paddle_version": paddle.__version__, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        })
    if last is None:
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


def _profiler():
    """Profile steps 2-6 of the first epoch (skipping the slow first steps) and print Paddle's summary."""
    import paddle.profiler as profiler

    targets = [profiler.ProfilerTarget.CPU] + ([profiler.ProfilerTarget.GPU] if gpu_available() else [])
    prof = profiler.Profiler(targets=targets, scheduler=(2, 7), timer_only=False)
    prof.start()
    return prof
