"""Numba kernels of the blend search, each with a plain numpy reference (``*_reference``).

Arrays in, arrays out: nothing here knows about configs, files or the search around them.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..metrics import N_CODES, best_from_counts, sweep_from_histogram


@njit(cache=True, parallel=True)
def weighted_sum(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Blend sum ``S[p] = sum_c weights[c] * values[c, p]`` as int32 ``(P,)``."""
    n_pixels = values.shape[1]
    sums = np.empty(n_pixels, dtype=np.int32)
    for block in prange((n_pixels + MOVE_BLOCK - 1) // MOVE_BLOCK):
        lo = block * MOVE_BLOCK
        hi = min(lo + MOVE_BLOCK, n_pixels)
        blend_into(weights, values, lo, hi, sums[lo:hi])
    return sums


@njit(cache=True)
def work_bounds(item_start, n_workers):
    """int64 ``(n_workers + 1,)``: worker ``w`` takes items ``bounds[w]:bounds[w + 1]``
    (images or pairs, item ``i`` owning pixels ``item_start[i]:item_start[i + 1]``), about
    the same number of pixels each. Split by item count instead, one worker can get most
    of the pixels (a few images hold most candidates) and the other idle."""
    n_items = item_start.shape[0] - 1
    bounds = np.searchsorted(
        item_start[:-1], np.arange(n_workers + 1) * item_start[-1] // max(1, n_workers)
    )
    bounds[0], bounds[-1] = 0, n_items
    return bounds


@njit(cache=True)
def blend_into(weights, values, lo, hi, out):
    """``out[:hi - lo] = sum_c weights[c] * values[c, lo:hi]``, one config at a time.

    The loops run over slices, whose indices are known non-negative: they vectorize. Indexed
    as ``values[c, lo + p]``, numba checks each index for a negative wrap and LLVM does not
    vectorize: ~4x slower with a multiply-add per pixel and config.
    """
    n, first = hi - lo, values[0, lo:hi]
    for p in range(n):
        out[p] = weights[0] * first[p]
    for c in range(1, weights.shape[0]):
        weight, row = weights[c], values[c, lo:hi]
        for p in range(n):
            out[p] += weight * row[p]


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


MOVE_BLOCK = 4096  # pixels per block: a block's keys stay in L1 while each move reads them


def score_moves(
    base_weights,
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
    n_workers,
):
    """Best-threshold dice on every set of folds of each move ``bases[b] + sign * e[config]``.

    Args:
        base_weights: int64 ``(B, C)`` integer weights of each base. Its blend sums are
            computed block by block and never stored (at the steel size one int32 copy of
            the sums is 0.7 GB per base).
        values: uint8 ``(C, P)`` codes of the candidate pixels.
        move_base, move_config, move_sign, move_lowest: int64 ``(M,)`` per move; thresholds
            of move ``m`` are searched from ``move_lowest[m]`` (its floor) up.
        labels: uint8 ``(P,)``.
        pixel_fold: int ``(P,)`` fold of each pixel.
        fold_positives: int64 ``(K,)`` all positives per fold.
        excluded: int64 ``(n_sets, E)`` folds each set leaves out.
        n_values: ``255 * (largest weight total) + 1``.
        n_workers: Parallel pixel ranges (``numba.get_num_threads()``).

    Returns:
        ``(dice, thresholds)``, each ``(M, n_sets)``. The moves of one base share one pass
        over the pixels (:func:`base_histograms`).
    """
    n_moves, n_folds = len(move_base), len(fold_positives)
    dice = np.zeros((n_moves, len(excluded)))
    thresholds = np.zeros((n_moves, len(excluded)), dtype=np.int64)
    widest = int(np.bincount(move_base).max()) if n_moves else 0
    # int32 counters halve the histograms' cache footprint; they cannot overflow below 2**31
    counter = np.int32 if labels.shape[0] < 2**31 else np.int64
    buffer = np.empty((max(1, n_workers), widest, n_folds * n_values * 2), dtype=counter)
    for b in range(len(base_weights)):
        moves = np.flatnonzero(move_base == b)
        if len(moves) == 0:
            continue
        hist = buffer[:, : len(moves)]
        base_histograms(
            base_weights[b],
            values,
            move_config[moves],
            move_sign[moves],
            labels,
            pixel_fold,
            n_values,
            hist,
        )
        per_move = hist.sum(axis=0, dtype=np.int64).reshape(len(moves), n_folds, n_values, 2)
        for i, m in enumerate(moves):
            dice[m], thresholds[m] = best_per_set(
                per_move[i], fold_positives, move_lowest[m], excluded
            )
    return dice, thresholds


@njit(cache=True, parallel=True)
def base_histograms(weights, values, configs, signs, labels, pixel_fold, n_values, hist):
    """Per move of one base, per-fold counts of (level, label), one worker per pixel range.

    Writes ``hist`` ``(W, M, K * n_values * 2)`` (int32 or int64): worker ``w``'s counts of
    move ``i`` at ``(fold * n_values + level) * 2 + label``, ``level = S + sign * v[config]``.
    """
    n_configs, n_pixels = values.shape
    n_workers = hist.shape[0]
    for worker in prange(n_workers):
        hist[worker] = 0
        keys = np.empty(MOVE_BLOCK, dtype=np.int64)
        lo, hi = worker * n_pixels // n_workers, (worker + 1) * n_pixels // n_workers
        for start in range(lo, hi, MOVE_BLOCK):
            stop = min(start + MOVE_BLOCK, hi)
            n = stop - start  # loops over slices: they vectorize (see :func:`blend_into`)
            block_fold, block_labels = pixel_fold[start:stop], labels[start:stop]
            blend_into(weights, values, start, stop, keys)
            for p in range(n):
                keys[p] = (block_fold[p] * n_values + keys[p]) * 2 + block_labels[p]
            for i in range(configs.shape[0]):
                step, counts, row = 2 * signs[i], hist[worker, i], values[configs[i], start:stop]
                for p in range(n):
                    counts[keys[p] + step * row[p]] += 1


def base_histograms_reference(
    weights, values, configs, signs, labels, pixel_fold, n_folds, n_values
):
    """Numpy reference of :func:`base_histograms`, workers summed: int64
    ``(M, n_folds * n_values * 2)``."""
    rows = []
    for config, sign in zip(configs, signs):
        move = np.array(weights, dtype=np.int64)
        move[config] += sign
        sums = weighted_sum_reference(values, move)
        rows.append(fold_histograms_reference(sums, labels, pixel_fold, n_folds, n_values))
    return np.array(rows, dtype=np.int64).reshape(len(rows), -1)


def score_moves_reference(
    base_weights,
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
    """Numpy reference of :func:`score_moves` (no workers): ``(dice, thresholds)``."""
    scores = []
    for m in range(len(move_base)):
        weights = np.array(base_weights[move_base[m]], dtype=np.int64)
        weights[move_config[m]] += move_sign[m]
        sums = weighted_sum_reference(values, weights)
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


def pair_histograms(sums, image_start, cuts, taus, labels, pixel_fold, n_folds, n_values):
    """Per (min-pixel, min-component) pair, per-fold counts of (level, label).

    The level of a pixel is ``min(sum, cuts[a, image], taus[b, pixel])``: the highest
    threshold at which it survives the pair. Returns int64 ``(A, B, K, n_values, 2)``.

    Counted as differences over the pair grid (:func:`pair_differences`), then summed along
    both grid axes: most pixels have the same level under every pair and cost one count,
    not one per pair.
    """
    n_images = len(image_start) - 1
    n_workers = max(1, min(numba.get_num_threads(), n_images))
    bounds = work_bounds(image_start, n_workers)
    shape = (n_workers, len(cuts), len(taus), n_folds, n_values, 2)
    differences = np.zeros(shape, dtype=np.int64)
    pair_differences(sums, image_start, cuts, taus, labels, pixel_fold, bounds, differences)
    return differences.sum(axis=0).cumsum(axis=0).cumsum(axis=1)


@njit(cache=True, parallel=True)
def pair_differences(sums, image_start, cuts, taus, labels, pixel_fold, bounds, out):
    """Worker ``w`` counts images ``bounds[w]:bounds[w + 1]`` into ``out[w]`` as differences.

    With ``L[a, b]`` a pixel's level under pair ``(a, b)`` and ``[l]`` a count at level
    ``l`` (none for ``l < 0``), the pixel adds ``[L[a, b]] - [L[a-1, b]] - [L[a, b-1]] +
    [L[a-1, b-1]]`` at ``(a, b)`` (missing terms at the edges): summed over ``a' <= a`` and
    ``b' <= b`` that is ``[L[a, b]]``. The terms cancel whenever two neighbouring rows or
    columns of ``L`` agree, so those are skipped.
    """
    n_cuts, n_taus = cuts.shape[0], taus.shape[0]
    for worker in prange(out.shape[0]):
        rows = np.full((2, n_taus), -1, dtype=np.int64)
        for i in range(bounds[worker], bounds[worker + 1]):
            for p in range(image_start[i], image_start[i + 1]):
                fold, label = pixel_fold[p], labels[p]
                # rows (columns) of L all equal: every later one cancels, only the first counts
                last_row = n_cuts if (cuts[:, i] < sums[p]).any() else 1
                last_column = n_taus if (taus[:, p] < sums[p]).any() else 1
                for a in range(last_row):
                    current, previous = rows[a % 2], rows[(a + 1) % 2]
                    top = min(sums[p], cuts[a, i])
                    for b in range(last_column):
                        current[b] = min(top, taus[b, p])
                    for b in range(last_column):
                        here, up = current[b], previous[b] if a > 0 else -1
                        left = current[b - 1] if b > 0 else -1
                        diagonal = previous[b - 1] if a > 0 and b > 0 else -1
                        if (here == up and left == diagonal) or (here == left and up == diagonal):
                            continue
                        counts = out[worker, a, b, fold]
                        for level, step in ((here, 1), (up, -1), (left, -1), (diagonal, 1)):
                            if level >= 0:
                                counts[level, label] += step


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


# ---- mean Dice over (image, class) pairs ------------------------------------------------
# A pair's dice is held as a fixed-point integer, round(dice * MEAN_DICE_SCALE): sums over
# pairs are then exact, whatever order they are added in, so a kernel and its reference
# agree bit for bit and ties between thresholds are real ties (the mean is off the true
# one by at most 2**-33).
MEAN_DICE_SCALE = 1 << 32


@njit(cache=True)
def fixed_dice(tp, predicted, positives):
    """``round(2 tp / (predicted + positives) * MEAN_DICE_SCALE)``, half up (denominator > 0)."""
    denominator = predicted + positives
    return (4 * tp * MEAN_DICE_SCALE + denominator) // (2 * denominator)


RADIX_BITS = 8
SMALL_SORT = 64  # fewer keys than this: a comparison sort


@njit(cache=True)
def sort_descending(buffer, count, scratch):
    """Sort the non-negative ``buffer[:count]`` in descending order, in place.

    An LSD radix sort (8-bit digits, each pass a stable counting sort from the largest
    digit down), so a pair of thousands of keys costs a few passes over them instead of
    ``n log n`` compared branches; ``scratch`` is as long as ``buffer``.
    """
    if count < SMALL_SORT:
        buffer[:count] = np.sort(buffer[:count])[::-1]
        return
    top = 0
    for j in range(count):
        top = max(top, buffer[j])
    shift, passes, source, target = 0, 0, buffer, scratch
    counts = np.empty(1 << RADIX_BITS, dtype=np.int64)
    mask = (1 << RADIX_BITS) - 1
    while passes == 0 or (top >> shift) > 0:
        counts[:] = 0
        for j in range(count):
            counts[(source[j] >> shift) & mask] += 1
        at = 0
        for d in range(mask, -1, -1):
            at, counts[d] = at + counts[d], at
        for j in range(count):
            d = (source[j] >> shift) & mask
            target[counts[d]] = source[j]
            counts[d] += 1
        source, target = target, source
        shift, passes = shift + RADIX_BITS, passes + 1
    if passes % 2:
        buffer[:count] = scratch[:count]


@njit(cache=True)
def _pair_keys(levels, labels, lowest, buffer):
    """``level * 2 + label`` of a pair's pixels with ``level >= lowest`` into ``buffer``
    (unordered); returns how many. ``levels`` and ``labels`` are the pair's slices, and the
    keys are stored without a branch: a loop that vectorizes (see :func:`blend_into`)."""
    count = 0
    for p in range(levels.shape[0]):
        buffer[count] = levels[p] * 2 + labels[p]
        count += levels[p] >= lowest
    return count


DENSE_RANGE = 4  # a pair whose levels span <= 4x its keys is walked on a histogram


@njit(cache=True)
def _walk_pair(keys, count, positives, n_values, empty_fixed, delta, work, min_pixels, caps):
    """Add one pair's fixed-point dice at every threshold ``t`` to ``delta`` as differences
    (the dice at ``t`` is ``sum(delta[t:])``) and return its steps.

    ``keys[:count]`` are the pair's ``level * 2 + label`` (levels ``>= lowest``, any order).
    As ``t`` falls the pair's counts change only at its levels: each distinct level is one
    step, recorded in ``steps = work[2]`` as (level, dice change), highest first. The keys
    are walked on a histogram of levels (``work[3]``, ``(2, n_values + 1)``, left zeroed)
    when they span at most :data:`DENSE_RANGE` times their number, else radix-sorted
    (``work[1]`` is scratch). With ``min_pixels`` (ascending), ``caps[a]`` is set to the
    pair's ``min_pixels[a]``-th largest level (-1 if fewer keys, the int64 maximum for 0).

    Returns:
        The number of steps.
    """
    _, scratch, steps, histogram = work
    previous = empty_fixed if positives == 0 else 0  # nothing predicted
    delta[n_values] += previous
    n_caps, a = min_pixels.shape[0], 0
    while a < n_caps and min_pixels[a] <= 0:
        caps[a] = np.iinfo(np.int64).max
        a += 1
    top, bottom = -1, np.iinfo(np.int64).max
    for j in range(count):
        top, bottom = max(top, keys[j] >> 1), min(bottom, keys[j] >> 1)
    tp, predicted, n_steps = 0, 0, 0
    if count and top - bottom + 1 <= DENSE_RANGE * count:
        for j in range(count):
            histogram[0, keys[j] >> 1] += 1
            histogram[1, keys[j] >> 1] += keys[j] & 1
        for level in range(top, bottom - 1, -1):
            if histogram[0, level] == 0:
                continue
            predicted += histogram[0, level]
            tp += histogram[1, level]
            histogram[0, level], histogram[1, level] = 0, 0
            dice = fixed_dice(tp, predicted, positives)
            delta[level] += dice - previous
            steps[0, n_steps], steps[1, n_steps] = level, dice - previous
            n_steps += 1
            previous = dice
            while a < n_caps and min_pixels[a] <= predicted:
                caps[a] = level
                a += 1
    else:
        sort_descending(keys, count, scratch)
        j = 0
        while j < count:
            level = keys[j] >> 1
            while j < count and keys[j] >> 1 == level:
                predicted += 1
                tp += keys[j] & 1
                j += 1
            dice = fixed_dice(tp, predicted, positives)
            delta[level] += dice - previous
            steps[0, n_steps], steps[1, n_steps] = level, dice - previous
            n_steps += 1
            previous = dice
            while a < n_caps and min_pixels[a] <= predicted:
                caps[a] = level
                a += 1
    while a < n_caps:
        caps[a] = -1
        a += 1
    return n_steps


@njit(cache=True)
def _move_caps(steps, n_steps, caps, lowest, moved):
    """The pair's dice under each cap as corrections of its uncapped steps, into ``moved``.

    Under cap ``c`` a pair predicts a pixel at ``t`` iff ``min(level, c) >= t``: the same
    counts as with no cap for ``t <= c`` and nothing above ``c``. So the steps above ``c``
    move down to ``c`` (and drop out when ``c < lowest``): the dice at ``t`` under cap ``a``
    is ``sum(delta[t:] + moved[a, t:])``. A min-pixels cap lies at the pair's ``n``-th
    largest level, so fewer than ``n`` steps lie above it.
    """
    for a in range(caps.shape[0]):
        cap, carried, s = caps[a], 0, 0
        while s < n_steps and steps[0, s] > cap:
            moved[a, steps[0, s]] -= steps[1, s]
            carried += steps[1, s]
            s += 1
        if s and cap >= lowest:
            moved[a, cap] += carried


@njit(cache=True)
def _pair_work(longest, n_values):
    """Per-worker buffers of :func:`_walk_pair`: keys, scratch, steps, histogram."""
    return (
        np.empty(longest, np.int64),
        np.empty(longest, np.int64),
        np.empty((2, longest), np.int64),
        np.zeros((2, n_values + 1), np.int64),
    )


@njit(cache=True, parallel=True)
def mean_dice_fold_sums(
    levels,
    labels,
    pair_start,
    pair_positives,
    pair_group,
    caps,
    n_groups,
    lowest,
    n_values,
    empty_fixed,
    n_workers,
):
    """Per group, the fixed-point dice summed over its pairs at every threshold, as differences.

    Args:
        levels: int64 ``(P,)``: a pixel is predicted at ``t`` iff ``level >= t`` (-1: never).
        labels: uint8 ``(P,)``.
        pair_start: int64 ``(N + 1,)``: pair ``i`` owns pixels ``pair_start[i]:[i + 1]``.
        pair_positives: int64 ``(N,)`` every positive of each pair, dropped pixels included.
        pair_group: int64 ``(N,)`` group of each pair (its fold, or class * K + fold).
        caps: int64 ``(A, N)``: under cap row ``a`` pair ``i`` predicts nothing at
            ``t > caps[a, i]`` (min-pixels; the int64 maximum: no cap).
        n_groups: Number of groups.
        lowest: Smallest threshold scored (>= 0); ``n_values`` predicts nothing.
        n_values: ``255 * sum(weights) + 1``.
        empty_fixed: Fixed-point score of a pair empty on both sides.
        n_workers: Parallel chunks (``numba.get_num_threads()``).

    Returns:
        int64 ``(A, n_groups, n_values + 1)``; the sums at every threshold are its suffix
        sums along the last axis (:func:`suffix_sums`).
    """
    n_caps, n_pairs = caps.shape
    n_chunks = max(1, n_workers)
    bounds = work_bounds(pair_start, n_chunks)
    partial = np.zeros((n_chunks, n_caps, n_groups, n_values + 1), dtype=np.int64)
    uncapped = np.zeros((n_chunks, n_groups, n_values + 1), dtype=np.int64)
    longest = np.max(np.diff(pair_start)) if n_pairs else 0
    no_grid = np.empty(0, dtype=np.int64)
    for chunk in prange(n_chunks):
        work = _pair_work(longest, n_values)
        for i in range(bounds[chunk], bounds[chunk + 1]):
            lo, hi = pair_start[i], pair_start[i + 1]
            count = _pair_keys(levels[lo:hi], labels[lo:hi], lowest, work[0])
            g = pair_group[i]
            n_steps = _walk_pair(
                work[0],
                count,
                pair_positives[i],
                n_values,
                empty_fixed,
                uncapped[chunk, g],
                work,
                no_grid,
                no_grid,
            )
            _move_caps(work[2], n_steps, caps[:, i], lowest, partial[chunk, :, g])
    out = partial.sum(axis=0)
    plain = uncapped.sum(axis=0)
    for a in range(n_caps):
        out[a] += plain
    return out


def suffix_sums(delta: np.ndarray) -> np.ndarray:
    """``out[..., t] = delta[..., t:].sum(-1)``: the sums at every threshold of differences."""
    return np.cumsum(delta[..., ::-1], axis=-1)[..., ::-1]


def mean_dice_fold_sums_reference(
    levels,
    labels,
    pair_start,
    pair_positives,
    pair_group,
    caps,
    n_groups,
    lowest,
    n_values,
    empty_fixed,
):
    """Plain per-pair reference of :func:`mean_dice_fold_sums`, already summed (no
    differences): each pair's predicted and true-positive counts at every threshold from
    cumulative counts of its levels, then its dice."""
    sums = np.zeros((caps.shape[0], n_groups, n_values + 1), dtype=np.int64)
    for i in range(len(pair_start) - 1):
        lo, hi = pair_start[i], pair_start[i + 1]
        positives = int(pair_positives[i])
        for a in range(caps.shape[0]):
            kept = np.minimum(levels[lo:hi], caps[a, i])
            kept, hits = kept[kept >= 0], labels[lo:hi][kept >= 0]
            predicted = suffix_sums(np.bincount(kept, minlength=n_values + 1))
            tp = suffix_sums(np.bincount(kept, weights=hits, minlength=n_values + 1))
            tp = tp.astype(np.int64)
            denominator = np.maximum(predicted + positives, 1)
            dice = np.where(
                predicted > 0,
                (4 * tp * MEAN_DICE_SCALE + denominator) // (2 * denominator),
                empty_fixed if positives == 0 else 0,
            )
            sums[a, pair_group[i], lowest:] += dice[lowest:]
    return sums


@njit(cache=True)
def best_mean_per_set(fold_sums, lowest, n_folds, excluded):
    """Per class and set of folds, the best (cap, threshold ``>= lowest``) of fold sums.

    Args:
        fold_sums: int64 ``(A, C * K, T)`` summed fixed-point dice per cap, (class, fold)
            group and threshold (suffix sums of :func:`mean_dice_fold_sums`).
        lowest: Smallest threshold searched.
        n_folds: K.
        excluded: int64 ``(n_sets, E)``: the folds each set leaves out, -1 for none.

    Returns:
        ``(sums, thresholds, caps)``, each int64 ``(C, n_sets)``: ties go to the smallest
        threshold, then to the first cap.
    """
    n_caps, n_groups, n_thresholds = fold_sums.shape
    n_classes, n_sets = n_groups // n_folds, excluded.shape[0]
    best = np.full((n_classes, n_sets), -1, dtype=np.int64)
    best_t = np.zeros((n_classes, n_sets), dtype=np.int64)
    best_cap = np.zeros((n_classes, n_sets), dtype=np.int64)
    for c in range(n_classes):
        groups = fold_sums[:, c * n_folds : (c + 1) * n_folds]
        for a in range(n_caps):
            every_fold = np.zeros(n_thresholds, dtype=np.int64)
            for k in range(n_folds):
                every_fold += groups[a, k]
            for s in range(n_sets):
                top, top_t = np.int64(-1), 0
                for t in range(n_thresholds - 1, lowest - 1, -1):
                    total = every_fold[t]
                    for e in range(excluded.shape[1]):
                        if excluded[s, e] >= 0:
                            total -= groups[a, excluded[s, e], t]
                    if total >= top:  # scanning down, so ties go to the smallest threshold
                        top, top_t = total, t
                if top > best[c, s]:
                    best[c, s], best_t[c, s], best_cap[c, s] = top, top_t, a
    return best, best_t, best_cap


def best_mean_per_set_reference(fold_sums, lowest, n_folds, excluded):
    """Numpy reference of :func:`best_mean_per_set`."""
    n_caps, n_groups, _ = fold_sums.shape
    shape = (n_groups // n_folds, len(excluded))
    best, best_t, best_cap = (np.zeros(shape, dtype=np.int64) for _ in range(3))
    for c, s in np.ndindex(*shape):
        keep = ~np.isin(np.arange(n_folds), excluded[s][excluded[s] >= 0])
        totals = fold_sums[:, c * n_folds + np.flatnonzero(keep)].sum(axis=1)[:, lowest:]
        per_cap = totals.max(axis=1)
        a = int(np.argmax(per_cap))  # the first cap reaching the best
        best[c, s], best_t[c, s], best_cap[c, s] = per_cap[a], lowest + np.argmax(totals[a]), a
    return best, best_t, best_cap


@njit(cache=True)
def _move_keys(weights, values, labels, lo, hi, lowest, buffer, levels):
    """:func:`_pair_keys` of the blend sums ``sum_c weights[c] * values[c]`` (built into
    ``levels`` by :func:`blend_into`)."""
    blend_into(weights, values, lo, hi, levels)
    return _pair_keys(levels[: hi - lo], labels[lo:hi], lowest, buffer)


@njit(cache=True)
def _move_deltas(weights, values, lowest, pairs, lo, hi, min_pixels, n_values, empty_fixed, work):
    """Pairs ``lo:hi``'s :func:`mean_dice_fold_sums` differences of one move, into ``work``.

    ``work`` is ``(delta (A, G, T), uncapped (G, T), caps (A,), pair buffers)``: the dice at
    ``t`` under cap ``a`` is the suffix sum from ``t`` of ``delta[a] + uncapped``.
    """
    labels, pair_start, pair_positives, pair_group = pairs
    delta, uncapped, caps, buffers = work
    for i in range(lo, hi):
        first, last = pair_start[i], pair_start[i + 1]
        # the scratch of the sort holds the blend sums until the keys are built
        count = _move_keys(weights, values, labels, first, last, lowest, buffers[0], buffers[1])
        g = pair_group[i]
        n_steps = _walk_pair(
            buffers[0],
            count,
            pair_positives[i],
            n_values,
            empty_fixed,
            uncapped[g],
            buffers,
            min_pixels,
            caps,
        )
        _move_caps(buffers[2], n_steps, caps, lowest, delta[:, g])


@njit(cache=True)
def _suffix_fold_sums(delta, uncapped, n_values):
    """``delta[a] + uncapped`` suffix-summed along thresholds, in place in ``delta``."""
    for a in range(delta.shape[0]):
        for g in range(delta.shape[1]):
            delta[a, g, n_values] += uncapped[g, n_values]
            for t in range(n_values - 1, -1, -1):
                delta[a, g, t] += delta[a, g, t + 1] + uncapped[g, t]


@njit(cache=True, parallel=True)
def score_mean_dice_moves(
    move_weights,
    values,
    move_lowest,
    pairs,
    min_pixels,
    n_groups,
    n_folds,
    excluded,
    n_values,
    empty_fixed,
    n_workers,
):
    """Best per-class mean dice of every weight vector (a greedy move) on every set.

    The blend sums are computed pixel by pixel as each move is scored, never stored (an
    int32 per candidate and base would be GBs at the steel task's size). Moves are scored
    one after another, each move's pairs split among the workers by pixel count (a step
    scores 5 moves per base: split by move, one worker would idle a fifth of the time).

    Args:
        move_weights: int64 ``(M, n_configs)``: the weights of each move.
        values: uint8 ``(n_configs, P)`` codes of the candidate pixels of every pair.
        move_lowest: int64 ``(M,)``: thresholds of move ``m`` are searched from
            ``move_lowest[m]`` up.
        pairs: ``(labels, pair_start, pair_positives, pair_group)`` as in
            :func:`mean_dice_fold_sums`, the group of a pair ``class * K + fold``.
        min_pixels: int64 ``(A,)`` min-pixel values searched with the threshold, ascending.
        n_groups: ``C * K``.
        n_folds: K.
        excluded: int64 ``(n_sets, E)`` folds each set leaves out.
        n_values: ``255 * (largest weight total) + 1``.
        empty_fixed: Fixed-point score of a pair empty on both sides.
        n_workers: Parallel workers (``numba.get_num_threads()``).

    Returns:
        ``(sums, thresholds, caps)``: :func:`best_mean_per_set` of each move, int64
        ``(M, C, n_sets)``; ``caps`` index ``min_pixels``.
    """
    n_moves = move_weights.shape[0]
    shape = (n_moves, n_groups // n_folds, excluded.shape[0])
    sums = np.zeros(shape, dtype=np.int64)
    thresholds = np.zeros(shape, dtype=np.int64)
    caps = np.zeros(shape, dtype=np.int64)
    pair_start = pairs[1]
    n_pairs = pair_start.shape[0] - 1
    longest = np.max(np.diff(pair_start)) if n_pairs > 0 else 0
    n_workers = max(1, n_workers)
    bounds = work_bounds(pair_start, n_workers)
    n_caps = min_pixels.shape[0]
    delta = np.zeros((n_workers, n_caps, n_groups, n_values + 1), dtype=np.int64)
    uncapped = np.zeros((n_workers, n_groups, n_values + 1), dtype=np.int64)
    # per-worker buffers, made once for every move (the walk leaves its histogram zeroed)
    scratch = [
        (np.empty(n_caps, dtype=np.int64), _pair_work(longest, n_values)) for _ in range(n_workers)
    ]
    for m in range(n_moves):
        for worker in prange(n_workers):
            delta[worker] = 0
            uncapped[worker] = 0
            work = (delta[worker], uncapped[worker], scratch[worker][0], scratch[worker][1])
            _move_deltas(
                move_weights[m],
                values,
                move_lowest[m],
                pairs,
                bounds[worker],
                bounds[worker + 1],
                min_pixels,
                n_values,
                empty_fixed,
                work,
            )
        total, plain = delta.sum(axis=0), uncapped.sum(axis=0)
        _suffix_fold_sums(total, plain, n_values)
        sums[m], thresholds[m], caps[m] = best_mean_per_set(
            total, move_lowest[m], n_folds, excluded
        )
    return sums, thresholds, caps


def score_mean_dice_moves_reference(
    move_weights,
    values,
    move_lowest,
    pairs,
    min_pixels,
    n_groups,
    n_folds,
    excluded,
    n_values,
    empty_fixed,
):
    """Numpy reference of :func:`score_mean_dice_moves`, a plain loop over moves and pairs."""
    labels, pair_start, pair_positives, pair_group = pairs
    results = []
    for m in range(len(move_weights)):
        level = move_weights[m].astype(np.int64) @ values.astype(np.int64)
        caps = np.array([_caps_reference(level, pair_start, n) for n in min_pixels])
        fold_sums = mean_dice_fold_sums_reference(
            level,
            labels,
            pair_start,
            pair_positives,
            pair_group,
            caps.reshape(len(min_pixels), -1),
            n_groups,
            int(move_lowest[m]),
            n_values,
            empty_fixed,
        )
        results.append(
            best_mean_per_set_reference(fold_sums, int(move_lowest[m]), n_folds, excluded)
        )
    return tuple(
        np.array([r[i] for r in results]).reshape(
            len(move_weights), n_groups // n_folds, len(excluded)
        )
        for i in range(3)
    )


def _caps_reference(level, pair_start, min_pixels):
    if min_pixels <= 0:
        return np.full(len(pair_start) - 1, np.iinfo(np.int64).max)
    caps = []
    for lo, hi in zip(pair_start[:-1], pair_start[1:]):
        ranked = np.sort(level[lo:hi])[::-1]
        caps.append(ranked[min_pixels - 1] if len(ranked) >= min_pixels else -1)
    return np.array(caps, dtype=np.int64)
