"""Global dice and exact threshold sweeps over uint8 probability codes.

The competition metric is the *global* dice: one sum over every pixel of every image,
``2 * sum(p * t) / (sum(p) + sum(t))``. We define empty prediction on empty truth as 1.0
(the same as scikit-learn's ``f1_score(..., zero_division=1.0)``).

Probabilities are stored as uint8 codes ``u = round(p * 255)``; a threshold ``t`` in
``0..255`` means ``pred = u >= t``. ``t = 256`` means "predict nothing" (no pixel is
positive): ``tp = fp = 0`` and ``fn`` = every positive. Because there are only 256 codes, a
histogram of ``(code, label)`` counts gives every threshold's TP/FP/FN as a cumulative sum,
so the sweep over all thresholds is exact and costs one pass over the pixels.

Each numba kernel has a plain numpy reference (``*_reference``) that the tests compare
against exactly.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .task import METRICS

N_CODES = 256
NOTHING = N_CODES  # the threshold that predicts no pixel


def dice_from_counts(tp, fp, fn):
    """Dice ``2tp / (2tp + fp + fn)`` of scalars or arrays; 1.0 where all three are 0.

    Args:
        tp: True positive count(s).
        fp: False positive count(s).
        fn: False negative count(s).

    Returns:
        A float for scalar input, else a float64 array of the broadcast shape.
    """
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    denominator = 2.0 * tp + fp + fn
    safe = np.where(denominator > 0, denominator, 1.0)
    dice = np.where(denominator > 0, 2.0 * tp / safe, 1.0)
    return float(dice) if dice.ndim == 0 else dice


def global_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Global dice of two binary masks of any (equal) shape, summed over all pixels.

    Args:
        pred: Predicted mask, bool or 0/1 of any integer dtype.
        target: Ground-truth mask of the same shape.

    Returns:
        ``2 * sum(pred & target) / (sum(pred) + sum(target))``; 1.0 when both are empty
        (matches ``sklearn.metrics.f1_score(..., zero_division=1.0)``).
    """
    pred = np.asarray(pred).astype(bool, copy=False)
    target = np.asarray(target).astype(bool, copy=False)
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {target.shape}")
    tp = int(np.count_nonzero(pred & target))
    n_pred, n_true = int(np.count_nonzero(pred)), int(np.count_nonzero(target))
    return dice_from_counts(tp, n_pred - tp, n_true - tp)


