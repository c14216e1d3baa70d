"""Second-round batches: labelled records mixed with pseudo-labelled frames, and their loss.

With ``label.pseudo`` set, each training batch of ``B`` samples holds ``B - P`` labelled
records followed by ``P = round(B * label.pseudo_fraction)`` pseudo-labelled frames (at
least one of each). An epoch keeps its number of steps (``len(train) // B``), so a run with
pseudo-labels costs what one without does; the labelled records are drawn by a seeded
permutation per epoch (so at ``pseudo_fraction: 0.5`` an epoch sees half of them) and the
pseudo-labelled frames by another, cycled when they run out. Labels of both parts arrive as
x255 codes (hard labels become 0/255), so one ``labels_to_float(..., soft=True)`` decodes the
batch.

The loss of a batch is ``((B - P) * L(labelled) + w * P * L(pseudo)) / B`` with
``w = label.pseudo_weight``: each part's loss is computed on its own (dice is one sum over
a batch), a pseudo-labelled sample counting ``w`` times a labelled one. The two parts are
augmented separately, so cutmix and mixup never mix a labelled sample with a pseudo one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from ..data.loader import ArraySet, batch_order, batches, worker_count


def pseudo_count(config: Config, pseudo: ArraySet | None) -> int:
    """Pseudo-labelled samples per batch (0 without pseudo-labels)."""
    if pseudo is None or len(pseudo) == 0 or config.label.pseudo_fraction <= 0:
        return 0
    size = config.train.batch_size
    return min(max(1, round(size * config.label.pseudo_fraction)), size - 1)


class _MixedBatches(Dataset):
    def __init__(self, train: ArraySet, pseudo: ArraySet, labelled, pseudo_rows):
        self.train, self.pseudo = train, pseudo
        self.labelled, self.pseudo_rows = labelled, pseudo_rows

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, index: int):
        inputs, labels = self.train.read(self.labelled[index])
        assert labels is not None  # training sets carry labels
        if not self.train.soft:
            labels = labels * np.uint8(255)
        extra_inputs, extra_labels = self.pseudo.read(self.pseudo_rows[index])
        return (
            torch.from_numpy(np.concatenate([inputs, extra_inputs])),
            torch.from_numpy(np.concatenate([labels, extra_labels])),
        )


def mixed_batches(
    train: ArraySet, pseudo: ArraySet, batch_size: int, n_pseudo: int, seed: int, workers: int = 0
) -> DataLoader:
    """A DataLoader of ``(inputs, x255 label codes)``: labelled first, then pseudo-labelled."""
    labelled = batch_order(len(train), batch_size - n_pseudo, True, seed, drop_last=True)
    rng = np.random.default_rng([seed, 1])
    needed = len(labelled) * n_pseudo
    drawn = np.concatenate([rng.permutation(len(pseudo)) for _ in range(-(-needed // len(pseudo)))])
    pseudo_rows = [drawn[i * n_pseudo : (i + 1) * n_pseudo] for i in range(len(labelled))]
    return DataLoader(
        _MixedBatches(train, pseudo, labelled, pseudo_rows),
        batch_size=None,
        shuffle=False,
        num_workers=worker_count(workers),
        persistent_workers=False,
    )


def epoch_batches(
    config: Config, train: ArraySet, pseudo: ArraySet | None, seed: int
) -> tuple[DataLoader, int, bool]:
    """One epoch's training batches, their pseudo-labelled count and whether labels are soft."""
    spec = config.train
    n_pseudo = pseudo_count(config, pseudo)
    if not n_pseudo:
        loader = batches(
            train,
            spec.batch_size,
            shuffle=True,
            seed=seed,
            drop_last=True,
            num_workers=spec.num_workers,
        )
        return loader, 0, train.soft
    assert pseudo is not None  # pseudo_count is 0 without a pseudo-label set
    loader = mixed_batches(train, pseudo, spec.batch_size, n_pseudo, seed, spec.num_workers)
    return loader, n_pseudo, True


def augment_parts(augmenter, x, y, generator: torch.Generator, n_pseudo: int):
    """Augment the labelled and the pseudo-labelled part of a batch each on its own."""
    if not n_pseudo:
        return augmenter(x, y, generator)
    n_labelled = len(x) - n_pseudo
    x_l, y_l = augmenter(x[:n_labelled], y[:n_labelled], generator)
    x_p, y_p = augmenter(x[n_labelled:], y[n_labelled:], generator)
    return torch.cat([x_l, x_p]), torch.cat([y_l, y_p])


def mixed_loss(
    loss_fn: Callable, logits: torch.Tensor, y: torch.Tensor, n_pseudo: int, weight: float
) -> torch.Tensor:
    """``loss_fn`` on the batch, or the count-weighted mix of its two parts' losses."""
    if not n_pseudo:
        return loss_fn(logits, y)
    n_labelled = len(logits) - n_pseudo
    labelled = loss_fn(logits[:n_labelled], y[:n_labelled])
    pseudo = loss_fn(logits[n_labelled:], y[n_labelled:])
    return (n_labelled * labelled + weight * n_pseudo * pseudo) / len(logits)
