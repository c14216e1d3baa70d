"""Benchmark of the mean-Dice blend search (a script, not a test).

    python benchmarks/mean_dice.py                       # 2,000 images x 4 classes, 64x256
    python benchmarks/mean_dice.py --images 200          # a quick small run

Prints, each measured in this run on the same candidate pixels (3 configs, weights 1:1:1,
about 75 % of (image, class) pairs empty, 5 folds, the 16 sets of the nested search, the
7 min-pixel values of ``ek blend``):
1. the search of one weight vector: numba (:func:`mean_dice_fold_sums` then
   :func:`best_mean_per_set`) against the plain per-pair numpy loop
   (:func:`mean_dice_fold_sums_reference` then :func:`best_mean_per_set_reference`), as a
   ratio (target >= 50x), and that the two agree exactly;
2. one Caruana move (:func:`score_mean_dice_moves`, blend sums and min-pixel cuts included)
   against its reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ensemble_kit.blend import kernels  # noqa: E402
from ensemble_kit.blend.candidates import build_candidates  # noqa: E402
from ensemble_kit.blend.levels import descending_order, min_pixel_levels  # noqa: E402
from ensemble_kit.blend.mean_dice import Pairs, empty_fixed  # noqa: E402
from ensemble_kit.blend.sets import FoldSets  # noqa: E402

PIXEL_GRID = (0, 5, 10, 20, 50, 100, 200)


def make_classes(n_images: int, n_classes: int, shape: tuple[int, int], seed: int = 0):
    """Per class: candidates of 3 noisy configs over rectangles in ~25 % of the pairs."""
    rng = np.random.default_rng(seed)
    folds = np.arange(n_images) % 5
    classes = []
    for _ in range(n_classes):
        labels = np.zeros((n_images, *shape), np.uint8)
        for i in np.flatnonzero(rng.random(n_images) < 0.25):
            r, c = rng.integers(0, shape[0] - 16), rng.integers(0, shape[1] - 40)
            labels[i, r : r + rng.integers(2, 16), c : c + rng.integers(4, 40)] = 1
        oofs = []
        for _ in range(3):
            noise = rng.standard_exponential(labels.shape, dtype=np.float32) * 0.01
            signal = labels * rng.uniform(0.3, 0.9, (n_images, 1, 1)).astype(np.float32)
            oofs.append(np.rint(np.clip(noise + signal, 0, 1) * 255).astype(np.uint8))
        classes.append(build_candidates(oofs, labels, folds))
    return classes


def timed(fn, *args, repeat: int = 1):
    """Best wall time of ``repeat`` calls, and the last result."""
    best, result = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def search_inputs(classes, weights):
    """Blend sums, min-pixel cuts and the stacked pair arrays of one weight vector."""
    pairs = Pairs.stack(classes)
    sums = kernels.weighted_sum(pairs.values, weights).astype(np.int64)
    labels, start, positives, group = pairs.arrays
    order = descending_order(sums, start)
    caps = np.stack([min_pixel_levels(sums, start, order, n) for n in PIXEL_GRID])
    total = int(weights.sum())
    lowest, n_values = pairs.floor * total, 255 * total + 1
    fold_args = (sums, labels, start, positives, group, caps, len(group) and group.max() + 1)
    return pairs, fold_args, lowest, n_values


def numba_search(fold_args, lowest, n_values, fixed, excluded):
    delta = kernels.mean_dice_fold_sums(
        *fold_args, lowest, n_values, fixed, numba.get_num_threads()
    )
    return kernels.best_mean_per_set(kernels.suffix_sums(delta), lowest, 5, excluded)


def reference_search(fold_args, lowest, n_values, fixed, excluded):
    sums = kernels.mean_dice_fold_sums_reference(*fold_args, lowest, n_values, fixed)
    return kernels.best_mean_per_set_reference(sums, lowest, 5, excluded)


def compare_search(classes, weights, excluded, fixed) -> None:
    pairs, fold_args, lowest, n_values = search_inputs(classes, weights)
    args = (fold_args, lowest, n_values, fixed, excluded)
    numba_search(*args)  # compile
    fast, got = timed(numba_search, *args, repeat=3)
    slow, expected = timed(reference_search, *args)
    same = all(np.array_equal(a, b) for a, b in zip(got, expected))
    print(
        f"search of one weight vector ({len(pairs.arrays[3]):,} pairs, "
        f"{len(pairs.arrays[0]):,} candidates, {len(PIXEL_GRID)} min-pixel values, "
        f"{len(excluded)} sets): numba {fast:.3f} s, per-pair loop {slow:.2f} s, "
        f"ratio {slow / fast:.0f}x (target >= 50x); identical: {same}"
    )


def compare_move(classes, weights, excluded, fixed) -> None:
    pairs = Pairs.stack(classes)
    base = kernels.weighted_sum(pairs.values, weights - np.eye(3, dtype=np.int64)[0])[None]
    one = np.zeros(1, dtype=np.int64)
    args = (
        base,
        pairs.values,
        one,
        one,
        one + 1,
        one + pairs.floor * int(weights.sum()),
        pairs.arrays,
        np.array(PIXEL_GRID, dtype=np.int64),
        pairs.n_classes * 5,
        5,
        excluded,
        255 * int(weights.sum()) + 1,
        fixed,
    )
    kernels.score_mean_dice_moves(*args, numba.get_num_threads())  # compile
    fast, got = timed(kernels.score_mean_dice_moves, *args, numba.get_num_threads(), repeat=3)
    slow, expected = timed(kernels.score_mean_dice_moves_reference, *args)
    same = all(np.array_equal(a, b) for a, b in zip(got, expected))
    print(
        f"one Caruana move: numba {fast:.3f} s, reference {slow:.2f} s, "
        f"ratio {slow / fast:.0f}x; identical: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    start = time.perf_counter()
    classes = make_classes(args.images, args.classes, (args.height, args.width))
    print(
        f"{args.images} images x {args.classes} classes of {args.height}x{args.width}, "
        f"candidates built in {time.perf_counter() - start:.1f} s; "
        f"numba threads: {numba.get_num_threads()}"
    )
    weights = np.array([1, 1, 1], dtype=np.int64)
    excluded = FoldSets.nested(5).excluded
    compare_search(classes, weights, excluded, empty_fixed(1.0))
    compare_move(classes, weights, excluded, empty_fixed(1.0))


if __name__ == "__main__":
    main()
