"""Numba kernels of the blend search, each with a plain numpy reference (``*_reference``).

Arrays in, arrays out: nothing here knows about configs, files or the search around them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..metrics import N_CODES, best_from_counts, sweep_from_histogram


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


def weighted_sum_reference(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Numpy reference of :func:`weighted_sum`."""
    return (np.asarray(weights, np.int64)[:, None] * values).sum(axis=0).astype(np.int32)


@njit(cache=True)
def best_per_set(hist, fold_positives, lowest, excluded):
    """Best threshold ``>= lowest`` of every set of folds.

    Args:
        hist: int64 ``(K, n_values, 2)`` per-fold counts of (value, label).
        fold_positives: int64 ``(K,)`` all positives per fold (dropped pixels included).
        lowest: Smallest threshold searched; ``n_values`` means "predict nothing".
        excluded: int64 ``(n_sets, E)``: the folds each set leaves out, -1 for none
            (:class:`~ensemble_kit.blend.sets.FoldSets`).

    Returns:
        ``(dice, threshold)`` of shape ``(n_sets,)``.
    """
    n_folds, n_values, _ = hist.shape
    n_sets = excluded.shape[0]
    best_dice = np.full(n_sets, -1.0)
    best_t = np.zeros(n_sets, dtype=np.int64)
    above = np.zeros((n_folds, 2), dtype=np.int64)
    total_positives = fold_positives.sum()
    for t in range(n_values, lowest - 1, -1):
        if t < n_values:
            for k in range(n_folds):
                above[k, 0] += hist[k, t, 0]
                above[k, 1] += hist[k, t, 1]
        tp_all, fp_all = above[:, 1].sum(), above[:, 0].sum()
        for s in range(n_sets):
            tp, fp, positives = tp_all, fp_all, total_positives
            for e in range(excluded.shape[1]):
                k = excluded[s, e]
                if k >= 0:
                    tp -= above[k, 1]
                    fp -= above[k, 0]
                    positives -= fold_positives[k]
            denominator = 2.0 * tp + fp + (positives - tp)
            dice = 2.0 * tp / denominator if denominator > 0 else 1.0
            if dice >= best_dice[s]:  # scanning down, so ties go to the smallest threshold
                best_dice[s], best_t[s] = dice, t
    return best_dice, best_t


def best_per_set_reference(hist, fold_positives, lowest, excluded):
    """Numpy reference of :func:`best_per_set`."""
    dice, thresholds = [], []
    for row in excluded:
        keep = ~np.isin(np.arange(len(fold_positives)), row[row >= 0])
        tp, fp, fn = sweep_from_histogram(hist[keep].sum(axis=0))
        threshold, best = best_from_counts(
            tp, fp, fn + int(fold_positives[keep].sum()) - int(hist[keep, :, 1].sum()), lowest
        )
        dice.append(best)
        thresholds.append(threshold)
    return np.array(dice), np.array(thresholds)


@njit(cache=True, parallel=True)
def score_moves(
    bases,
    values,
    move_base,
    move_config,
    move_sign,
    move_lowest,
    labels,
    pixel_fold,
    fold_positives,
    excluded,
    n_values,
    scratch,
):
    """Best-threshold dice on every set of folds of each move ``bases[b] + sign * values[config]``.

    Thresholds of move ``m`` are searched from ``move_lowest[m]`` (its floor) up.
    ``scratch`` is int64 ``(T, >= K * n_values * 2)``: one reused histogram per worker, so
    no call pays the page faults of fresh allocations.
    """
    n_moves, n_folds, n_sets = move_base.shape[0], fold_positives.shape[0], excluded.shape[0]
    dice = np.zeros((n_moves, n_sets))
    thresholds = np.zeros((n_moves, n_sets), dtype=np.int64)
    n_workers = scratch.shape[0]
    for worker in prange(n_workers):
        hist = scratch[worker, : n_folds * n_values * 2].reshape((n_folds, n_values, 2))
        for m in range(worker, n_moves, n_workers):
            hist[:] = 0
            base, config, sign = bases[move_base[m]], move_config[m], move_sign[m]
            for p in range(labels.shape[0]):
                hist[pixel_fold[p], base[p] + sign * values[config, p], labels[p]] += 1
            dice[m], thresholds[m] = best_per_set(hist, fold_positives, move_lowest[m], excluded)
    return dice, thresholds


def score_moves_reference(
    bases,
    values,
    move_base,
    move_config,
    move_sign,
    move_lowest,
    labels,
    pixel_fold,
    fold_positives,
    excluded,
    n_values,
):
    """Numpy reference of :func:`score_moves` (no scratch): ``(dice, thresholds)``."""
    scores = []
    for m in range(len(move_base)):
        sums = bases[move_base[m]].astype(np.int64) + move_sign[m] * values[move_config[m]]
        hist = fold_histograms_reference(sums, labels, pixel_fold, len(fold_positives), n_values)
        scores.append(best_per_set_reference(hist, fold_positives, move_lowest[m], excluded))
    dice = np.array([d for d, _ in scores]).reshape(len(move_base), len(excluded))
    thresholds = np.array([t for _, t in scores], np.int64).reshape(dice.shape)
    return dice, thresholds


