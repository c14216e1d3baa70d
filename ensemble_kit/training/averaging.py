"""``train.average_top_k``: a fold's ``best.pt`` as the weight average of its K best epochs.

The 4th place averaged the weights of each fold's 5 best checkpoints (SWA-style). During
training the evaluated weights of every epoch that ranks among the K best so far (by
validation dice, earlier epoch first on ties) are kept in a slot ``top_<s>.pt``; the fold's
``FoldState.top`` lists ``{epoch, dice, slot}``. There are K + 1 slots and a new epoch is
written to one the state does not reference, before ``last.pt`` records it, so a run killed
at any point resumes with every slot it trusts intact.

When training ends, the kept weights are averaged (in float64, so K identical checkpoints
average to exactly that checkpoint), the BatchNorm running statistics recomputed on a few
training batches (averaged weights do not match any epoch's statistics), the result
validated like an epoch and written as ``best.pt``. The averaged model's dice goes to
``metrics.csv`` (column ``top_k_dice``, on the last row) and the fold summary, beside the
single best epoch's ``best_dice``. K = 1 is the single best epoch: today's ``best.pt``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..data.loader import ArraySet, batches
from ..files import atomic_path
from ..layout import fold_files

log = logging.getLogger(__name__)

BN_BATCHES = 8  # training batches used to recompute BatchNorm statistics
BN_SEED = 2_000_003


def average_state_dicts(state_dicts: list[dict]) -> dict:
    """Element-wise mean of floating-point tensors (computed in float64, cast back).

    Integer tensors (BatchNorm's ``num_batches_tracked``) are taken from the first.
    """
    first = state_dicts[0]
    averaged = {}
    for key, value in first.items():
        if not torch.is_floating_point(value):
            averaged[key] = value.clone()
            continue
        total = torch.zeros_like(value, dtype=torch.float64)
        for state in state_dicts:
            total += state[key].to(torch.float64)
        averaged[key] = (total / len(state_dicts)).to(value.dtype)
    return averaged


def keep_top_k(fold_dir: Path, k: int, state, model: nn.Module, dice: float) -> None:
    """Record the epoch just validated among the K best, writing its weights to a free slot."""
    if k < 2:
        return
    entry = {"epoch": state.epoch, "dice": dice}
    ranked = sorted([*state.top, entry], key=lambda e: (-e["dice"], e["epoch"]))[:k]
    if entry not in ranked:
        return
    taken = {e["slot"] for e in state.top}
    entry["slot"] = min(set(range(k + 1)) - taken)
    with atomic_path(fold_files(fold_dir, k)[f"top_{entry['slot']}"]) as tmp:
        torch.save({"model": model.state_dict(), "epoch": state.epoch, "dice": dice}, tmp)
    state.top = ranked


def _batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Reset BatchNorm running statistics and re-estimate them as a plain mean over batches.

    Only the BatchNorm layers run in training mode (dropout stays off). Returns the number
    of batches used; a model without BatchNorm is left as it is.
    """
    layers = _batchnorm_layers(model)
    if not layers:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average
        layer.train()
    used = 0
    for x in inputs:
        model(x)
        used += 1
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    for module, training in modes:
        module.training = training
    return used


def average_top_k(trainer, fold_dir: Path, state, train: ArraySet, val, evaluate: Callable) -> dict:
    """Average the kept weights into ``best.pt``; returns the fold summary's extra fields."""
    k = trainer.config.train.average_top_k
    files = fold_files(fold_dir, k)
    kept = sorted(state.top, key=lambda e: (-e["dice"], e["epoch"]))
    if not kept:
        return {}
    weights = [
        torch.load(files[f"top_{e['slot']}"], map_location="cpu", weights_only=True)["model"]
        for e in kept
    ]
    model = trainer.eval_model
    model.load_state_dict(average_state_dicts(weights))
    recompute_batchnorm(model, _training_inputs(trainer, train))
    _, dice, threshold = evaluate(trainer, val)
    epochs = [e["epoch"] for e in kept]
    with atomic_path(files["best"]) as tmp:
        payload = {"model": model.state_dict(), "epoch": state.best_epoch, "dice": dice}
        torch.save({**payload, "averaged_epochs": epochs}, tmp)
    _write_metrics_with(files["metrics"], state.history, dice)
    log.info(
        "averaged epochs %s: dice %.4f (best single epoch %.4f)", epochs, dice, state.best_dice
    )
    return {"top_k": k, "top_k_epochs": epochs, "top_k_dice": dice, "top_k_threshold": threshold}


def _training_inputs(trainer, train: ArraySet) -> Iterable[torch.Tensor]:
    """Unaugmented training batches, in a fixed seeded order, for the BatchNorm statistics."""
    seed = trainer.config.train.seed + BN_SEED
    loader = batches(train, trainer.config.train.batch_size, shuffle=True, seed=seed)
    for step, (inputs, _) in enumerate(loader):
        if step >= BN_BATCHES:
            return
        yield trainer.prepare(inputs, None)[0]


def _write_metrics_with(path: Path, history: list[dict], dice: float) -> None:
    frame = pd.DataFrame(history)
    frame["top_k_dice"] = float("nan")
    frame.loc[frame.index[-1], "top_k_dice"] = dice
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
