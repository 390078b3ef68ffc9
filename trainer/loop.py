"""The training loop: sampling, augmentation, AMP, DDP, evaluation, best/last checkpoints.

Task-specific parts (batches, loss, sample weights, metrics) are small hook objects
(:class:`trainer.classify.ClassifyHooks`, :class:`SegmentHooks`); the loop itself knows
nothing about tasks.
Only rank 0 evaluates and writes; every rank resumes from the same ``last.pt``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monai.losses import DiceCELoss
from tqdm import tqdm

from trainer.augment import AugmentSpec, augment_batch
from trainer.averaging import EmaWeights, EpochAverage
from trainer.datasets import IGNORE, SliceSet
from trainer.distributed import DistContext, ShardedWeightedSampler, barrier
from trainer.metrics import segmentation_metrics
from trainer.models import predict

log = logging.getLogger(__name__)

LAST, BEST, AVERAGE, SNAPSHOTS = "last.pt", "best.pt", "average.pt", "epochs"


@dataclass(frozen=True)
class TrainConfig:
    """The training budget and bookkeeping of one run."""

    epochs: int
    batch_size: int
    lr: float
    samples_per_epoch: int
    seed: int
    work_dir: Path
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    resume: bool = False
    amp: bool = True  # only takes effect on CUDA
    progress: bool = True
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    #: > 0: validate, keep and publish an exponential moving average of the weights with this
    #: per-step decay (trainer/averaging.py) instead of the raw weights; 0: off.
    ema_decay: float = 0.0
    #: > 0: average the raw weights at the end of each of the last ``average_last`` epochs
    #: (every epoch of a shorter run; SWA, trainer/averaging.py), recompute its batch-norm
    #: statistics on ``bn_samples`` training draws (0: an epoch's worth), validate it, and
    #: publish it (``average.pt``) instead of the validation-maximum checkpoint; 0: off.
    average_last: int = 0
    bn_samples: int = 0
    #: keep every epoch's raw weights as ``WORK/epochs/epoch-NNN.pt`` (for later analysis)
    snapshots: bool = False

    def __post_init__(self) -> None:
        if self.average_last < 0:
            raise ValueError(f"average_last must be >= 0, got {self.average_last}")
        if self.average_last and self.ema_decay > 0:
            raise ValueError("average_last and ema_decay are two ways to average the weights; "
                             "pick one")


class TaskHooks(Protocol):
    """What the loop needs to know about a task."""

    primary_metric: str

    def sample_weights(self, data: SliceSet) -> np.ndarray: ...
    def make_batch(self, data: SliceSet, idx: np.ndarray, rng: np.random.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]: ...
    def loss(self, output: Any, label: torch.Tensor | None,
             mask: torch.Tensor | None) -> torch.Tensor: ...
    def evaluate(self, probs: np.ndarray, data: SliceSet) -> dict[str, float]: ...


class SegmentHooks:
    """Lung + nodule segmentation: nodule slices oversampled, Dice+CE, mean foreground Dice."""

    primary_metric = "dice_mean"

    def __init__(self, labels: tuple[str, ...], nodule_share: float = 0.3) -> None:
        self.labels = labels
        self.nodule_share = nodule_share
        self._loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def sample_weights(self, data: SliceSet) -> np.ndarray:
        assert data.masks is not None
        has_nodule = (data.masks == len(self.labels) - 1).any(axis=(1, 2))
        n_pos = int(has_nodule.sum())
        if n_pos == 0 or n_pos == len(data):
            return np.ones(len(data))
        w_pos = self.nodule_share / n_pos
        w_neg = (1 - self.nodule_share) / (len(data) - n_pos)
        return np.where(has_nodule, w_pos, w_neg)

    def make_batch(self, data: SliceSet, idx: np.ndarray, rng: np.random.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        assert data.masks is not None
        return (torch.from_numpy(data.images[idx]), None,
                torch.from_numpy(data.masks[idx].astype(np.int64)))

    def loss(self, output: Any, label: torch.Tensor | None,
             mask: torch.Tensor | None) -> torch.Tensor:
        assert mask is not None
        return self._loss(output.float(), mask[:, None])

    def evaluate(self, probs: np.ndarray, data: SliceSet) -> dict[str, float]:
        assert data.masks is not None
        return segmentation_metrics(probs.argmax(axis=1), data.masks, self.labels)


def drop_unlabelled_masks(data: SliceSet) -> SliceSet:
    """Keep only slices whose mask is a real reference (no :data:`IGNORE` pixels)."""
    if data.masks is None:
        return data
    return data.select(~(data.masks == IGNORE).any(axis=(1, 2)))


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; ask torch for deterministic kernels where it has them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def save_atomically(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary name, then rename (a crash never leaves half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the per-epoch history and where the best weights are."""

    history: list[dict[str, float]]
    best_epoch: int
    best_metric: float
    best_checkpoint: Path
    seconds: float
    #: with ``average_last``: the averaged weights' validation metric (they are published)
    average_metric: float | None = None


