"""The sparse candidate pixels: one chunked pass over every config's OOF.

A pixel where every config is below ``floor`` (a uint8 code) has ``S < floor * W``, so for
thresholds ``>= floor * W`` it is never predicted. Such pixels are dropped once; the labelled
positives among them count as false negatives at every threshold. The remaining sparse
candidate set (a few % of the pixels) is all the search touches.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import levels
from ..metrics import N_CODES
from .kernels import _gather_chunk, _scan_chunk

DEFAULT_FLOOR = 13  # uint8 code of p = 0.05: blend thresholds below 5 % are not searched
CHUNK_IMAGES = 64


@dataclass
class Candidates:
    """The sparse candidate pixels: every pixel where some config reaches ``floor``."""

    values: np.ndarray  # uint8 (C, P) codes of every config
    labels: np.ndarray  # uint8 (P,)
    positions: np.ndarray  # int32 (P,) raster position r * W + c, ascending per image
    image_start: np.ndarray  # int64 (N + 1,)
    pixel_fold: np.ndarray  # int8 (P,) (int64 beyond 127 folds): read once per scored move
    folds: np.ndarray  # int64 (N,)
    fold_positives: np.ndarray  # int64 (K,) every labelled positive, dropped ones included
    fold_pixels: np.ndarray  # int64 (K,) every pixel of the fold
    config_histograms: np.ndarray | None  # int64 (C, K, 256, 2) dense counts; None if regrouped
    floor: int
    shape: tuple[int, int]
    image_positives: np.ndarray  # int64 (N,) every labelled positive of each image
    _neighbours: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_folds(self) -> int:
        return len(self.fold_positives)

    @property
    def neighbours(self) -> np.ndarray:
        if self._neighbours is None:
            self._neighbours = levels.neighbour_table(self.image_start, self.positions, *self.shape)
        return self._neighbours


def build_candidates(
    oofs: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, floor: int = DEFAULT_FLOOR
) -> Candidates:
    """One pass over every config's OOF (read in chunks, never as float) -> :class:`Candidates`.

    Args:
        oofs: uint8 ``(N, H, W)`` per config (memmaps are read with ``pread``, so their pages
            do not stay in this process's memory).
        labels: uint8 0/1 ``(N, H, W)``; a file-backed memmap is read like ``oofs``, so
            the labels need not sit in memory either.
        folds: int ``(N,)`` fold of each row, ``0..K-1``.
        floor: uint8 code; pixels where every config is below it are dropped.
    """
    n_images, height, width = labels.shape
    folds = np.asarray(folds, dtype=np.int64)
    n_folds = int(folds.max()) + 1
    hist = np.zeros((len(oofs), n_folds, N_CODES, 2), dtype=np.int64)
    parts = []
    full = _chunk_buffers(len(oofs), min(CHUNK_IMAGES, n_images), height * width)
    bar = tqdm(
        range(0, n_images, CHUNK_IMAGES),
        desc="blend: scan OOF",
        leave=False,
        disable=n_images < 1024,
    )
    for lo in bar:
        hi = min(lo + CHUNK_IMAGES, n_images)
        # a short last chunk gets fresh buffers so every kernel call stays C-contiguous
        # (one compile)
        chunk, chunk_hist, flags, label_chunk = (
            full if hi - lo == len(full[2]) else _chunk_buffers(len(oofs), hi - lo, height * width)
        )
        for c, oof in enumerate(oofs):
            _read_rows(oof, lo, hi, chunk[c])
        _read_rows(labels, lo, hi, label_chunk)
        _scan_chunk(chunk, label_chunk, floor, chunk_hist, flags)
        flags[:, height * width :] = 0
        for k in np.unique(folds[lo:hi]):
            hist[:, k] += chunk_hist[:, folds[lo:hi] == k].sum(axis=1)
        starts = np.concatenate([[0], np.cumsum(flags.sum(axis=1))]).astype(np.int64)
        values, sparse_labels, positions = _gather_chunk(chunk, label_chunk, flags, starts)
        positives = chunk_hist[0, :, :, 1].sum(axis=1)
        parts.append((values, sparse_labels, positions, starts[1:] - starts[:-1], positives))
    return _assemble(parts, folds, hist, floor, (height, width))


def _chunk_buffers(
    n_configs: int, n_images: int, n_pixels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reusable (stack, histograms, flags, labels) buffers for one chunk of images."""
    return (
        np.empty((n_configs, n_images, n_pixels), dtype=np.uint8),
        np.empty((n_configs, n_images, N_CODES, 2), dtype=np.int64),
        np.empty((n_images, n_pixels + (-n_pixels) % 8), dtype=np.uint8),  # padded to whole words
        np.empty((n_images, n_pixels), dtype=np.uint8),
    )


def _assemble(parts, folds, hist, floor, shape) -> Candidates:
    counts = np.concatenate([part[3] for part in parts])
    image_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_folds = hist.shape[1]
    return Candidates(
        values=np.concatenate([part[0] for part in parts], axis=1),
        labels=np.concatenate([part[1] for part in parts]),
        positions=np.concatenate([part[2] for part in parts]),
        image_start=image_start,
        pixel_fold=np.repeat(folds.astype(np.int8 if n_folds <= 127 else np.int64), counts),
        folds=folds,
        fold_positives=hist[0, :, :, 1].sum(axis=1),
        fold_pixels=np.bincount(folds, minlength=n_folds) * shape[0] * shape[1],
        config_histograms=hist,
        floor=int(floor),
        shape=shape,
        image_positives=np.concatenate([part[4] for part in parts]).astype(np.int64),
    )


def regroup(cands: Candidates, folds: np.ndarray) -> Candidates:
    """The same candidate pixels with images assigned to other folds (``folds`` per image).

    The per-config histograms are per fold of the original grouping, so they are dropped.
    """
    folds = np.asarray(folds, dtype=np.int64)
    n_folds = int(folds.max()) + 1
    return replace(
        cands,
        folds=folds,
        pixel_fold=np.repeat(folds, np.diff(cands.image_start)),
        fold_positives=np.bincount(folds, cands.image_positives, n_folds).astype(np.int64),
        fold_pixels=np.bincount(folds, minlength=n_folds) * cands.shape[0] * cands.shape[1],
        config_histograms=None,
    )


def _read_rows(array: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
    """Copy rows ``lo:hi`` into ``out``; a file-backed memmap is read with ``pread``.

    Reading instead of touching the mapping keeps the file's pages out of this process's
    resident memory (the OS page cache still holds them).
    """
    row_bytes = int(np.prod(array.shape[1:]))
    if _is_plain_memmap(array, row_bytes):
        mapped: Any = array  # a np.memmap (checked above): has filename and offset
        with open(mapped.filename, "rb", buffering=0) as fh:
            fh.seek(mapped.offset + lo * row_bytes)
            fh.readinto(memoryview(out.reshape(-1)))  # type: ignore[arg-type]
        return
    out.reshape(hi - lo, -1)[:] = np.asarray(array[lo:hi]).reshape(hi - lo, -1)


def _is_plain_memmap(array: np.ndarray, row_bytes: int) -> bool:
    """A memmap opened on a file (not a view of one), C-ordered, lying inside the file."""
    if (
        not isinstance(array, np.memmap)
        or not isinstance(array.base, mmap.mmap)
        or array.filename is None
    ):
        return False
    end = array.offset + array.shape[0] * row_bytes
    return (
        array.flags.c_contiguous
        and array.dtype == np.uint8
        and end <= os.path.getsize(array.filename)
    )
