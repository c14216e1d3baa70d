"""Training of one fold: resumable, seeded, with AMP, EMA, accumulation and early stopping.

Everything random in an epoch (batch order, augmentation, dropout) is seeded from
``(config seed, fold, epoch)``, so a run resumed from the last epoch checkpoint continues
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..config import Config, dump_config
from ..data.loader import ArraySet, batches, labels_to_float, to_float
from ..errors import EkError
from ..files import atomic_path, write_json, write_text
from ..geometry import shift_label
from ..layout import fold_files
from ..metrics import best_threshold
from ..models import build_model
from ..oof import to_codes
from ..runtime import Runtime, resolve_runtime, torch_threads_kept
from .augment import Augmenter
from .averaging import average_top_k, keep_top_k
from .losses import build_loss, smooth_labels
from .mixing import augment_parts, epoch_batches, mixed_loss
from .optim import Ema, make_optimizer, make_scheduler

log = logging.getLogger(__name__)


class DivergedError(EkError):
    """The loss became NaN or infinite."""


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    return (seed * 1_000_003 + fold * 10_007 + epoch) % (2**31)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class FoldState:
    """What an epoch checkpoint restores besides the weights."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best_dice: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    top: list[dict] = field(default_factory=list)  # train.average_top_k: kept epochs


