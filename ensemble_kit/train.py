"""Moved to :mod:`ensemble_kit.training.trainer`;
kept so that ``ensemble_kit.train`` still imports."""

from .inference.checkpoints import load_fold_model
from .runtime import Runtime, resolve_device, resolve_runtime
from .training.optim import Ema, lr_factor, make_optimizer, make_scheduler
from .training.trainer import (
    DivergedError,
    FoldState,
    Trainer,
    epoch_seed,
    evaluate,
    run_epoch,
    save_checkpoint,
    seed_everything,
    steps_per_epoch,
    train_fold,
    write_done,
)

__all__ = [
    "load_fold_model",
    "Runtime",
    "resolve_device",
    "resolve_runtime",
    "DivergedError",
    "epoch_seed",
    "seed_everything",
    "make_optimizer",
    "lr_factor",
    "make_scheduler",
    "Ema",
    "FoldState",
    "Trainer",
    "save_checkpoint",
    "steps_per_epoch",
    "run_epoch",
    "evaluate",
    "train_fold",
    "write_done",
]