@njit(cache=True)
def fold_histograms(levels, labels, pixel_fold, n_folds, n_values):
    """Per-fold counts of (level, label) for levels ``>= 0``: int64 ``(K, n_values, 2)``."""
    hist = np.zeros((n_folds, n_values, 2), dtype=np.int64)
    for p in range(levels.shape[0]):
        if levels[p] >= 0:
            hist[pixel_fold[p], levels[p], labels[p]] += 1
    return hist


def fold_histograms_reference(levels, labels, pixel_fold, n_folds, n_values):
    """Numpy reference of :func:`fold_histograms`."""
    kept = levels >= 0
    cells = (pixel_fold[kept].astype(np.int64) * n_values + levels[kept]) * 2 + labels[kept]
    counts = np.bincount(cells, minlength=n_folds * n_values * 2)
    return counts.reshape(n_folds, n_values, 2).astype(np.int64)


@njit(cache=True, parallel=True)
def pair_histograms(sums, image_start, cuts, taus, labels, pixel_fold, n_folds, n_values):
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


def pair_histograms_reference(sums, image_start, cuts, taus, labels, pixel_fold, n_folds, n_values):
    """Numpy reference of :func:`pair_histograms`."""
    image = np.repeat(np.arange(len(image_start) - 1), np.diff(image_start))
    return np.array(
        [
            [
                fold_histograms_reference(
                    np.minimum(np.minimum(sums, cut[image]), tau),
                    labels,
                    pixel_fold,
                    n_folds,
                    n_values,
                )
                for tau in taus
            ]
            for cut in cuts
        ],
        dtype=np.int64,
    ).reshape(len(cuts), len(taus), n_folds, n_values, 2)


SUB_HISTOGRAMS = 8  # interleaved counters: repeated codes do not wait on one another


@njit(cache=True, parallel=True)
def scan_chunk(
    stack: np.ndarray, labels: np.ndarray, floor: int, hist: np.ndarray, flags: np.ndarray
) -> None:
    """Dense pass over a chunk ``(C, B, HW)``: per-image histograms and candidate flags.

    Writes ``hist`` int64 ``(C, B, 256, 2)`` and ``flags`` uint8 ``(B, >= HW)`` (reused buffers).
    Each config's row is read once, in order; its codes are counted without labels in
    ``SUB_HISTOGRAMS`` small tables that stay in L1 cache (consecutive pixels mostly share a
    code, and one counter would make every increment wait for the previous one, 4.6x
    slower measured on 64 images x 10 configs). The rare labelled positives are then moved
    to the label-1 column.
    """
    n_configs, n_images, n_pixels = stack.shape
    whole = n_pixels - n_pixels % SUB_HISTOGRAMS
    for i in prange(n_images):
        counts = np.zeros((SUB_HISTOGRAMS, N_CODES), dtype=np.int32)
        top = np.zeros(n_pixels, dtype=np.uint8)
        for c in range(n_configs):
            row = stack[c, i]
            counts[:] = 0
            for p in range(0, whole, SUB_HISTOGRAMS):
                for k in range(SUB_HISTOGRAMS):
                    counts[k, row[p + k]] += 1
            for p in range(whole, n_pixels):
                counts[0, row[p]] += 1
            for v in range(N_CODES):
                hist[c, i, v, 0] = counts[:, v].sum()
                hist[c, i, v, 1] = 0
            for p in range(n_pixels):
                top[p] = max(top[p], row[p])
        for p in range(n_pixels):
            flags[i, p] = top[p] >= floor
        for p in range(n_pixels):
            if labels[i, p]:
                for c in range(n_configs):
                    hist[c, i, stack[c, i, p], 1] += 1
                    hist[c, i, stack[c, i, p], 0] -= 1


def scan_chunk_reference(stack: np.ndarray, labels: np.ndarray, floor: int):
    """Numpy reference of :func:`scan_chunk`: ``(hist (C, B, 256, 2), flags (B, HW))``."""
    n_configs, n_images, _ = stack.shape
    hist = np.zeros((n_configs, n_images, N_CODES, 2), dtype=np.int64)
    positive = labels.astype(bool)
    for c, i in np.ndindex(n_configs, n_images):
        for label, where in ((0, ~positive[i]), (1, positive[i])):
            hist[c, i, :, label] = np.bincount(stack[c, i][where], minlength=N_CODES)
    return hist, (stack.max(axis=0) >= floor).astype(np.uint8)


@njit(cache=True, parallel=True)
def gather_chunk(stack, labels, flags, starts):
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


def gather_chunk_reference(stack, labels, flags):
    """Numpy reference of :func:`gather_chunk` (``flags`` without padding)."""
    image, position = np.nonzero(flags)
    return (
        stack[:, image, position],
        (labels[image, position] != 0).astype(np.uint8),
        position.astype(np.int32),
    )