def _schedule(total_steps: int, warmup_fraction: float):  # type: ignore[no-untyped-def]
    warm = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def train(model: torch.nn.Module, hooks: TaskHooks, train_set: SliceSet, val_set: SliceSet,
          cfg: TrainConfig, ctx: DistContext, meta: dict[str, Any]) -> TrainResult:
    """Train ``model`` and keep the checkpoint with the best validation ``primary_metric``.

    ``meta`` (task, labels, model spec, preprocessing, provenance) is stored in every
    checkpoint so ``mededge export`` can rebuild and publish the model from it alone.

    Raises:
        ValueError: the training or validation set is empty.
        FileNotFoundError: ``cfg.resume`` is set but there is no ``last.pt``.
    """
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"need training and validation slices, got {len(train_set)} and "
                         f"{len(val_set)}")
    started = time.monotonic()
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    device = ctx.device
    model.to(device)
    net: torch.nn.Module = model
    if ctx.distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(cfg.samples_per_epoch / (cfg.batch_size * ctx.world_size))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _schedule(cfg.epochs * steps, cfg.warmup_fraction))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    sampler = ShardedWeightedSampler(hooks.sample_weights(train_set), cfg.samples_per_epoch,
                                     rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed)
    ema = EmaWeights(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    average = EpochAverage(model) if cfg.average_last and ctx.is_main else None
    first_averaged = cfg.epochs - cfg.average_last + 1
    history: list[dict[str, float]] = []
    best_metric, best_epoch, start_epoch = -math.inf, 0, 1
    if cfg.resume:
        ck = torch.load(cfg.work_dir / LAST, map_location=device, weights_only=False)
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        history, best_metric, best_epoch = ck["history"], ck["best_metric"], ck["best_epoch"]
        start_epoch = ck["epoch"] + 1
        if ema is not None and "ema_state_dict" in ck:
            ema.load_state_dict(ck["ema_state_dict"], int(ck["ema_updates"]))
        if average is not None and "average_state_dict" in ck:
            average.load_state_dict(ck["average_state_dict"])
        log.info("resumed from %s at epoch %d", cfg.work_dir / LAST, start_epoch)

    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.monotonic()
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 10 + ctx.rank)
        order = np.fromiter(iter(sampler), dtype=np.int64)
        rng = np.random.default_rng([cfg.seed, epoch, ctx.rank])
        net.train()
        losses = []
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}",
                   unit="batch", disable=not (cfg.progress and ctx.is_main), leave=False)
        for start in bar:
            idx = order[start:start + cfg.batch_size]
            x, label, mask = hooks.make_batch(train_set, idx, rng)
            x = x.to(device)
            label = None if label is None else label.to(device)
            x, mask = augment_batch(x, None if mask is None else mask.to(device), cfg.augment,
                                    gen)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = hooks.loss(net(x), label, mask)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update(model)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        row: dict[str, float] = {"epoch": epoch, "train_loss": float(np.mean(losses)),
                                 "lr": float(sched.get_last_lr()[0])}
        if ctx.is_main:
            judged = model if ema is None else ema.model  # what is validated and kept
            probs = predict(judged, val_set.images, device)
            row.update({f"val_{k}": v for k, v in hooks.evaluate(probs, val_set).items()})
            row["seconds"] = time.monotonic() - t0
            history.append(row)
            metric = row[f"val_{hooks.primary_metric}"]
            state = {**meta, "state_dict": judged.state_dict(), "epoch": epoch,
                     "weights": "raw" if ema is None else f"ema {cfg.ema_decay:g}",
                     "history": history, "best_metric": best_metric, "best_epoch": best_epoch}
            if metric > best_metric:
                best_metric, best_epoch = metric, epoch
                state.update(best_metric=best_metric, best_epoch=best_epoch)
                save_atomically(state, cfg.work_dir / BEST)
            if cfg.snapshots:
                (cfg.work_dir / SNAPSHOTS).mkdir(exist_ok=True)
                save_atomically({**meta, "state_dict": model.state_dict(), "epoch": epoch,
                                 "weights": "raw"},
                                cfg.work_dir / SNAPSHOTS / f"epoch-{epoch:03d}.pt")
            extra: dict[str, Any] = ({} if ema is None else
                                     {"ema_state_dict": ema.state_dict(),
                                      "ema_updates": ema.updates})
            if average is not None and epoch >= first_averaged:
                average.add(model)
                extra["average_state_dict"] = average.state_dict()
            save_atomically({**state, **extra, "state_dict": model.state_dict(),
                             "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "scaler": scaler.state_dict()},
                            cfg.work_dir / LAST)
            log.info("epoch %d/%d loss %.4f val %s %.4f (best %.4f @ %d) %.1fs", epoch,
                     cfg.epochs, row["train_loss"], hooks.primary_metric, metric, best_metric,
                     best_epoch, row["seconds"])
        barrier(ctx)
    if average is not None:
        metric = _finish_average(average, model, hooks, train_set, val_set, cfg, device, meta,
                                 history, best_metric, best_epoch)
        return TrainResult(history=history, best_epoch=best_epoch, best_metric=best_metric,
                           best_checkpoint=cfg.work_dir / AVERAGE,
                           seconds=time.monotonic() - started, average_metric=metric)
    return TrainResult(history=history, best_epoch=best_epoch, best_metric=best_metric,
                       best_checkpoint=cfg.work_dir / BEST, seconds=time.monotonic() - started)


def training_inputs(hooks: TaskHooks, data: SliceSet, cfg: TrainConfig,
                    device: torch.device) -> Iterator[torch.Tensor]:
    """``cfg.bn_samples`` (0: an epoch's worth) training inputs in batches, drawn and
    augmented as an epoch draws them (a fixed seed of their own): what the batch-norm
    statistics of averaged weights are measured on."""
    sampler = ShardedWeightedSampler(hooks.sample_weights(data),
                                     cfg.bn_samples or cfg.samples_per_epoch, seed=cfg.seed)
    sampler.set_epoch(cfg.epochs + 1)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, cfg.epochs + 1, 0])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + (cfg.epochs + 1) * 10)
    for start in range(0, len(order), cfg.batch_size):
        x, _, mask = hooks.make_batch(data, order[start:start + cfg.batch_size], rng)
        x, _ = augment_batch(x.to(device), None if mask is None else mask.to(device),
                             cfg.augment, gen)
        yield x


