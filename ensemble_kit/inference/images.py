"""Predicting an image task's split (``kind: images``, :mod:`ensemble_kit.task`): the images
read once, quantised as the image cache stores them, and their submission rows.

An image is read with :func:`ensemble_kit.data.images.read_image` and stored as the cache
stores it (uint8 ``round(x * 255)``, or float16 where the split holds ``.npy`` images), so
``ek submit --split validation`` reproduces the holdout codes as it does for contrails. Every
config of an image task takes the task's images (``input.channels: image``), so one tensor
serves every input spec of the ensemble.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.images import image_files, mask_rows, read_image, read_masks
from ..errors import EkError
from ..metrics import dice_from_counts, mean_dice_from_counts, pair_counts
from ..oof import to_codes
from ..task import Task
from .rle import decode
from .submission import (
    check_task_submission,
    read_task_rows,
    task_rows,
    write_task_submission,
)

log = logging.getLogger(__name__)


def split_images(task: Task, data_root: Path | str, split: str) -> dict[str, Path]:
    """Image id -> file of the split to predict; an :class:`EkError` when it has none."""
    files = image_files(task, data_root, split)
    if not files:
        raise EkError(f"{Path(data_root) / split}: no images to predict")
    return files


class ImageInputs(Dataset):
    """Each image of ``files`` once, quantised, repeated for each of ``n_specs`` input specs,
    plus whether it could be read. ``lenient`` (hidden data): an unreadable image becomes
    zeros, predicted empty, with a warning naming it; otherwise an :class:`EkError`."""

    def __init__(self, task: Task, files: Sequence[Path], n_specs: int, lenient: bool):
        self.task, self.files, self.n_specs, self.lenient = task, list(files), n_specs, lenient
        self.dtype = np.float16 if any(p.suffix == ".npy" for p in self.files) else np.uint8

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            image, readable = self._quantised(read_image(self.task, path)), True
        except EkError as err:
            if not self.lenient:
                raise
            log.warning("%s: unreadable, predicted as an empty mask (%s)", path, err)
            image = np.zeros((self.task.channels, *self.task.size), dtype=self.dtype)
            readable = False
        tensor = torch.from_numpy(image)
        return (*([tensor] * self.n_specs), readable)

    def _quantised(self, image: np.ndarray) -> np.ndarray:
        return to_codes(image) if self.dtype == np.uint8 else image.astype(np.float16)


def encoder_of(task: Task):
    """``encode(ids, masks) -> (row ids, RLEs)`` of one batch of an image task's masks."""

    def encode(ids: list[str], masks: np.ndarray) -> tuple[list[str], list[str]]:
        rows = task_rows(task, ids, masks)
        return [row_id for row_id, _ in rows], [rle for _, rle in rows]

    return encode


def write_rows(
    path: Path, task: Task, row_ids: list[str], rles: list[str], data_root: Path, split: str
) -> dict:
    """Write an image task's submission (the sample's row order on the test split) and
    check it as ``ek submit --check`` does; returns the check."""
    sample_root = data_root if split == "test" else None
    write_task_submission(path, task, list(zip(row_ids, rles)), sample_root)
    return check_task_submission(path, task, data_root, split)


def csv_score(path: Path, task: Task, data_root: Path, split: str) -> float:
    """The task's metric of a written submission against the split's masks, image by image."""
    rows = {row_id: rle for _, row_id, rle in read_task_rows(path, task)}
    by_image = mask_rows(task, data_root, split)
    counts = []
    for image_id in image_files(task, data_root, split):
        truth = read_masks(task, data_root, split, [image_id], by_image)[0].astype(bool)
        predicted = np.stack(
            [
                decode(_rle(rows[row_id], task), task.size, task.submission.rle_order)
                for row_id in task.row_ids(image_id)
            ]
        )
        counts.append(pair_counts(predicted[None], truth[None]))
    tp, fp, fn = (np.concatenate([c[k] for c in counts]) for k in range(3))
    if task.metric == "mean_dice":
        return mean_dice_from_counts(tp, fp, fn, task.empty_score)
    return dice_from_counts(int(tp.sum()), int(fp.sum()), int(fn.sum()))


def _rle(text: str, task: Task) -> str:
    return "" if text == task.submission.empty else text
