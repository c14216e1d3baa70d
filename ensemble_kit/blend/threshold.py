"""Threshold of a blend, exact over every integer value of ``S``, jointly with postprocessing.

Per-fold histograms of ``(S, label)`` give every threshold's TP/FP/FN as cumulative sums,
on every set of folds (:class:`~.sets.FoldSets`). Two threshold modes: ``value`` (predict
``S >= threshold_sum``) and ``top_fraction`` (mark the top fraction of all pixels of a set;
the threshold is recomputed on each set it is applied to, never below the search floor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .kernels import best_per_set, fold_histograms, pair_histograms, weighted_sum
from .levels import component_levels, descending_order, min_pixel_levels
from .rule import fraction_threshold
from .sets import FoldSets

if TYPE_CHECKING:  # annotations only: ``ek submit`` loads this module, but no candidate code
    from .candidates import Candidates


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

    dice: np.ndarray  # (n_pixel_grid, n_component_grid, n_sets)
    thresholds: np.ndarray  # same shape: the best threshold_sum of each
    levels_hist: np.ndarray  # (n_pixel_grid, n_component_grid, K, n_values, 2)
    sums_hist: np.ndarray  # (K, n_values) counts of the raw blend sums


def threshold_tables(
    cands: Candidates, weights: np.ndarray, pixel_grid, component_grid, sets: FoldSets
) -> Tables:
    """Exact best threshold of every postprocessing pair on every set of folds."""
    sums = weighted_sum(cands.values, weights).astype(np.int64)
    total = int(weights.sum())
    lowest, n_values = cands.floor * total, 255 * total + 1
    order = descending_order(sums, cands.image_start)
    cuts = np.stack([min_pixel_levels(sums, cands.image_start, order, n) for n in pixel_grid])
    hists = pair_histograms(
        sums,
        cands.image_start,
        cuts,
        _component_cuts(sums, cands, order, component_grid),
        cands.labels,
        cands.pixel_fold,
        cands.n_folds,
        n_values,
    )
    shape = (len(pixel_grid), len(component_grid), len(sets))
    dice, thresholds = np.zeros(shape), np.zeros(shape, dtype=np.int64)
    for i, j in np.ndindex(*shape[:2]):
        dice[i, j], thresholds[i, j] = best_per_set(
            hists[i, j], cands.fold_positives, lowest, sets.excluded
        )
    sums_hist = fold_histograms(sums, cands.labels, cands.pixel_fold, cands.n_folds, n_values).sum(
        axis=2
    )
    return Tables(dice, thresholds, hists, sums_hist)


def _component_cuts(sums, cands, order, component_grid) -> np.ndarray:
    """Per min-component value, each pixel's component level (the sum itself when off)."""
    taus = np.empty((len(component_grid), len(sums)), dtype=np.int64)
    sizes = [m for m in component_grid if m > 1]
    levels = (
        component_levels(
            sums, cands.image_start, order, cands.neighbours, np.array(sizes, dtype=np.int64)
        )
        if sizes
        else None
    )
    for j, m in enumerate(component_grid):
        taus[j] = levels[sizes.index(m)] if m > 1 and levels is not None else sums
    return taus


def choose_threshold(
    cands: Candidates,
    weights: np.ndarray,
    set_index: int,
    pixel_grid,
    component_grid,
    tables: Tables | None = None,
    sets: FoldSets | None = None,
) -> Choice:
    """Exact best threshold jointly with min-pixel and min-component on one set of folds.

    A postprocessing value is kept only when it strictly improves the set's dice (pairs are
    tried from (0, 0) in grid order). ``sets`` defaults to :meth:`FoldSets.nested`; pass the
    sets ``tables`` were made on.
    """
    sets = sets or FoldSets.nested(cands.n_folds)
    tables = tables or threshold_tables(cands, weights, pixel_grid, component_grid, sets)
    table = tables.dice[:, :, set_index]
    best = (0, 0)
    for i, j in np.ndindex(*table.shape):
        if table[i, j] > table[best] + 1e-12:
            best = (i, j)
    threshold = int(tables.thresholds[best][set_index])
    in_set = sets.members(set_index)
    fraction = tables.sums_hist[in_set, threshold:].sum() / cands.fold_pixels[in_set].sum()
    return Choice(
        weights,
        threshold,
        float(fraction),
        int(pixel_grid[best[0]]),
        int(component_grid[best[1]]),
        float(table[best]),
        table,
        (tuple(pixel_grid), tuple(component_grid)),
        tables.levels_hist[best].copy(),  # a copy, so the full table can be freed
        tables.sums_hist,
    )


def applied_threshold(choice: Choice, fold: int, mode: str, lowest: int, fold_pixels: int) -> int:
    """The threshold on ``S`` a choice applies to one fold, in ``value`` or ``top_fraction`` mode.

    ``top_fraction`` applies :func:`~.rule.fraction_threshold` to the fold, the rule
    holdout and submission apply too.
    """
    if mode == "value":
        return int(choice.threshold_sum)
    counts = choice.sums_hist[fold].copy()
    counts[0] += fold_pixels - counts.sum()  # dropped pixels lie below the floor
    return fraction_threshold(counts, choice.top_fraction, lowest)


def heldout_counts(
    choice: Choice, fold: int, mode: str, lowest: int, fold_pixels: int, fold_positives: int
) -> tuple[int, int, int]:
    """TP, FP, FN of a choice on one fold's pixels (:func:`applied_threshold`)."""
    threshold = applied_threshold(choice, fold, mode, lowest, fold_pixels)
    hist = choice.levels_hist[fold, threshold:]
    tp, fp = int(hist[:, 1].sum()), int(hist[:, 0].sum())
    return tp, fp, fold_positives - tp