def _finish_average(average: EpochAverage, model: torch.nn.Module, hooks: TaskHooks,
                    train_set: SliceSet, val_set: SliceSet, cfg: TrainConfig,
                    device: torch.device, meta: dict[str, Any], history: list[dict[str, float]],
                    best_metric: float, best_epoch: int) -> float:
    """Recompute the averaged weights' batch-norm statistics, validate them and write
    ``average.pt``; returns their validation metric."""
    averaged = average.finish(training_inputs(hooks, train_set, cfg, device), device)
    probs = predict(averaged, val_set.images, device)
    metrics = {f"val_{k}": v for k, v in hooks.evaluate(probs, val_set).items()}
    metric = metrics[f"val_{hooks.primary_metric}"]
    label = f"average of epochs {cfg.epochs - average.count + 1}-{cfg.epochs}"
    save_atomically({**meta, "state_dict": averaged.state_dict(), "epoch": cfg.epochs,
                     "weights": label, "average_epochs": average.count,
                     "average_metrics": metrics, "history": history,
                     "validation_maximum": {"metric": best_metric, "epoch": best_epoch},
                     "best_metric": metric, "best_epoch": cfg.epochs},
                    cfg.work_dir / AVERAGE)
    log.info("%s: val %s %.4f (validation maximum %.4f @ %d)", label, hooks.primary_metric,
             metric, best_metric, best_epoch)
    return metric
