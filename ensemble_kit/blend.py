"""``ek blend --oof``: choose blend weights, threshold and postprocessing on OOF predictions.

The search, on arrays (:func:`search`):

1. Every config alone: global dice at its best threshold, exact over all 256 uint8 codes.
2. Caruana greedy forward selection with replacement: ``steps`` rounds, each adding the
   config whose addition gives the best best-threshold global dice; the best prefix is kept
   and the weights are the integer selection counts, so the blend sum ``S = sum w_i * u_i``
   (``u_i`` the uint8 codes) is an exact integer. Optionally an integer coordinate search
   refines the weights (kept only when it gains on the nested estimate).
3. Threshold of the blend, exact over every integer value of ``S``, jointly with the
   postprocessing (min-pixel: drop whole masks with fewer pixels; min-component: drop
   8-connected components with fewer pixels). Two threshold modes: ``value`` (predict
   ``S >= threshold_sum``) and ``top_fraction`` (mark the top fraction of all pixels of a
   set; the threshold is recomputed on each set it is applied to).
4. Honest estimates: everything above is repeated on K-1 folds and scored on the held-out
   fold (nested, per fold and pooled), and the final choice is applied to the holdout.

Speed: a pixel where every config is below ``floor`` (a uint8 code) has ``S < floor * W``,
so for thresholds ``>= floor * W`` it is never predicted. Such pixels are dropped once; the
labelled positives among them count as false negatives at every threshold. The remaining
sparse candidate set (a few % of the pixels) is all the search touches, and per-fold
histograms of ``(S, label)`` give every threshold's TP/FP/FN as cumulative sums.

File-level API: :func:`run_blend` (writes ``blend.json`` and a report), :func:`verify_blend`
and :func:`apply_blend`, the one code path that submission also uses.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import pandas as pd
from numba import njit, prange
from tqdm import tqdm

from . import postprocess
from .errors import EkError
from .metrics import N_CODES, best_from_counts, dice_from_counts, sweep_from_histogram

log = logging.getLogger(__name__)

DEFAULT_FLOOR = 13  # uint8 code of p = 0.05: blend thresholds below 5 % are not searched
MIN_PIXELS_GRID = (0, 5, 10, 20, 50, 100, 200)
MIN_COMPONENT_GRID = (0, 2, 3, 5, 10, 20)
CHUNK_IMAGES = 64
REFINE_SCALE = 4
REFINE_ROUNDS = 30


# ----------------------------------------------------------------------------- candidates


@dataclass
class Candidates:
    """The sparse candidate pixels: every pixel where some config reaches ``floor``."""

    values: np.ndarray  # uint8 (C, P) codes of every config
    labels: np.ndarray  # uint8 (P,)
    positions: np.ndarray  # int32 (P,) raster position r * W + c, ascending per image
    image_start: np.ndarray  # int64 (N + 1,)
    pixel_fold: np.ndarray  # int64 (P,)
    folds: np.ndarray  # int64 (N,)
    fold_positives: np.ndarray  # int64 (K,) every labelled positive, dropped ones included
    fold_pixels: np.ndarray  # int64 (K,) every pixel of the fold
    config_histograms: np.ndarray  # int64 (C, K, 256, 2) dense (code, label) counts per fold
    floor: int
    shape: tuple[int, int]
    _neighbours: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_folds(self) -> int:
        return len(self.fold_positives)

    @property
    def neighbours(self) -> np.ndarray:
        if self._neighbours is None:
            self._neighbours = postprocess.neighbour_table(self.image_start, self.positions, *self.shape)
        return self._neighbours


@njit(cache=True, parallel=True)
def _scan_chunk(stack: np.ndarray, labels: np.ndarray, floor: int, hist: np.ndarray, flags: np.ndarray) -> None:
    """Dense pass over a chunk ``(C, B, HW)``: per-image histograms and candidate flags.

    Writes ``hist`` int64 ``(C, B, 256, 2)`` and ``flags`` uint8 ``(B, >= HW)`` (reused buffers).
    Codes are first counted without labels in a small table that stays in L1 cache; the
    rare labelled positives are then moved to the label-1 column.
    """
    n_configs, n_images, n_pixels = stack.shape
    for i in prange(n_images):
        counts = np.zeros((n_configs, N_CODES), dtype=np.int32)
        for p in range(n_pixels):
            top = 0
            for c in range(n_configs):
                v = stack[c, i, p]
                counts[c, v] += 1
                top = max(top, v)
            flags[i, p] = top >= floor
        hist[:, i, :, 0] = counts
        hist[:, i, :, 1] = 0
        for p in range(n_pixels):
            if labels[i, p]:
                for c in range(n_configs):
                    hist[c, i, stack[c, i, p], 1] += 1
                    hist[c, i, stack[c, i, p], 0] -= 1


@njit(cache=True, parallel=True)
def _gather_chunk(stack, labels, flags, starts):
    """Values, labels and positions of the flagged pixels of a chunk, in (image, raster) order.

    ``flags`` is uint8 ``(B, HW)`` with ``HW`` a multiple of 8: eight flags are tested at
    once, so the mostly-empty images cost little beyond one read of their flags.
    """
    n_configs, n_images, n_pixels = stack.shape
    total = starts[-1]
    values = np.empty((n_configs, total), dtype=np.uint8)
    sparse_labels = np.empty(total, dtype=np.uint8)
    positions = np.empty(total, dtype=np.int32)
    for i in prange(n_images):
        k = starts[i]
        words = flags[i].view(np.uint64)
        for w in range(words.shape[0]):
            if words[w] == 0:
                continue
            for p in range(8 * w, 8 * w + 8):
                if flags[i, p]:
                    for c in range(n_configs):
                        values[c, k] = stack[c, i, p]
                    sparse_labels[k] = 1 if labels[i, p] else 0
                    positions[k] = p
                    k += 1
    return values, sparse_labels, positions


def build_candidates(oofs: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, floor: int = DEFAULT_FLOOR) -> Candidates:
    """One pass over every config's OOF (read in chunks, never as float) -> :class:`Candidates`.

    Args:
        oofs: uint8 ``(N, H, W)`` per config (memmaps are read with ``pread``, so their pages
            do not stay in this process's memory).
        labels: uint8 0/1 ``(N, H, W)``.
        folds: int ``(N,)`` fold of each row, ``0..K-1``.
        floor: uint8 code; pixels where every config is below it are dropped.
    """
    n_images, height, width = labels.shape
    folds = np.asarray(folds, dtype=np.int64)
    n_folds = int(folds.max()) + 1
    hist = np.zeros((len(oofs), n_folds, N_CODES, 2), dtype=np.int64)
    parts = []
    full = _chunk_buffers(len(oofs), min(CHUNK_IMAGES, n_images), height * width)
    bar = tqdm(range(0, n_images, CHUNK_IMAGES), desc="blend: scan OOF", leave=False, disable=n_images < 1024)
    for lo in bar:
        hi = min(lo + CHUNK_IMAGES, n_images)
        # a short last chunk gets fresh buffers so every kernel call stays C-contiguous (one compile)
        chunk, chunk_hist, flags = full if hi - lo == len(full[2]) else _chunk_buffers(len(oofs), hi - lo, height * width)
        for c, oof in enumerate(oofs):
            _read_rows(oof, lo, hi, chunk[c])
        label_chunk = np.ascontiguousarray(labels[lo:hi]).reshape(hi - lo, -1)
        _scan_chunk(chunk, label_chunk, floor, chunk_hist, flags)
        flags[:, height * width :] = 0
        for k in np.unique(folds[lo:hi]):
            hist[:, k] += chunk_hist[:, folds[lo:hi] == k].sum(axis=1)
        starts = np.concatenate([[0], np.cumsum(flags.sum(axis=1))]).astype(np.int64)
        values, sparse_labels, positions = _gather_chunk(chunk, label_chunk, flags, starts)
        parts.append((values, sparse_labels, positions, starts[1:] - starts[:-1]))
    return _assemble(parts, folds, hist, floor, (height, width))


def _chunk_buffers(n_configs: int, n_images: int, n_pixels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reusable (stack, histograms, flags) buffers for one chunk of images."""
    return (
        np.empty((n_configs, n_images, n_pixels), dtype=np.uint8),
        np.empty((n_configs, n_images, N_CODES, 2), dtype=np.int64),
        np.empty((n_images, n_pixels + (-n_pixels) % 8), dtype=np.uint8),  # padded to whole words
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
        pixel_fold=np.repeat(folds, counts),
        folds=folds,
        fold_positives=hist[0, :, :, 1].sum(axis=1),
        fold_pixels=np.bincount(folds, minlength=n_folds) * shape[0] * shape[1],
        config_histograms=hist,
        floor=int(floor),
        shape=shape,
    )


def _read_rows(array: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
    """Copy rows ``lo:hi`` into ``out``; a file-backed memmap is read with ``pread``.

    Reading instead of touching the mapping keeps the file's pages out of this process's
    resident memory (the OS page cache still holds them).
    """
    row_bytes = int(np.prod(array.shape[1:]))
    if _is_plain_memmap(array, row_bytes):
        with open(array.filename, "rb") as fh:
            fh.seek(array.offset + lo * row_bytes)
            fh.readinto(memoryview(out.reshape(-1)))
        return
    out.reshape(hi - lo, -1)[:] = np.asarray(array[lo:hi]).reshape(hi - lo, -1)


def _is_plain_memmap(array: np.ndarray, row_bytes: int) -> bool:
    """A memmap opened on a file (not a view of one), C-ordered, lying inside the file."""
    if not isinstance(array, np.memmap) or not isinstance(array.base, mmap.mmap) or array.filename is None:
        return False
    end = array.offset + array.shape[0] * row_bytes
    return array.flags.c_contiguous and array.dtype == np.uint8 and end <= os.path.getsize(array.filename)


# ----------------------------------------------------------------------------- scoring


@njit(cache=True, parallel=True)
def weighted_sum(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Blend sum ``S[p] = sum_c weights[c] * values[c, p]`` as int32 ``(P,)``."""
    n_configs, n_pixels = values.shape
    sums = np.zeros(n_pixels, dtype=np.int32)
    for p in prange(n_pixels):
        total = 0
        for c in range(n_configs):
            total += weights[c] * values[c, p]
        sums[p] = total
    return sums


@njit(cache=True)
def _best_per_set(hist, fold_positives, lowest):
    """Best threshold ``>= lowest`` of the whole set and of each leave-one-fold-out set.

    Args:
        hist: int64 ``(K, n_values, 2)`` per-fold counts of (value, label).
        fold_positives: int64 ``(K,)`` all positives per fold (dropped pixels included).
        lowest: Smallest threshold searched; ``n_values`` means "predict nothing".

    Returns:
        ``(dice, threshold)`` of shape ``(K + 1,)``: index 0 all folds, ``k + 1`` without fold k.
    """
    n_folds, n_values, _ = hist.shape
    best_dice = np.full(n_folds + 1, -1.0)
    best_t = np.zeros(n_folds + 1, dtype=np.int64)
    above = np.zeros((n_folds, 2), dtype=np.int64)
    total_positives = fold_positives.sum()
    for t in range(n_values, lowest - 1, -1):
        if t < n_values:
            for k in range(n_folds):
                above[k, 0] += hist[k, t, 0]
                above[k, 1] += hist[k, t, 1]
        tp_all, fp_all = above[:, 1].sum(), above[:, 0].sum()
        for s in range(n_folds + 1):
            tp, fp, positives = tp_all, fp_all, total_positives
            if s > 0:
                tp, fp, positives = tp - above[s - 1, 1], fp - above[s - 1, 0], positives - fold_positives[s - 1]
            denominator = 2.0 * tp + fp + (positives - tp)
            dice = 2.0 * tp / denominator if denominator > 0 else 1.0
            if dice >= best_dice[s]:  # scanning down, so ties go to the smallest threshold
                best_dice[s], best_t[s] = dice, t
    return best_dice, best_t


def best_per_set_reference(hist, fold_positives, lowest):
    """Numpy reference of :func:`_best_per_set`."""
    dice, thresholds = [], []
    for s in range(len(fold_positives) + 1):
        keep = np.arange(len(fold_positives)) != s - 1
        tp, fp, fn = sweep_from_histogram(hist[keep].sum(axis=0))
        threshold, best = best_from_counts(tp, fp, fn + int(fold_positives[keep].sum()) - int(hist[keep, :, 1].sum()), lowest)
        dice.append(best)
        thresholds.append(threshold)
    return np.array(dice), np.array(thresholds)


@njit(cache=True, parallel=True)
def _score_moves(bases, values, move_base, move_config, move_sign, move_lowest, labels, pixel_fold, fold_positives, n_values, scratch):
    """Best-threshold dice per set of each move ``bases[b] + sign * values[config]``.

    Thresholds of move ``m`` are searched from ``move_lowest[m]`` (its floor) up.
    ``scratch`` is int64 ``(T, >= K * n_values * 2)``: one reused histogram per worker, so
    no call pays the page faults of fresh allocations.
    """
    n_moves, n_folds = move_base.shape[0], fold_positives.shape[0]
    dice = np.zeros((n_moves, n_folds + 1))
    thresholds = np.zeros((n_moves, n_folds + 1), dtype=np.int64)
    n_workers = scratch.shape[0]
    for worker in prange(n_workers):
        hist = scratch[worker, : n_folds * n_values * 2].reshape((n_folds, n_values, 2))
        for m in range(worker, n_moves, n_workers):
            hist[:] = 0
            base, config, sign = bases[move_base[m]], move_config[m], move_sign[m]
            for p in range(labels.shape[0]):
                hist[pixel_fold[p], base[p] + sign * values[config, p], labels[p]] += 1
            dice[m], thresholds[m] = _best_per_set(hist, fold_positives, move_lowest[m])
    return dice, thresholds


@njit(cache=True)
def fold_histograms(levels, labels, pixel_fold, n_folds, n_values):
    """Per-fold counts of (level, label) for levels ``>= 0``: int64 ``(K, n_values, 2)``."""
    hist = np.zeros((n_folds, n_values, 2), dtype=np.int64)
    for p in range(levels.shape[0]):
        if levels[p] >= 0:
            hist[pixel_fold[p], levels[p], labels[p]] += 1
    return hist


class Scorer:
    """Best-threshold dice of integer weight vectors on every set, memoised by weights.

    The whole set and each leave-one-fold-out set are scored in one pass, so the K + 1
    greedy runs of a nested search share every evaluation they have in common.
    """

    def __init__(self, cands: Candidates):
        self.cands = cands
        self.cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        self.sums: dict[tuple[int, ...], np.ndarray] = {}  # recent blend sums, reused by the next step
        self.scratch: np.ndarray | None = None

    def moves(self, bases: list[np.ndarray], moves: list[tuple[int, int, int]]) -> list[tuple]:
        """Scores of ``bases[b] + sign * e_config`` for each ``(b, config, sign)`` move."""
        keys = [tuple(bases[b] + sign * np.eye(len(bases[b]), dtype=np.int64)[c]) for b, c, sign in moves]
        todo = {key: move for key, move in zip(keys, moves) if key not in self.cache}
        if todo:
            self._evaluate(bases, list(todo), list(todo.values()))
        return [self.cache[key] for key in keys]

    def _scratch(self, n_values: int) -> np.ndarray:
        size = self.cands.n_folds * n_values * 2
        if self.scratch is None or self.scratch.shape[1] < size:
            self.scratch = np.zeros((numba.get_num_threads(), 2 * size), dtype=np.int64)
        return self.scratch

    def blend_sums(self, weights: np.ndarray) -> np.ndarray:
        """``S`` of the candidate pixels: from a cached parent one config away, else in full."""
        key = tuple(int(w) for w in weights)
        if key not in self.sums:
            parents = [(c, key[:c] + (key[c] - 1,) + key[c + 1 :]) for c in range(len(key)) if key[c] > 0]
            found = [(c, parent) for c, parent in parents if parent in self.sums]
            if found:
                c, parent = found[0]
                self.sums[key] = self.sums[parent] + self.cands.values[c]
            else:
                self.sums[key] = weighted_sum(self.cands.values, np.asarray(weights, dtype=np.int64))
            while len(self.sums) > 4 * (self.cands.n_folds + 1):
                self.sums.pop(next(iter(self.sums)))
        return self.sums[key]

    def _evaluate(self, bases, keys, moves) -> None:
        cands = self.cands
        used = sorted({b for b, _, _ in moves})
        base_sums = np.stack([self.blend_sums(bases[b]) for b in used])
        move_base = np.array([used.index(b) for b, _, _ in moves], dtype=np.int64)
        move_config, move_sign = (np.array(col, dtype=np.int64) for col in list(zip(*moves))[1:])
        totals = np.array([sum(key) for key in keys], dtype=np.int64)
        n_values = 255 * int(totals.max()) + 1
        dice, thresholds = _score_moves(
            base_sums, cands.values, move_base, move_config, move_sign, cands.floor * totals,
            cands.labels, cands.pixel_fold, cands.fold_positives, n_values, self._scratch(n_values),
        )
        for i, key in enumerate(keys):
            self.cache[key] = (dice[i], thresholds[i])


# ----------------------------------------------------------------------------- weights


def greedy_paths(scorer: Scorer, steps: int) -> list[list[tuple[int, float]]]:
    """Caruana forward selection with replacement, run on every set at once.

    Returns:
        Per set (0: all folds, ``k + 1``: without fold k) the ``(config, dice)`` of each step.
    """
    n_configs, n_sets = scorer.cands.values.shape[0], scorer.cands.n_folds + 1
    counts = [np.zeros(n_configs, dtype=np.int64) for _ in range(n_sets)]
    paths: list[list[tuple[int, float]]] = [[] for _ in range(n_sets)]
    for _ in range(steps):
        bases, index = _unique_rows(counts)
        scores = scorer.moves(bases, [(b, c, 1) for b in range(len(bases)) for c in range(n_configs)])
        for s in range(n_sets):
            options = [scores[index[s] * n_configs + c][0][s] for c in range(n_configs)]
            best = int(np.argmax(options))
            counts[s] = counts[s] + np.eye(n_configs, dtype=np.int64)[best]
            paths[s].append((best, float(options[best])))
    return paths


def best_prefix_weights(path: list[tuple[int, float]], n_configs: int) -> np.ndarray:
    """Selection counts of the best-scoring prefix of a greedy path (shortest on ties)."""
    stop = int(np.argmax([dice for _, dice in path])) + 1
    return np.bincount([config for config, _ in path[:stop]], minlength=n_configs).astype(np.int64)


def refine_weights(scorer: Scorer, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Integer coordinate search from ``REFINE_SCALE * weights``: +-1 moves while they gain.

    Every set ``s`` refines its own ``weights[s]`` on its own data.
    """
    current = [w * REFINE_SCALE for w in weights]
    score = [scorer.moves([w], [(0, 0, 0)])[0][0][s] for s, w in enumerate(current)]
    active = list(range(len(current)))
    for _ in range(REFINE_ROUNDS):
        if not active:
            break
        bases, index = _unique_rows([current[s] for s in active])
        moves = [(b, c, sign) for b, w in enumerate(bases) for c in range(len(w)) for sign in (1, -1)
                 if w[c] + sign >= 0 and w.sum() + sign > 0]
        results = scorer.moves(bases, moves)
        still = []
        for s, b in zip(active, index):
            options = [(results[m][0][s], m) for m, move in enumerate(moves) if move[0] == b]
            gain, m = max(options, key=lambda pair: (pair[0], -pair[1]))
            if gain > score[s] + 1e-12:
                _, c, sign = moves[m]
                current[s] = current[s] + sign * np.eye(len(current[s]), dtype=np.int64)[c]
                score[s] = gain
                still.append(s)
        active = still
    return [w // np.gcd.reduce(w[w > 0]) for w in current]


def _unique_rows(rows: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    keys = [tuple(row) for row in rows]
    unique = list(dict.fromkeys(keys))
    return [np.array(key, dtype=np.int64) for key in unique], [unique.index(key) for key in keys]


# ----------------------------------------------------------------------------- threshold


@dataclass
class Choice:
    """Weights, threshold and postprocessing chosen on one set, with its per-fold counts."""

    weights: np.ndarray
    threshold_sum: int
    top_fraction: float
    min_pixels: int
    min_component: int
    dice: float
    table: np.ndarray  # dice of every (min_pixels, min_component) pair on the set
    grids: tuple[tuple[int, ...], tuple[int, ...]]  # the (min_pixels, min_component) values tried
    levels_hist: np.ndarray  # (K, n_values, 2) counts of the chosen levels
    sums_hist: np.ndarray  # (K, n_values) counts of the raw blend sums


@dataclass
class Tables:
    """Every (min_pixels, min_component) pair of one weight vector, scored on every set."""

    dice: np.ndarray  # (n_pixel_grid, n_component_grid, K + 1)
    thresholds: np.ndarray  # same shape: the best threshold_sum of each
    levels_hist: np.ndarray  # (n_pixel_grid, n_component_grid, K, n_values, 2)
    sums_hist: np.ndarray  # (K, n_values) counts of the raw blend sums


def threshold_tables(cands: Candidates, weights: np.ndarray, pixel_grid, component_grid) -> Tables:
    """Exact best threshold of every postprocessing pair on every set."""
    sums = weighted_sum(cands.values, weights).astype(np.int64)
    total = int(weights.sum())
    lowest, n_values = cands.floor * total, 255 * total + 1
    order = postprocess.descending_order(sums, cands.image_start)
    cuts = np.stack([postprocess.min_pixel_levels(sums, cands.image_start, order, n) for n in pixel_grid])
    hists = _pair_histograms(sums, cands.image_start, cuts, _component_cuts(sums, cands, order, component_grid),
                             cands.labels, cands.pixel_fold, cands.n_folds, n_values)
    shape = (len(pixel_grid), len(component_grid), cands.n_folds + 1)
    dice, thresholds = np.zeros(shape), np.zeros(shape, dtype=np.int64)
    for i, j in np.ndindex(*shape[:2]):
        dice[i, j], thresholds[i, j] = _best_per_set(hists[i, j], cands.fold_positives, lowest)
    sums_hist = fold_histograms(sums, cands.labels, cands.pixel_fold, cands.n_folds, n_values).sum(axis=2)
    return Tables(dice, thresholds, hists, sums_hist)


@njit(cache=True, parallel=True)
def _pair_histograms(sums, image_start, cuts, taus, labels, pixel_fold, n_folds, n_values):
    """Per (min-pixel, min-component) pair, per-fold counts of (level, label).

    The level of a pixel is ``min(sum, cuts[a, image], taus[b, pixel])``: the highest
    threshold at which it survives the pair. Returns int64 ``(A, B, K, n_values, 2)``.
    """
    n_cuts, n_taus = cuts.shape[0], taus.shape[0]
    hist = np.zeros((n_cuts, n_taus, n_folds, n_values, 2), dtype=np.int64)
    for pair in prange(n_cuts * n_taus):
        a, b = pair // n_taus, pair % n_taus
        for i in range(image_start.shape[0] - 1):
            cut = cuts[a, i]
            for p in range(image_start[i], image_start[i + 1]):
                level = min(sums[p], cut, taus[b, p])
                if level >= 0:
                    hist[a, b, pixel_fold[p], level, labels[p]] += 1
    return hist


def _component_cuts(sums, cands, order, component_grid) -> np.ndarray:
    """Per min-component value, each pixel's component level (the sum itself when off)."""
    taus = np.empty((len(component_grid), len(sums)), dtype=np.int64)
    sizes = [m for m in component_grid if m > 1]
    levels = postprocess.component_levels(sums, cands.image_start, order, cands.neighbours, np.array(sizes, dtype=np.int64)) if sizes else None
    for j, m in enumerate(component_grid):
        taus[j] = levels[sizes.index(m)] if m > 1 else sums
    return taus


def choose_threshold(cands: Candidates, weights: np.ndarray, set_index: int, pixel_grid, component_grid,
                     tables: Tables | None = None) -> Choice:
    """Exact best threshold jointly with min-pixel and min-component on one set.

    A postprocessing value is kept only when it strictly improves the set's dice (pairs are
    tried from (0, 0) in grid order).
    """
    tables = tables or threshold_tables(cands, weights, pixel_grid, component_grid)
    table = tables.dice[:, :, set_index]
    best = (0, 0)
    for i, j in np.ndindex(*table.shape):
        if table[i, j] > table[best] + 1e-12:
            best = (i, j)
    threshold = int(tables.thresholds[best][set_index])
    in_set = _set_folds(cands.n_folds, set_index)
    fraction = tables.sums_hist[in_set, threshold:].sum() / cands.fold_pixels[in_set].sum()
    return Choice(weights, threshold, float(fraction), int(pixel_grid[best[0]]), int(component_grid[best[1]]),
                  float(table[best]), table, (tuple(pixel_grid), tuple(component_grid)),
                  tables.levels_hist[best], tables.sums_hist)


def _set_folds(n_folds: int, set_index: int) -> np.ndarray:
    return np.arange(n_folds) != set_index - 1


def top_fraction_threshold(counts: np.ndarray, fraction: float) -> int:
    """Smallest threshold that marks at most ``fraction`` of all pixels positive.

    Args:
        counts: A 1-d histogram of blend sums (``counts[v]`` = pixels with sum ``v``), e.g.
            summed :func:`blend_histogram` over test batches; or an array of blend sums of
            any other shape, which is histogrammed first.
        fraction: Fraction of all pixels to mark, e.g. 0.0016.

    Returns:
        ``t`` such that ``count(S >= t) <= fraction * total`` and ``t`` is the smallest such
        value; ``len(counts)`` (predict nothing) when even the largest value is too many.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1:
        counts = np.bincount(counts.ravel().astype(np.int64))
    at_or_above = np.append(np.cumsum(counts[::-1])[::-1], 0)
    limit = np.floor(fraction * at_or_above[0] + 1e-6)
    return int(np.argmax(at_or_above <= limit))


def heldout_counts(choice: Choice, fold: int, mode: str, lowest: int, fold_pixels: int, fold_positives: int) -> tuple[int, int, int]:
    """TP, FP, FN of a choice on one fold's pixels, in ``value`` or ``top_fraction`` mode."""
    threshold = choice.threshold_sum
    if mode == "top_fraction":
        counts = choice.sums_hist[fold].copy()
        counts[0] += fold_pixels - counts.sum()  # dropped pixels lie below the floor
        threshold = top_fraction_threshold(counts, choice.top_fraction)
        if threshold < lowest:
            log.warning("top fraction %.5f reaches below the search floor; clamped", choice.top_fraction)
            threshold = lowest
    hist = choice.levels_hist[fold, threshold:]
    tp, fp = int(hist[:, 1].sum()), int(hist[:, 0].sum())
    return tp, fp, fold_positives - tp


# ----------------------------------------------------------------------------- search


@dataclass
class Nested:
    """The choices of every set (0: all folds, ``k + 1``: without fold k) and their scores."""

    choices: list[Choice]
    path: list[tuple[int, float]]
    counts: dict[str, np.ndarray]  # mode -> (K, 3) held-out TP, FP, FN per fold
    refined: bool

    def pooled(self, mode: str) -> float:
        return dice_from_counts(*self.counts[mode].sum(axis=0))

    def per_fold(self, mode: str) -> list[float]:
        return [dice_from_counts(*row) for row in self.counts[mode]]


@dataclass
class SearchResult:
    """The final choice, how it was reached, and every score the report shows."""

    names: list[str]
    choice: Choice
    mode: str
    nested: Nested
    per_config: dict[str, dict]
    floor: int
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (threshold probabilities, dice)
    per_fold: list[float]  # the final choice's dice on each fold (optimistic)

    @property
    def weight_total(self) -> int:
        return int(self.choice.weights.sum())

    @property
    def threshold(self) -> float:
        return self.choice.threshold_sum / (255.0 * self.weight_total)


def search(
    oofs: list[np.ndarray],
    labels: np.ndarray,
    folds: np.ndarray,
    steps: int = 25,
    refine: bool = False,
    names: list[str] | None = None,
    floor: int = DEFAULT_FLOOR,
    min_pixels_grid: tuple[int, ...] = MIN_PIXELS_GRID,
    min_component_grid: tuple[int, ...] = MIN_COMPONENT_GRID,
) -> SearchResult:
    """Choose weights, threshold mode and postprocessing on OOF arrays (see module docstring).

    Args:
        oofs: uint8 ``(N, H, W)`` OOF codes per config (memmaps welcome).
        labels: uint8 0/1 ``(N, H, W)``.
        folds: int ``(N,)`` fold of each row, ``0..K-1`` (K >= 2).
        steps: Greedy selection rounds.
        refine: Also try an integer coordinate search of the weights; kept when it gains
            on the pooled nested estimate.
        names: Config names (default ``config_0``, ...).
        floor: uint8 code below which pixels are never predicted (blend thresholds are
            searched from ``floor / 255`` up).
        min_pixels_grid: Min-pixel values tried (0 is always tried).
        min_component_grid: Min-component values tried (0 is always tried).

    Returns:
        A :class:`SearchResult`.
    """
    names = names or [f"config_{i}" for i in range(len(oofs))]
    _check_arrays(oofs, labels, folds)
    cands = build_candidates(oofs, labels, folds, floor)
    log.info("blend: %d candidate pixels of %d", len(cands.labels), int(cands.fold_pixels.sum()))
    grids = (_with_zero(min_pixels_grid), _with_zero(min_component_grid))
    scorer = Scorer(cands)
    nested = nested_search(scorer, steps, False, grids)
    if refine:
        refined = nested_search(scorer, steps, True, grids)
        if max(map(refined.pooled, refined.counts)) > max(map(nested.pooled, nested.counts)):
            nested = refined
    mode = "top_fraction" if nested.pooled("top_fraction") > nested.pooled("value") else "value"
    per_config = per_config_scores(cands, names)
    choice = nested.choices[0]
    curves = dice_curves(cands, names, choice)
    per_fold = [
        dice_from_counts(*heldout_counts(choice, k, "value", 0, 0, int(cands.fold_positives[k])))
        for k in range(cands.n_folds)
    ]
    return SearchResult(names, choice, mode, nested, per_config, cands.floor, curves, per_fold)


def nested_search(scorer: Scorer, steps: int, refine: bool, grids) -> Nested:
    """Greedy (+ refinement) and threshold choice on every set; held-out counts per fold."""
    cands = scorer.cands
    paths = greedy_paths(scorer, steps)
    weights = [best_prefix_weights(path, cands.values.shape[0]) for path in paths]
    if refine:
        weights = refine_weights(scorer, weights)
    tables: dict[tuple[int, ...], Tables] = {}  # sets that chose the same weights share them
    for w in weights:
        if tuple(w) not in tables:
            tables[tuple(w)] = threshold_tables(cands, w, *grids)
    choices = [choose_threshold(cands, w, s, *grids, tables[tuple(w)]) for s, w in enumerate(weights)]
    counts = {}
    for mode in ("value", "top_fraction"):
        counts[mode] = np.array([
            heldout_counts(choices[k + 1], k, mode, cands.floor * int(choices[k + 1].weights.sum()),
                           int(cands.fold_pixels[k]), int(cands.fold_positives[k]))
            for k in range(cands.n_folds)
        ])
    return Nested(choices, paths[0], counts, refine)


def per_config_scores(cands: Candidates, names: list[str]) -> dict[str, dict]:
    """Each config alone, exact over all 256 codes: pooled, per-fold and nested dice."""
    scores = {}
    for name, hist in zip(names, cands.config_histograms):
        dice, thresholds = _best_per_set(hist, hist[:, :, 1].sum(axis=1), 0)
        nested = np.array([_counts_at(hist[k], thresholds[k + 1]) for k in range(len(hist))])
        scores[name] = {
            "dice": float(dice[0]),
            "threshold": float(thresholds[0] / 255.0),
            "threshold_code": int(thresholds[0]),
            "per_fold": [dice_from_counts(*_counts_at(h, thresholds[0])) for h in hist],
            "nested": dice_from_counts(*nested.sum(axis=0)),
        }
    return scores


def dice_curves(cands: Candidates, names: list[str], choice: Choice) -> dict:
    """Dice against probability threshold: each config (all codes) and the final blend."""
    curves = {}
    for name, hist in zip(names, cands.config_histograms):
        curves[name] = (np.arange(N_CODES) / 255.0, dice_from_counts(*sweep_from_histogram(hist.sum(axis=0))))
    total = int(choice.weights.sum())
    tp, fp, fn = sweep_from_histogram(choice.levels_hist.sum(axis=0))
    fn = fn + int(cands.fold_positives.sum()) - int(choice.levels_hist[:, :, 1].sum())
    lowest = cands.floor * total
    curves["blend"] = (np.arange(lowest, len(tp)) / (255.0 * total), dice_from_counts(tp, fp, fn)[lowest:])
    return curves


def _counts_at(hist: np.ndarray, threshold: int) -> tuple[int, int, int]:
    tp, fp = int(hist[threshold:, 1].sum()), int(hist[threshold:, 0].sum())
    return tp, fp, int(hist[:, 1].sum()) - tp


def _with_zero(grid) -> tuple[int, ...]:
    return tuple(sorted({0, *map(int, grid)}))


def _check_arrays(oofs, labels, folds) -> None:
    if not oofs:
        raise EkError("nothing to blend: the pool of configs is empty")
    for i, oof in enumerate(oofs):
        if oof.dtype != np.uint8 or oof.shape != labels.shape:
            raise EkError(f"config {i}: OOF {oof.dtype} {oof.shape} does not match labels {labels.shape}")
    folds = np.asarray(folds)
    if folds.shape != (labels.shape[0],) or folds.min() < 0 or len(np.unique(folds)) < 2:
        raise EkError(f"folds: need one fold >= 0 per OOF row and at least 2 folds, got {np.unique(folds)}")
    if not np.asarray(labels).any():
        raise EkError("every OOF label is empty: there is nothing to fit a threshold to")


# ----------------------------------------------------------------------------- apply


def blend_sums(blend: dict, probs: dict[str, np.ndarray]) -> np.ndarray:
    """Integer blend sum ``sum_i w_i * u_i`` of uint8 ``(B, H, W)`` codes: int32 ``(B, H, W)``."""
    sums = None
    for name, weight in blend["configs"].items():
        if name not in probs:
            raise EkError(f"blend.json: config '{name}' has weight {weight} but no probabilities were given")
        codes = np.asarray(probs[name])
        if codes.dtype != np.uint8 or (sums is not None and codes.shape != sums.shape):
            raise EkError(f"{name}: expected uint8 codes shaped like the others, got {codes.dtype} {codes.shape}")
        term = codes.astype(np.int32) * np.int32(weight)
        sums = term if sums is None else sums + term
    if sums is None:
        raise EkError("blend.json: no config has a non-zero weight")
    return sums


def blend_histogram(blend: dict, probs: dict[str, np.ndarray]) -> np.ndarray:
    """Counts of each blend sum value ``0..255 * sum(w)``, for :func:`top_fraction_threshold`.

    Sum the histograms of every batch of a test set before taking the threshold.
    """
    size = 255 * sum(blend["configs"].values()) + 1
    return np.bincount(blend_sums(blend, probs).ravel(), minlength=size).astype(np.int64)


def apply_blend(blend: dict, probs: dict[str, np.ndarray], threshold_sum: int | None = None) -> np.ndarray:
    """The blend's binary masks: weighted sum, threshold, min-pixel, min-component.

    Args:
        blend: The ``blend.json`` dict.
        probs: uint8 ``(B, H, W)`` codes per config name (every weighted config).
        threshold_sum: Threshold on the integer sum; default ``blend["threshold_sum"]``. In
            ``top_fraction`` mode pass the threshold of the whole set being predicted
            (:func:`top_fraction_threshold` of the summed :func:`blend_histogram`).

    Returns:
        bool ``(B, H, W)``.
    """
    threshold = blend["threshold_sum"] if threshold_sum is None else int(threshold_sum)
    predicted = blend_sums(blend, probs) >= threshold
    predicted = postprocess.apply_min_pixels(predicted, int(blend["min_pixels"]))
    return postprocess.remove_small_components_batch(predicted, int(blend["min_component"]))


# ----------------------------------------------------------------------------- files


def run_blend(
    layout,
    data_root: Path | None = None,
    configs: list[str] | None = None,
    steps: int = 25,
    refine: bool = False,
) -> dict:
    """``ek blend --oof``: search on every finished config's OOF, write blend.json and a report.

    Args:
        layout: The workdir :class:`~ensemble_kit.layout.Layout`.
        data_root: Kaggle data folder with the labels; default: ``splits.json``'s data_root.
        configs: Config names to pool; default every config with a ``summary.json``.
        steps: Greedy selection rounds.
        refine: Try an integer coordinate refinement of the weights.

    Returns:
        The blend dict, as written to ``layout.blend_json``.
    """
    from . import report
    from .files import write_json

    pool = _read_pool(layout, configs)
    splits = _read_splits(layout)
    data_root = Path(data_root) if data_root is not None else _splits_data_root(layout)
    first = pool[0]
    labels = _load_labels(layout, data_root, first.ids, splits)
    log.info("blend: %d configs, %d OOF records", len(pool), len(first.ids))
    result = search([o.probs for o in pool], labels, first.folds, steps, refine, [o.name for o in pool])
    blend = blend_dict(result, first.folds, _digests(layout, pool))
    blend["scores"]["holdout"] = _holdout_dice(layout, data_root, blend, pool, splits)
    write_json(layout.blend_json, blend)
    report.write_blend_report(layout.blend_report_dir, blend, result.curves)
    log.info("blend: wrote %s (nested dice %.4f)", layout.blend_json, blend["scores"]["nested"]["pooled"])
    return blend


def blend_dict(result: SearchResult, folds: np.ndarray, digests: dict) -> dict:
    """The ``blend.json`` content of a search result."""
    choice, names = result.choice, result.names
    scores = {
        "per_config": result.per_config,
        "blend_oof": choice.dice,
        "blend_oof_per_fold": result.per_fold,
        "blend_oof_no_postprocess": float(choice.table[0, 0]),
        "nested": {
            "per_fold": result.nested.per_fold(result.mode),
            "pooled": result.nested.pooled(result.mode),
            "value": result.nested.pooled("value"),
            "top_fraction": result.nested.pooled("top_fraction"),
        },
        "holdout": None,
        "best_single": max(result.per_config, key=lambda n: result.per_config[n]["nested"]),
        "selection_path": [{"step": i + 1, "config": names[c], "dice": d} for i, (c, d) in enumerate(result.nested.path)],
        "min_pixels_curve": {str(n): float(d) for n, d in zip(choice.grids[0], choice.table.max(axis=1))},
        "refined": result.nested.refined,
        "oof_top_fraction": choice.top_fraction,
        "search_floor": result.floor / 255.0,
        "n_records": int(len(folds)),
    }
    return {
        "configs": {name: int(w) for name, w in zip(names, choice.weights) if w > 0},
        "threshold_mode": result.mode,
        "threshold_sum": int(choice.threshold_sum),
        "threshold": result.threshold,
        "top_fraction": choice.top_fraction if result.mode == "top_fraction" else None,
        "min_pixels": choice.min_pixels,
        "min_component": choice.min_component,
        "scores": scores,
        "digests": digests,
    }


def verify_blend(layout) -> dict:
    """Load ``blend.json`` and check that no OOF it was chosen on changed since.

    Raises:
        EkError: blend.json is missing or unreadable, or an OOF/holdout file or the splits
            changed ("stale blend.json").
    """
    path = layout.blend_json
    if not path.is_file():
        raise EkError(f"{path}: missing; run `ek blend --oof` first")
    try:
        blend = json.loads(path.read_text())
        digests = blend["digests"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise EkError(f"{path}: unreadable or without digests; rerun ek blend --oof") from None
    files = [(layout.oof_npy(n), d) for n, d in digests.get("oof", {}).items()]
    files += [(layout.holdout_npy(n), d) for n, d in digests.get("holdout", {}).items()]
    for name in digests.get("oof", {}):
        summary = layout.summary(name)
        if not summary.is_file() or _splits_digest(summary) != digests.get("splits"):
            _stale(summary)
    for file, digest in files:
        if not file.is_file() or _digest(file) != digest:
            _stale(file)
    return blend


def _stale(file: Path) -> None:
    raise EkError(f"stale blend.json: {file} changed since `ek blend`; rerun ek blend --oof")


def _splits_digest(summary: Path) -> str | None:
    try:
        return json.loads(summary.read_text()).get("splits_digest")
    except json.JSONDecodeError:
        return None


def _digest(path: Path) -> str:
    from .files import digest_file

    return digest_file(path)


def _digests(layout, pool) -> dict:
    return {
        "splits": pool[0].summary.get("splits_digest"),
        "oof": {o.name: _digest(layout.oof_npy(o.name)) for o in pool},
        "holdout": {o.name: _digest(layout.holdout_npy(o.name)) for o in pool if o.holdout is not None},
    }


def _read_pool(layout, configs: list[str] | None) -> list:
    from .oof import read_oof

    if configs is None:
        workdir = layout.workdir
        names = sorted(p.name for p in workdir.iterdir() if (p / "summary.json").is_file()) if workdir.is_dir() else []
    else:
        names = list(configs)
    if not names:
        raise EkError(f"{layout.workdir}: no finished configs (no <config>/summary.json); run `ek cv` first")
    pool = [read_oof(layout, name) for name in names]
    first = pool[0]
    for other in pool[1:]:
        _check_same(layout, first, other)
    return pool


def _check_same(layout, first, other) -> None:
    if other.summary.get("splits_digest") != first.summary.get("splits_digest"):
        raise EkError(f"{layout.summary(other.name)}: different splits from '{first.name}' (splits_digest differs); rerun ek cv on the same splits")
    if other.ids != first.ids or not np.array_equal(other.folds, first.folds):
        raise EkError(f"{layout.oof_ids(other.name)}: record ids or folds differ from '{first.name}'")
    if other.probs.shape != first.probs.shape:
        raise EkError(f"{layout.oof_npy(other.name)}: shape {other.probs.shape} differs from '{first.name}' {first.probs.shape}")
    if (other.holdout is None) != (first.holdout is None) or other.holdout_ids != first.holdout_ids:
        raise EkError(f"{layout.holdout_ids(other.name)}: holdout records differ from '{first.name}'")


def _read_splits(layout) -> dict[str, str]:
    from .oof import read_ids

    splits = read_ids(layout.splits_csv)
    if not {"record_id", "split"} <= set(splits.columns):
        raise EkError(f"{layout.splits_csv}: expected columns record_id,split,fold")
    return dict(zip(splits["record_id"], splits["split"]))


def _splits_data_root(layout) -> Path:
    path = layout.splits_meta
    try:
        return Path(json.loads(path.read_text())["data_root"])
    except FileNotFoundError:
        raise EkError(f"{path}: missing; pass --data or rerun `ek cv`") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise EkError(f"{path}: no data_root; pass --data") from None


def _load_labels(layout, data_root: Path, ids: list[str], splits: dict[str, str]) -> np.ndarray:
    from .cache import load_labels

    missing = [rid for rid in ids if rid not in splits]
    if missing:
        raise EkError(f"{layout.splits_csv}: records {missing[:3]} of the OOF are not in the splits")
    records = pd.DataFrame({"record_id": ids, "split": [splits[rid] for rid in ids]})
    return load_labels(layout, data_root, records)


def _holdout_dice(layout, data_root, blend, pool, splits, batch: int = 256) -> float | None:
    """Global dice of the final choice on the holdout records, which no choice looked at."""
    chosen = [o for o in pool if o.name in blend["configs"]]
    if any(o.holdout is None for o in chosen) or not chosen[0].holdout_ids:
        return None
    labels = _load_labels(layout, data_root, chosen[0].holdout_ids, splits)
    batches = [slice(lo, lo + batch) for lo in range(0, len(labels), batch)]
    threshold = None
    if blend["threshold_mode"] == "top_fraction":
        counts = sum(blend_histogram(blend, {o.name: o.holdout[b] for o in chosen}) for b in batches)
        threshold = top_fraction_threshold(counts, blend["top_fraction"])
    tp = n_pred = 0
    for b in batches:
        predicted = apply_blend(blend, {o.name: o.holdout[b] for o in chosen}, threshold)
        tp += int(np.count_nonzero(predicted & (labels[b] > 0)))
        n_pred += int(np.count_nonzero(predicted))
    n_true = int(np.count_nonzero(labels))
    return dice_from_counts(tp, n_pred - tp, n_true - tp)
