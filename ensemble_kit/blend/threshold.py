"""Threshold of a blend, exact over every integer value of ``S``, jointly with postprocessing.

Per-fold histograms of ``(S, label)`` give every threshold's TP/FP/FN as cumulative sums,
on every set of folds (:class:`~.sets.FoldSets`). Two threshold modes: ``value`` (predict
``S >= threshold_sum``) and ``top_fraction`` (mark the top fraction of all pixels of a set;
the threshold is recomputed on each set it is applied to, never below the search floor).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .kernels import best_per_set, fold_histograms, pair_histograms, weighted_sum
from .levels import (
    ChunkBuffers,
    component_sizes,
    descending_order,
    min_pixel_levels,
    neighbour_table,
    sorted_component_levels,
)
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


TABLE_CHUNK_PIXELS = 1 << 22  # candidates per chunk: its per-pixel state is ~0.5 GB at most


def threshold_tables(
    cands: Candidates, weights: np.ndarray, pixel_grid, component_grid, sets: FoldSets
) -> Tables:
    """Exact best threshold of every postprocessing pair on every set of folds.

    Every postprocessing level is a property of one image, so the images are taken a chunk
    at a time (:func:`image_chunks`) and only the per-fold counts are kept: the memory of
    the per-pixel state (blend sums, order, neighbour table, component levels) is one
    chunk's, whatever the number of candidates.
    """
    total = int(weights.sum())
    lowest, n_values = cands.floor * total, 255 * total + 1
    hist_shape = (len(pixel_grid), len(component_grid), cands.n_folds, n_values, 2)
    hists = np.zeros(hist_shape, dtype=np.int64)
    sums_hist = np.zeros((cands.n_folds, n_values), dtype=np.int64)
    for chunk in ranked_chunks(cands, weights, (pixel_grid, component_grid)):
        chunk_hists, chunk_sums = _chunk_tables(cands, chunk, component_grid, n_values)
        hists += chunk_hists
        sums_hist += chunk_sums
    shape = (len(pixel_grid), len(component_grid), len(sets))
    dice, thresholds = np.zeros(shape), np.zeros(shape, dtype=np.int64)
    for i, j in np.ndindex(*shape[:2]):
        dice[i, j], thresholds[i, j] = best_per_set(
            hists[i, j], cands.fold_positives, lowest, sets.excluded
        )
    return Tables(dice, thresholds, hists, sums_hist)


def image_chunks(image_start: np.ndarray, max_pixels: int) -> list[tuple[int, int]]:
    """Runs of whole images ``(lo, hi)`` of at most ``max_pixels`` candidates each (an image
    with more is a chunk of its own); at least one chunk, even without images."""
    bounds: list[tuple[int, int]] = []
    lo, n_images = 0, len(image_start) - 1
    while lo < n_images or not bounds:
        hi = int(np.searchsorted(image_start, image_start[lo] + max_pixels, side="right")) - 1
        hi = min(max(hi, lo + 1), n_images)
        bounds.append((lo, hi))
        lo = hi
    return bounds


@dataclass
class RankedChunk:
    """One chunk of images' candidates, each image's pixels in descending blend-sum order.

    Per-image counts do not depend on the order of an image's pixels, and in that order the
    component levels run on per-image state (:func:`~.levels.sorted_component_levels`).
    """

    images: tuple[int, int]  # images lo:hi
    pixels: slice  # their candidates
    order: np.ndarray  # int64 ranked pixels' indices in the chunk; valid until the next chunk
    image_start: np.ndarray  # int64 (hi - lo + 1,) from 0
    sums: np.ndarray  # int64 blend sums, ranked
    cuts: np.ndarray  # int64 (A, hi - lo): each image's level under each min-pixel value
    sizes: list[int]  # the component sizes > 1 of the grid
    kept: np.ndarray | None  # int64 (len(sizes), P) component levels; valid until the next chunk

    def take(self, values: np.ndarray) -> np.ndarray:
        """A per-candidate array of the whole :class:`Candidates`, for this chunk, ranked."""
        return values[self.pixels][self.order]


def ranked_chunks(cands: Candidates, weights: np.ndarray, grids) -> Iterator[RankedChunk]:
    """The candidates a chunk of images at a time (:func:`image_chunks`), ranked, with the
    min-pixel levels of ``grids[0]`` and the component levels of ``grids[1]``.

    The value order, neighbour table and component levels of every chunk fill one set of
    buffers (:class:`~.levels.ChunkBuffers`): the memory of the per-pixel state is one
    chunk's, whatever the number of candidates, and is faulted in once.
    """
    chunks = image_chunks(cands.image_start, TABLE_CHUNK_PIXELS)
    sizes = component_sizes(grids[1])
    buffers = ChunkBuffers.of_chunks(cands.image_start, chunks, len(sizes))
    height, width = cands.shape
    for lo, hi in chunks:
        first, last = int(cands.image_start[lo]), int(cands.image_start[hi])
        n = last - first
        image_start = cands.image_start[lo : hi + 1] - first
        sums = weighted_sum(cands.values[:, first:last], weights).astype(np.int64)
        order = descending_order(sums, image_start, buffers.order(n))
        sums = sums[order]
        cuts = np.stack([min_pixel_levels(sums, image_start, None, m) for m in grids[0]])
        kept = None
        if sizes:
            positions = cands.positions[first:last][order]
            neighbours = neighbour_table(
                image_start, positions, height, width, buffers.neighbours(n)
            )
            kept = sorted_component_levels(
                sums, image_start, neighbours, np.array(sizes, dtype=np.int64), buffers.levels(n)
            )
        yield RankedChunk((lo, hi), slice(first, last), order, image_start, sums, cuts, sizes, kept)


def _chunk_tables(
    cands: Candidates, chunk: RankedChunk, component_grid, n_values: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pair histograms and raw-sum counts of one chunk's candidates."""
    labels, pixel_fold = chunk.take(cands.labels), chunk.take(cands.pixel_fold)
    taus = np.empty((len(component_grid), len(chunk.sums)), dtype=np.int64)
    for j, m in enumerate(component_grid):  # each pixel's component level; the sum when off
        taus[j] = (
            chunk.kept[chunk.sizes.index(m)] if chunk.kept is not None and m > 1 else chunk.sums
        )
    hists = pair_histograms(
        chunk.sums, chunk.image_start, chunk.cuts, taus, labels, pixel_fold, cands.n_folds, n_values
    )
    sums_hist = fold_histograms(chunk.sums, labels, pixel_fold, cands.n_folds, n_values).sum(axis=2)
    return hists, sums_hist


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
