"""``mean_dice``: the mean over (image, class) pairs, checked against scikit-learn per pair."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from ensemble_kit.metrics import global_dice, mean_dice, pair_counts, task_metric


def sklearn_mean_dice(pred: np.ndarray, target: np.ndarray, empty_score: float) -> float:
    scores = []
    for image in range(pred.shape[0]):
        for c in range(pred.shape[1]):
            p, t = pred[image, c].ravel(), target[image, c].ravel()
            if not p.any() and not t.any():
                scores.append(empty_score)
            else:
                scores.append(f1_score(t, p))
    return float(np.mean(scores))


@pytest.mark.parametrize("seed", range(8))
def test_matches_sklearn_f1_per_pair(seed):
    rng = np.random.default_rng(seed)
    shape = (6, 3, 5, 7)
    present = rng.random(shape[:2]) < 0.4  # most pairs empty on each side
    target = (rng.random(shape) < 0.3) & present[:, :, None, None]
    guess = rng.random(shape[:2]) < 0.5
    pred = (rng.random(shape) < 0.3) & guess[:, :, None, None]
    for empty_score in (1.0, 0.0, 0.5):
        expected = sklearn_mean_dice(pred, target, empty_score)
        assert mean_dice(pred, target, empty_score) == pytest.approx(expected, abs=1e-12)


def test_severstal_all_empty_submission_scores_the_empty_share():
    target = np.zeros((10, 4, 3, 3), dtype=bool)
    target[:3, 0, 1, 1] = True  # 3 of 40 pairs non-empty
    assert mean_dice(np.zeros_like(target), target) == pytest.approx(37 / 40)


def test_one_class_shapes_and_dispatch():
    target = np.zeros((2, 4, 4), dtype=np.uint8)
    target[0, :2] = 1
    pred = target.copy()
    pred[0, 0, 0] = 0
    tp, fp, fn = pair_counts(pred, target)
    assert tp.tolist() == [[7], [0]] and fp.tolist() == [[0], [0]] and fn.tolist() == [[1], [0]]
    assert task_metric("mean_dice", pred, target) == pytest.approx((14 / 15 + 1.0) / 2)
    assert task_metric("global_dice", pred, target) == global_dice(pred, target)
    with pytest.raises(ValueError, match="unknown metric"):
        task_metric("iou", pred, target)
