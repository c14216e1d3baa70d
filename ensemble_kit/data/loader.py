"""Training batches straight from the memory-mapped cache.

A batch is one fancy-indexed read of the cache (indices sorted for locality), kept in its
compact dtype (uint8 / float16) until it reaches the device, where it is decoded to float.
No per-record ``.npy`` file is opened in the training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class ArraySet:
    """Rows of one or more cache arrays seen as one indexable set.

    ``sources`` are ``(inputs (N_s, C, H, W), labels (M_s, H, W))`` pairs; ``rows`` lists
    ``(source, row)`` for each member of the set, or ``(source, input row, label row)`` where
    labels are stored in another order than inputs (pseudo-labels).
    """

    sources: tuple[tuple[np.ndarray, np.ndarray | None], ...]
    rows: np.ndarray  # int64 (N, 2) or (N, 3)
    soft: bool = False  # labels are annotator means x 255 rather than 0/1

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, members: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Inputs and labels of the given members, in that order."""
        picked = self.rows[members]
        first_inputs, first_labels = self.sources[0]
        inputs = np.empty((len(members), *first_inputs.shape[1:]), first_inputs.dtype)
        labels = (
            None
            if first_labels is None
            else np.empty((len(members), *first_labels.shape[1:]), first_labels.dtype)
        )
        for source in np.unique(picked[:, 0]):
            where = np.flatnonzero(picked[:, 0] == source)
            rows = picked[where, 1]
            label_rows = picked[where, -1]
            order = np.argsort(rows, kind="stable")
            source_inputs, source_labels = self.sources[source]
            inputs[where[order]] = source_inputs[rows[order]]
            if labels is not None:
                labels[where[order]] = source_labels[label_rows[order]]
        return inputs, labels


class _Batches(Dataset):
    def __init__(self, arrays: ArraySet, batches: list[np.ndarray]):
        self.arrays, self.batches = arrays, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        inputs, labels = self.arrays.read(self.batches[index])
        inputs_t = torch.from_numpy(inputs)
        return (inputs_t, None) if labels is None else (inputs_t, torch.from_numpy(labels))


def batch_order(
    n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool
) -> list[np.ndarray]:
    """Member indices per batch; a seeded permutation when shuffling."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def worker_count(requested: int) -> int:
    """``train.num_workers`` capped at the CPUs this process may use (more only adds
    processes that wait, and torch warns about each)."""
    return max(0, min(requested, len(os.sched_getaffinity(0))))


def batches(
    arrays: ArraySet,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``(inputs, labels)`` tensors in the cache's compact dtypes."""
    order = batch_order(len(arrays), batch_size, shuffle, seed, drop_last)
    return DataLoader(
        _Batches(arrays, order),
        batch_size=None,
        shuffle=False,
        num_workers=worker_count(num_workers),
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def to_float(inputs: torch.Tensor) -> torch.Tensor:
    """Decode cached inputs on the device: uint8 codes to [0, 1], float16 to float32."""
    if inputs.dtype == torch.uint8:
        return inputs.float().div_(255.0)
    return inputs.float()


def labels_to_float(labels: torch.Tensor, soft: bool) -> torch.Tensor:
    """Cached labels (0/1, or soft x 255) to a float target: ``(B, H, W)`` to
    ``(B, 1, H, W)``; several classes' ``(B, C, H, W)`` keep their shape."""
    target = labels.float()
    if soft:
        target = target.div_(255.0)
    return target.unsqueeze(1) if target.ndim == 3 else target