@dataclass
class Trainer:
    """One fold's model, optimiser and schedule, built from a config."""

    config: Config
    runtime: Runtime
    total_steps: int
    channels: tuple[int, int] | None = None  # (input, output): task.model_channels
    model: torch.nn.Module = field(init=False)

    def __post_init__(self):
        self.model = build_model(self.config, channels=self.channels).to(self.runtime.device)
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.config.optim, self.model.parameters())
        self.scheduler = make_scheduler(self.config.schedule, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler(
            self.runtime.device.type, enabled=self.runtime.use_scaler
        )
        self.ema = Ema(self.model, self.config.train.ema) if self.config.train.ema else None
        self.loss_fn = build_loss(self.config.loss)
        self.augmenter = Augmenter(self.config.augment)
        self.forward = (
            torch.compile(self.model, mode="reduce-overhead")
            if self.runtime.compile
            else self.model
        )

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema else self.model

    def state_dict(self, state: FoldState) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": state.__dict__,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, checkpoint: dict) -> FoldState:
        self.model.load_state_dict(checkpoint["model"])
        if self.ema and checkpoint["ema"] is not None:
            self.ema.model.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        random.setstate(checkpoint["rng"]["python"])
        return FoldState(**checkpoint["state"])

    def autocast(self):
        enabled = self.runtime.amp_dtype is not None
        return torch.autocast(
            self.runtime.device.type, dtype=self.runtime.amp_dtype or torch.float32, enabled=enabled
        )

    def prepare(
        self, inputs: torch.Tensor, labels: torch.Tensor | None, soft: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cached batch -> float tensors on the device (labels corrected and smoothed)."""
        device = self.runtime.device
        x = to_float(inputs.to(device, non_blocking=True))
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if labels is None:
            return x, None
        y = labels_to_float(labels.to(device, non_blocking=True), soft)
        if self.config.label.shift_correct:
            y = shift_label(y, -0.5, -0.5)
        return x, y

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        step_in_epoch: int,
        generator: torch.Generator,
        n_batches: int | None = None,
        n_pseudo: int = 0,
    ) -> float:
        """Forward/backward of one batch; steps the optimiser at the end of each group.

        Batches form groups of ``train.accumulate``; with ``n_batches`` (the epoch's batch
        count) the last group may be shorter, and its gradient is the mean over its own
        batches, stepped after its last batch. The last ``n_pseudo`` samples of the batch
        are pseudo-labelled (:mod:`.mixing`).
        """
        group, last = accumulation_group(step_in_epoch, self.config.train.accumulate, n_batches)
        x, y = augment_parts(self.augmenter, x, y, generator, n_pseudo)
        y = smooth_labels(y, self.config.label.smoothing)
        with self.autocast():
            logits = self.forward(x)
        weight = self.config.label.pseudo_weight
        loss = mixed_loss(self.loss_fn, logits.float(), y, n_pseudo, weight)
        if not torch.isfinite(loss):
            return float("nan")
        self.scaler.scale(loss / group).backward()
        if last:
            self.optimizer_step()
        return float(loss.detach())

    def optimizer_step(self) -> None:
        if self.config.train.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` atomically: a failed write (full disk) leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def steps_per_epoch(config: Config, n_train: int) -> int:
    """Batches per epoch (full batches only, at most ``train.max_steps_per_epoch``)."""
    full = max(1, n_train // config.train.batch_size)
    limit = config.train.max_steps_per_epoch
    return min(full, limit) if limit else full


def accumulation_group(step: int, accumulate: int, n_batches: int | None) -> tuple[int, bool]:
    """Size of the accumulation group of batch ``step``, and whether ``step`` ends it.

    Without ``n_batches`` every group is ``accumulate`` long.
    """
    start = step - step % accumulate
    size = accumulate if n_batches is None else min(accumulate, n_batches - start)
    return size, step + 1 == start + size


def optimizer_steps(config: Config, n_train: int) -> int:
    """Optimiser steps of a whole run: every group of ``accumulate`` batches, the last
    (shorter) group of each epoch included; the schedules' step budget."""
    per_epoch = math.ceil(steps_per_epoch(config, n_train) / config.train.accumulate)
    return config.train.epochs * per_epoch


def run_epoch(
    trainer: Trainer,
    train: ArraySet,
    fold: int,
    state: FoldState,
    epochs: int,
    pseudo: ArraySet | None = None,
) -> float:
    """One epoch over the training folds (and pseudo-labelled frames); returns the mean loss
    (raises on NaN)."""
    spec = trainer.config.train
    seed = epoch_seed(spec.seed, fold, state.epoch)
    generator = seed_everything(seed)
    n_batches = steps_per_epoch(trainer.config, len(train))
    loader, n_pseudo, soft = epoch_batches(trainer.config, train, pseudo, seed)
    trainer.model.train()
    losses = []
    bar = tqdm(  # no terminal (a log file, CI): no bar; train_fold logs a line per epoch
        loader,
        total=n_batches,
        desc=f"fold {fold} epoch {state.epoch + 1}/{epochs}",
        leave=False,
        unit="batch",
        disable=None,
    )
    for step, (inputs, labels) in enumerate(bar):
        if step >= n_batches:
            break
        x, y = trainer.prepare(inputs, labels, soft)
        assert y is not None  # training sets always carry labels
        loss = trainer.train_step(x, y, step, generator, n_batches, n_pseudo)
        if math.isnan(loss):
            raise DivergedError(
                f"fold {fold}: loss became NaN at epoch {state.epoch + 1}, step {step + 1}; "
                "lower optim.lr or set train.clip_grad (no NaN weights were saved)"
            )
        losses.append(loss)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(trainer: Trainer, val: ArraySet) -> tuple[float, float, float]:
    """Validation loss, best-threshold global dice and that threshold (identity TTA)."""
    model = trainer.eval_model.eval()
    total, count, codes, targets = 0.0, 0, [], []
    for inputs, labels in batches(val, trainer.config.train.batch_size):
        x, y = trainer.prepare(inputs, labels)
        with trainer.autocast():
            logits = model(x)
        total += float(trainer.loss_fn(logits.float(), y)) * len(x)
        count += len(x)
        probs = torch.sigmoid(logits.float())
        if trainer.config.label.shift_correct:
            probs = shift_label(probs, 0.5, 0.5)
        codes.append(to_codes(probs[:, 0] if probs.shape[1] == 1 else probs).cpu().numpy())
        targets.append(labels.numpy().astype(np.uint8))
    with torch_threads_kept():  # a numba parallel kernel (see ensemble_kit.runtime)
        threshold, dice = best_threshold(np.concatenate(codes), np.concatenate(targets))
    return total / max(count, 1), dice, threshold


def train_fold(
    config: Config,
    fold_dir: Path,
    fold: int,
    train: ArraySet,
    val: ArraySet,
    device: torch.device,
    pseudo: ArraySet | None = None,
    channels: tuple[int, int] | None = None,
) -> dict:
    """Train (or resume) one fold; writes checkpoints and metrics, returns the fold summary.

    ``pseudo``: pseudo-labelled frames mixed into each batch (``label.pseudo``).
    ``channels``: the model's ``(input, output)`` channels (``task.model_channels``). With
    ``train.average_top_k`` >= 2, ``best.pt`` ends as the average of the K best epochs.

    The ``DONE`` marker is not written here: the caller writes it once the fold's OOF part
    exists.
    """
    files = fold_files(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    write_text(files["config"], dump_config(config))
    epochs = config.train.epochs
    total_steps = optimizer_steps(config, len(train))
    seed_everything(epoch_seed(config.train.seed, fold, 1_000_000))  # model initialisation
    trainer = Trainer(config, resolve_runtime(config, device), total_steps, channels)
    state = FoldState()
    if files["last"].is_file():
        state = trainer.load_state_dict(
            torch.load(files["last"], map_location=device, weights_only=False)
        )
        log.info("fold %d: resuming after epoch %d", fold, state.epoch)
    while state.epoch < epochs and not _early_stopped(config, state):
        started = time.perf_counter()
        train_loss = run_epoch(trainer, train, fold, state, epochs, pseudo)
        val_loss, dice, threshold = evaluate(trainer, val)
        state.epoch += 1
        seconds = time.perf_counter() - started
        _record(state, (train_loss, val_loss, dice, threshold), trainer, fold, seconds)
        if dice > state.best_dice:
            state.best_dice, state.best_epoch, state.bad_epochs = dice, state.epoch, 0
            save_checkpoint(
                files["best"],
                {"model": trainer.eval_model.state_dict(), "epoch": state.epoch, "dice": dice},
            )
        else:
            state.bad_epochs += 1
        keep_top_k(fold_dir, config.train.average_top_k, state, trainer.eval_model, dice)
        save_checkpoint(files["last"], trainer.state_dict(state))
        _write_metrics(files["metrics"], state.history)
    summary = {
        "fold": fold,
        "best_epoch": state.best_epoch,
        "best_dice": state.best_dice,
        "epochs": state.epoch,
        "seconds": sum(row["seconds"] for row in state.history),
    }
    if config.train.average_top_k >= 2:
        summary.update(average_top_k(trainer, fold_dir, state, train, val, evaluate))
    return summary


def _early_stopped(config: Config, state: FoldState) -> bool:
    patience = config.train.early_stop
    return bool(patience) and state.bad_epochs >= patience


def _record(state: FoldState, scores: tuple, trainer: Trainer, fold: int, seconds: float) -> None:
    """Append an epoch to the history and log it: the one progress line per epoch in a log."""
    train_loss, val_loss, dice, threshold = scores
    state.history.append(
        {
            "epoch": state.epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_dice": dice,
            "threshold": threshold,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
        }
    )
    log.info(
        "%s fold %d epoch %d/%d: train loss %.4f, val loss %.4f, val dice %.4f, %.1f s",
        trainer.config.name,
        fold,
        state.epoch,
        trainer.config.train.epochs,
        train_loss,
        val_loss,
        dice,
        seconds,
    )


def _write_metrics(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def write_done(fold_dir: Path, summary: dict) -> None:
    write_json(fold_files(fold_dir)["done"], summary)