def pair_counts(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN per (image, class) pair: int64 ``(N, C)`` each.

    Args:
        pred: Binary masks ``(N, C, H, W)``, or ``(N, H, W)`` for one class.
        target: Ground truth of the same shape.
    """
    pred = np.asarray(pred).astype(bool, copy=False)
    target = np.asarray(target).astype(bool, copy=False)
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {target.shape}")
    if pred.ndim == 3:
        pred, target = pred[:, None], target[:, None]
    if pred.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) or (N, H, W) masks, got {pred.shape}")
    flat = (pred.shape[0], pred.shape[1], -1)
    pred, target = pred.reshape(flat), target.reshape(flat)
    tp = np.count_nonzero(pred & target, axis=2)
    return tp, np.count_nonzero(pred, axis=2) - tp, np.count_nonzero(target, axis=2) - tp


def mean_dice_from_counts(tp, fp, fn, empty_score: float = 1.0) -> float:
    """Mean over pairs of ``2tp / (2tp + fp + fn)``, ``empty_score`` where all three are 0."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    if tp.size == 0:
        raise ValueError("mean dice of no pairs")
    denominator = 2.0 * tp + fp + fn
    safe = np.where(denominator > 0, denominator, 1.0)
    return float(np.where(denominator > 0, 2.0 * tp / safe, empty_score).mean())


def mean_dice(pred: np.ndarray, target: np.ndarray, empty_score: float = 1.0) -> float:
    """Mean dice over (image, class) pairs, as Severstal's leaderboard scored.

    Args:
        pred: Binary masks ``(N, C, H, W)``, or ``(N, H, W)`` for one class.
        target: Ground truth of the same shape.
        empty_score: Score of a pair empty in both (1 in most competitions).

    Returns:
        The mean of every pair's dice.
    """
    tp, fp, fn = pair_counts(pred, target)
    return mean_dice_from_counts(tp, fp, fn, empty_score=empty_score)


def task_metric(
    metric: str, pred: np.ndarray, target: np.ndarray, empty_score: float = 1.0
) -> float:
    """The named metric (``global_dice`` or ``mean_dice``) of binary masks."""
    if metric == "global_dice":
        return global_dice(pred, target)
    if metric == "mean_dice":
        return mean_dice(pred, target, empty_score)
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


@njit(cache=True, parallel=True)
def image_histograms(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-image counts of ``(code, label)``: int64 ``(N, 256, 2)``.

    Args:
        values: uint8 ``(N, H, W)`` probability codes.
        labels: ``(N, H, W)`` 0/1 labels (any non-zero counts as 1).
    """
    n, height, width = values.shape
    hist = np.zeros((n, N_CODES, 2), dtype=np.int64)
    for i in prange(n):
        # count codes alone in a small table (fast), then move the rare positives to column 1
        counts = np.zeros(N_CODES, dtype=np.int64)
        for r in range(height):
            for c in range(width):
                counts[values[i, r, c]] += 1
        for r in range(height):
            for c in range(width):
                if labels[i, r, c]:
                    counts[values[i, r, c]] -= 1
                    hist[i, values[i, r, c], 1] += 1
        hist[i, :, 0] = counts
    return hist


def image_histograms_reference(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Numpy reference of :func:`image_histograms`."""
    n = values.shape[0]
    flat = values.reshape(n, -1).astype(np.int64) * 2 + (labels.reshape(n, -1) != 0)
    return np.stack([np.bincount(row, minlength=2 * N_CODES) for row in flat]).reshape(
        n, N_CODES, 2
    )


@njit(cache=True, parallel=True)
def _flat_histogram(values: np.ndarray, labels: np.ndarray, n_chunks: int) -> np.ndarray:
    """Counts of ``(code, label)`` of flat uint8 arrays, in ``n_chunks`` parallel parts."""
    n = values.shape[0]
    partial = np.zeros((n_chunks, N_CODES, 2), dtype=np.int64)
    words = labels[: n // 8 * 8].view(np.uint64)
    for k in prange(n_chunks):
        lo, hi = k * n // n_chunks, (k + 1) * n // n_chunks
        # four interleaved tables: runs of equal codes (mostly 0) do not wait on one counter
        lanes = np.zeros((4, N_CODES), dtype=np.int64)
        stop = lo + (hi - lo) // 4 * 4
        for p in range(lo, stop, 4):
            lanes[0, values[p]] += 1
            lanes[1, values[p + 1]] += 1
            lanes[2, values[p + 2]] += 1
            lanes[3, values[p + 3]] += 1
        for p in range(stop, hi):
            lanes[0, values[p]] += 1
        counts = lanes[0] + lanes[1] + lanes[2] + lanes[3]
        p = lo
        while p < hi:  # positives are rare: skip eight zero labels at a time
            if p % 8 == 0 and p + 8 <= hi and words[p // 8] == 0:
                p += 8
                continue
            if labels[p]:
                counts[values[p]] -= 1
                partial[k, values[p], 1] += 1
            p += 1
        partial[k, :, 0] = counts
    return partial.sum(axis=0)


def global_histogram(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts of ``(code, label)`` over all pixels of all images: int64 ``(256, 2)``."""
    values, labels = _as_3d(values), _as_3d(labels)
    if values.shape != labels.shape:
        raise ValueError(f"shapes differ: {values.shape} vs {labels.shape}")
    flat_values = np.ascontiguousarray(values).reshape(-1)
    flat_labels = (
        np.ascontiguousarray(labels).reshape(-1).view(np.uint8)
        if labels.dtype.itemsize == 1
        else (labels != 0).reshape(-1).view(np.uint8)
    )
    return _flat_histogram(flat_values, flat_labels, max(1, min(64, flat_values.size // 65536)))


def global_histogram_reference(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Numpy reference of :func:`global_histogram`."""
    return image_histograms_reference(_as_3d(values), _as_3d(labels)).sum(axis=0)


def sweep_from_histogram(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP/FP/FN of ``pred = value >= t`` for every ``t`` from a ``(n_values, 2)`` histogram.

    Args:
        hist: ``hist[v, y]`` = number of pixels with value ``v`` and label ``y``.

    Returns:
        ``(tp, fp, fn)``, int64 arrays of length ``n_values``; index ``t`` is threshold ``t``.
    """
    at_or_above = np.cumsum(hist[::-1], axis=0)[::-1]
    tp, fp = at_or_above[:, 1], at_or_above[:, 0]
    return tp, fp, int(hist[:, 1].sum()) - tp


def threshold_sweep(
    probs_uint8: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact TP/FP/FN for every threshold ``t = 0..255`` (``pred = probs_uint8 >= t``).

    Threshold 256 ("nothing") is not in the arrays: it has ``tp = fp = 0`` and
    ``fn = labels.sum()``.

    Args:
        probs_uint8: uint8 codes, ``(H, W)``, ``(N, H, W)`` or ``(N, C, H, W)`` (global dice
            over every class's pixels).
        labels: 0/1 labels of the same shape.

    Returns:
        ``(tp, fp, fn)``, int64 arrays of length 256.
    """
    return sweep_from_histogram(global_histogram(probs_uint8, labels))


def threshold_sweep_reference(probs_uint8: np.ndarray, labels: np.ndarray):
    """Numpy reference of :func:`threshold_sweep`: one comparison per threshold."""
    truth = np.asarray(labels) != 0
    counts = []
    for t in range(N_CODES):
        pred = probs_uint8 >= t
        hits = np.count_nonzero(pred & truth)
        counts.append((hits, np.count_nonzero(pred) - hits, np.count_nonzero(truth) - hits))
    tp, fp, fn = (np.array(col, dtype=np.int64) for col in zip(*counts))
    return tp, fp, fn


def best_from_counts(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, lowest: int = 0
) -> tuple[int, float]:
    """The threshold with the highest dice among ``lowest..len(tp)`` (the last is "nothing").

    Ties go to the smallest threshold.

    Args:
        tp: True positives per threshold (from :func:`sweep_from_histogram`).
        fp: False positives per threshold.
        fn: False negatives per threshold.
        lowest: Smallest threshold considered.

    Returns:
        ``(threshold, dice)``; ``threshold == len(tp)`` means predict nothing.
    """
    positives = int(tp[0] + fn[0])
    dice = np.append(
        dice_from_counts(tp[lowest:], fp[lowest:], fn[lowest:]), 1.0 if positives == 0 else 0.0
    )
    best = int(np.argmax(dice))
    return lowest + best, float(dice[best])


def best_threshold(probs_uint8: np.ndarray, labels: np.ndarray) -> tuple[int, float]:
    """Exact best global-dice threshold over all codes ``0..256`` (256: predict nothing).

    Returns:
        ``(threshold_code, dice)``; the probability threshold is ``threshold_code / 255``.
    """
    return best_from_counts(*threshold_sweep(probs_uint8, labels))


def _as_3d(array: np.ndarray) -> np.ndarray:
    """``(H, W)``, ``(N, H, W)`` or several classes' ``(N, C, H, W)`` as ``(N', H, W)``."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 4:
        array = array.reshape(-1, *array.shape[2:])
    if array.ndim != 3:
        raise ValueError(f"expected (H, W), (N, H, W) or (N, C, H, W), got shape {array.shape}")
    if array.dtype == bool:
        array = array.view(np.uint8)
    return array
