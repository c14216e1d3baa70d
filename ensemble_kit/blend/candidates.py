"""The sparse candidate pixels: one chunked pass over every config's OOF.

A pixel where every config is below ``floor`` (a uint8 code) has ``S < floor * W``, so for
thresholds ``>= floor * W`` it is never predicted. Such pixels are dropped once; the labelled
positives among them count as false negatives at every threshold. The remaining sparse
candidate set (a few % of the pixels) is all the search touches.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from ..metrics import N_CODES
from . import sparse
from .kernels import gather_chunk, scan_chunk

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

    @property
    def n_folds(self) -> int:
        return len(self.fold_positives)


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

    Members may be :class:`~ensemble_kit.sparse_oof.SparseCodes`: then every member's codes
    below the sparse floor count as 0 and the floor is at least that (:mod:`.sparse`), and
    when all are sparse only rows where some member stores a pixel are read.
    """
    folds = np.asarray(folds, dtype=np.int64)
    members = sparse.floored(oofs)
    floor = max(floor, sparse.members_floor(oofs))
    active = sparse.active_rows(members)
    if active is None or active.all():
        return _build(members, labels, folds, floor, int(folds.max()) + 1)
    rows = np.flatnonzero(active)
    cands = _build(
        [sparse.Rows(m, rows) for m in members],
        sparse.Rows(labels, rows),
        folds[rows],
        floor,
        int(folds.max()) + 1,
    )
    positives = sparse.inactive_positives(members, labels, ~active)
    return sparse.expand(cands, active, folds, positives)


def _build(oofs: list, labels: Any, folds: np.ndarray, floor: int, n_folds: int) -> Candidates:
    """:func:`build_candidates` on arrays read like dense ones (folds ``0..n_folds-1``)."""
    n_images, height, width = labels.shape
    hist = np.zeros((len(oofs), n_folds, N_CODES, 2), dtype=np.int64)
    parts, pixels = [], height * width
    full = _chunk_buffers(len(oofs), min(CHUNK_IMAGES, n_images), pixels)
    bar = tqdm(
        range(0, n_images, CHUNK_IMAGES),
        desc="blend: scan OOF",
        leave=False,
        disable=n_images < 1024,
    )
    with _RowReader([*oofs, labels]) as reader:
        for lo in bar:
            hi = min(lo + CHUNK_IMAGES, n_images)
            # a short last chunk gets fresh buffers so every kernel call stays C-contiguous
            chunk, chunk_hist, flags, label_chunk = (
                full if hi - lo == len(full[2]) else _chunk_buffers(len(oofs), hi - lo, pixels)
            )
            for c in range(len(oofs)):
                reader.read(c, lo, hi, chunk[c])
            reader.read(len(oofs), lo, hi, label_chunk)
            scan_chunk(chunk, label_chunk, floor, chunk_hist, flags)
            flags[:, pixels:] = 0
            for k in np.unique(folds[lo:hi]):
                hist[:, k] += chunk_hist[:, folds[lo:hi] == k].sum(axis=1)
            starts = np.concatenate([[0], np.cumsum(flags.sum(axis=1))]).astype(np.int64)
            values, sparse_labels, positions = gather_chunk(chunk, label_chunk, flags, starts)
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


class _RowReader:
    """Rows ``lo:hi`` of several ``(N, ...)`` arrays; a file-backed memmap is read with
    ``pread`` from a descriptor opened once.

    Reading instead of touching the mapping keeps the files' pages out of this process's
    resident memory (the OS page cache still holds them). (Asking the OS to prefetch the
    next chunk with ``posix_fadvise`` was tried: no faster from a cold cache here.)
    """

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays: list[Any] = arrays  # memmaps have filename and offset
        self.row_bytes = [int(np.prod(a.shape[1:])) for a in arrays]
        self.fds: dict[int, int] = {}

    def __enter__(self) -> _RowReader:
        for i, (array, row_bytes) in enumerate(zip(self.arrays, self.row_bytes)):
            if _is_plain_memmap(array, row_bytes):
                self.fds[i] = os.open(array.filename, os.O_RDONLY)
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def read(self, index: int, lo: int, hi: int, out: np.ndarray) -> None:
        """Copy rows ``lo:hi`` of array ``index`` into the C-contiguous ``out``."""
        array, row_bytes = self.arrays[index], self.row_bytes[index]
        if index not in self.fds:
            out.reshape(hi - lo, -1)[:] = np.asarray(array[lo:hi]).reshape(hi - lo, -1)
            return
        view, offset = out.reshape(-1).data, array.offset + lo * row_bytes
        while len(view):
            done = os.preadv(self.fds[index], [view], offset)
            if done <= 0:
                raise OSError(f"{array.filename}: short read at byte {offset}")
            view, offset = view[done:], offset + done


def _is_plain_memmap(array: np.ndarray, row_bytes: int) -> bool:
    """A memmap opened on a file (not a view of one), C-ordered, lying inside the file."""
    if (
        not isinstance(array, np.memmap)
        or not isinstance(array.base, mmap.mmap)
        or array.filename is None
    ):
        return False
    end = array.offset + array.shape[0] * row_bytes
    try:
        size = os.path.getsize(array.filename)
    except OSError:  # an unlinked temporary file: read through the mapping instead
        return False
    return array.flags.c_contiguous and array.dtype == np.uint8 and end <= size
