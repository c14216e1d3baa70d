"""The blend search's numba kernels against their numpy references, on random data."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble_kit.blend import kernels, threshold
from ensemble_kit.blend.candidates import build_candidates
from ensemble_kit.blend.sets import FoldSets
from ensemble_kit.blend.threshold import image_chunks

SEEDS = [0, 1, 2, 3]
N_FOLDS = 3


def candidates(rng, n_configs=4, n_pixels=600):
    """Member codes, labels and folds of random candidate pixels, and each fold's positives
    (the labelled pixels plus some that the candidates dropped)."""
    values = rng.integers(0, 256, (n_configs, n_pixels)).astype(np.uint8)
    labels = (rng.random(n_pixels) < 0.3).astype(np.uint8)
    pixel_fold = rng.integers(0, N_FOLDS, n_pixels).astype(np.int8)
    positives = np.bincount(pixel_fold, weights=labels, minlength=N_FOLDS).astype(np.int64)
    return values, labels, pixel_fold, positives + rng.integers(0, 5, N_FOLDS)


@pytest.mark.parametrize("seed", SEEDS)
def test_weighted_sum_matches_reference(seed):
    rng = np.random.default_rng(seed)
    values, *_ = candidates(rng)
    weights = rng.integers(0, 5, len(values)).astype(np.int64)
    got = kernels.weighted_sum(values, weights)
    want = kernels.weighted_sum_reference(values, weights)
    assert got.dtype == want.dtype == np.int32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", SEEDS)
def test_fold_histograms_match_reference(seed):
    rng = np.random.default_rng(seed)
    _, labels, pixel_fold, _ = candidates(rng)
    levels = rng.integers(-1, 40, len(labels))  # -1: dropped by postprocessing
    got = kernels.fold_histograms(levels, labels, pixel_fold, N_FOLDS, 40)
    want = kernels.fold_histograms_reference(levels, labels, pixel_fold, N_FOLDS, 40)
    assert want.sum() == (levels >= 0).sum()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", SEEDS)
def test_pair_histograms_match_reference(seed):
    rng = np.random.default_rng(seed)
    values, labels, pixel_fold, _ = candidates(rng)
    sums = kernels.weighted_sum_reference(values, np.array([1, 2, 0, 1])).astype(np.int64)
    n_values = 4 * 255 + 1
    sizes = rng.multinomial(len(sums), np.full(7, 1 / 7))
    image_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cuts = rng.integers(-1, n_values, (3, len(sizes)))
    taus = np.where(rng.random((2, len(sums))) < 0.5, sums, rng.integers(-1, n_values, len(sums)))
    args = (sums, image_start, cuts, taus, labels, pixel_fold, N_FOLDS, n_values)
    got = kernels.pair_histograms(*args)
    want = kernels.pair_histograms_reference(*args)
    assert want.shape == (3, 2, N_FOLDS, n_values, 2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("workers", [1, 3])
def test_score_moves_matches_reference(seed, workers):
    rng = np.random.default_rng(seed)
    values, labels, pixel_fold, positives = candidates(rng, n_pixels=9000)  # > 2 MOVE_BLOCKs
    bases = np.array([[1, 0, 2, 0], [0, 1, 1, 1], [3, 0, 0, 1]], np.int64)
    # (base, config, sign): adding any config, removing one the base holds; base 2 unused
    moves = [(b, c, 1) for b in range(2) for c in range(4)]
    moves += [(b, c, -1) for b in range(2) for c in range(4) if bases[b, c]]
    move_base, move_config, move_sign = (np.array(col, np.int64) for col in zip(*moves))
    totals = bases.sum(axis=1)[move_base] + move_sign
    n_values = 255 * int(totals.max()) + 1
    args = (bases, values, move_base, move_config, move_sign, 20 * totals, labels, pixel_fold)
    sets = FoldSets.nested(N_FOLDS).excluded
    dice, thresholds = kernels.score_moves(*args, positives, sets, n_values, workers)
    want_dice, want_thresholds = kernels.score_moves_reference(*args, positives, sets, n_values)
    assert dice.shape == (len(moves), len(sets))
    np.testing.assert_array_equal(thresholds, want_thresholds)
    np.testing.assert_array_equal(dice, want_dice)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("counter", [np.int32, np.int64])
def test_base_histograms_match_reference(seed, counter):
    rng = np.random.default_rng(seed)
    values, labels, pixel_fold, _ = candidates(rng, n_pixels=9000)  # > 2 MOVE_BLOCKs
    weights = np.array([2, 0, 1, 3], np.int64)
    configs, signs = np.array([0, 1, 2, 3, 0, 3]), np.array([1, 1, 1, 1, -1, -1])
    n_values = 255 * 7 + 1
    hist = np.full((3, len(configs), N_FOLDS * n_values * 2), 7, dtype=counter)  # not zeroed
    kernels.base_histograms(weights, values, configs, signs, labels, pixel_fold, n_values, hist)
    want = kernels.base_histograms_reference(
        weights, values, configs, signs, labels, pixel_fold, N_FOLDS, n_values
    )
    assert want.sum() == len(configs) * len(labels)
    np.testing.assert_array_equal(hist.sum(axis=0), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_image_chunks_cover_every_image_once_within_the_limit(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 50, 40)
    sizes[rng.integers(0, 40)] = 120  # one image past the limit: a chunk of its own
    image_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    chunks = image_chunks(image_start, 100)
    assert [lo for lo, _ in chunks] == [0] + [hi for _, hi in chunks[:-1]]
    assert chunks[-1][1] == len(sizes)
    for lo, hi in chunks:
        assert hi > lo
        assert image_start[hi] - image_start[lo] <= 100 or hi == lo + 1
    assert image_chunks(np.zeros(1, dtype=np.int64), 100) == [(0, 0)]


def test_threshold_tables_in_chunks_equal_one_pass(monkeypatch):
    rng = np.random.default_rng(5)
    labels = (rng.random((12, 16, 16)) < 0.2).astype(np.uint8)
    oofs = [(rng.random((12, 16, 16)) * 255).astype(np.uint8) for _ in range(3)]
    cands = build_candidates(oofs, labels, np.arange(12) % N_FOLDS, floor=40)
    args = (cands, np.array([2, 1, 1]), (0, 3, 10), (0, 2, 5), FoldSets.nested(N_FOLDS))
    whole = threshold.threshold_tables(*args)
    monkeypatch.setattr(threshold, "TABLE_CHUNK_PIXELS", 300)  # ~4 images per chunk
    assert len(threshold.image_chunks(cands.image_start, 300)) > 2
    chunked = threshold.threshold_tables(*args)
    for name in ("dice", "thresholds", "levels_hist", "sums_hist"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name))
