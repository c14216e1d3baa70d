"""Agreement of the metric kernels with numpy references and scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from ensemble_kit import metrics


def _random_case(seed, shape=(3, 17, 13)):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = (rng.random(shape) < rng.random()).astype(np.uint8)
    return values, labels


EDGE_CASES = {
    "all_empty": (np.zeros((2, 5, 5), np.uint8), np.zeros((2, 5, 5), np.uint8)),
    "all_positive": (np.full((2, 5, 5), 255, np.uint8), np.ones((2, 5, 5), np.uint8)),
    "one_pixel": (np.array([[[7]]], np.uint8), np.array([[[1]]], np.uint8)),
    "ties": (np.full((1, 6, 6), 128, np.uint8), np.eye(6, dtype=np.uint8)[None]),
    "extremes": (
        np.array([[[0, 255], [255, 0]]], np.uint8),
        np.array([[[1, 1], [0, 0]]], np.uint8),
    ),
}


@pytest.mark.parametrize("seed", range(5))
def test_global_dice_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((4, 9, 11)) < rng.random()
    target = rng.random((4, 9, 11)) < rng.random()
    expected = f1_score(target.ravel(), pred.ravel(), zero_division=1.0)
    assert metrics.global_dice(pred, target) == pytest.approx(expected, abs=1e-12)


def test_global_dice_empty_on_empty_is_one():
    empty = np.zeros((3, 4, 4), bool)
    assert metrics.global_dice(empty, empty) == 1.0


def test_global_dice_is_one_sum_not_mean_of_images():
    pred = np.array([[[1, 1]], [[0, 0]]], bool)
    target = np.array([[[1, 1]], [[1, 0]]], bool)
    assert metrics.global_dice(pred, target) == pytest.approx(2 * 2 / (2 + 3))


@pytest.mark.parametrize("case", [*range(4), *EDGE_CASES])
def test_histograms_match_reference(case):
    values, labels = _random_case(case) if isinstance(case, int) else EDGE_CASES[case]
    got = metrics.image_histograms(values, labels)
    np.testing.assert_array_equal(got, metrics.image_histograms_reference(values, labels))
    assert got.sum() == values.size


@pytest.mark.parametrize("case", [*range(4), *EDGE_CASES])
def test_threshold_sweep_matches_reference_exactly(case):
    values, labels = _random_case(case) if isinstance(case, int) else EDGE_CASES[case]
    got = metrics.threshold_sweep(values, labels)
    want = metrics.threshold_sweep_reference(values, labels)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("case", [*range(4), *EDGE_CASES])
def test_best_threshold_is_the_brute_force_optimum(case):
    values, labels = _random_case(case) if isinstance(case, int) else EDGE_CASES[case]
    dice = [metrics.global_dice(values >= t, labels) for t in range(256)]
    dice.append(metrics.global_dice(np.zeros_like(values, bool), labels))  # t = 256: nothing
    threshold, best = metrics.best_threshold(values, labels)
    assert best == pytest.approx(max(dice), abs=1e-12)
    assert threshold == int(np.argmax(np.array(dice) >= max(dice) - 1e-12))


def test_best_threshold_predicts_nothing_when_labels_are_empty():
    values = np.full((1, 3, 3), 200, np.uint8)
    threshold, dice = metrics.best_threshold(values, np.zeros_like(values))
    assert dice == 1.0 and threshold > 200  # 201 is the smallest threshold marking nothing


def test_dice_from_counts_arrays():
    np.testing.assert_allclose(
        metrics.dice_from_counts([1, 0, 0], [1, 0, 2], [0, 0, 1]), [2 / 3, 1.0, 0.0]
    )


@pytest.mark.parametrize("case", [*range(3), *EDGE_CASES])
def test_global_histogram_matches_reference(case):
    values, labels = (
        _random_case(case, shape=(3, 200, 250)) if isinstance(case, int) else EDGE_CASES[case]
    )
    np.testing.assert_array_equal(
        metrics.global_histogram(values, labels), metrics.global_histogram_reference(values, labels)
    )
