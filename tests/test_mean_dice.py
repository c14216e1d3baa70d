"""Mean Dice over (image, class) pairs in the blend: kernels against their plain references,
choices against dense masks scored pair by pair with scikit-learn's f1."""

import numba
import numpy as np
import pytest
from sklearn.metrics import f1_score

from ensemble_kit.blend import kernels
from ensemble_kit.blend.mean_dice import (
    MeanDiceScorer,
    choose_per_class,
    class_candidates,
    empty_fixed,
    heldout_sum,
    mean_dice_tables,
    mean_of,
    nested_mean_dice,
)
from ensemble_kit.blend.selection import best_prefix_weights, greedy_paths, refine_weights
from ensemble_kit.blend.sets import FoldSets
from ensemble_kit.errors import EkError
from ensemble_kit.oof import to_codes
from ensemble_kit.postprocess import (
    apply_min_pixels_reference,
    remove_small_components_batch,
    remove_small_components_reference,
)

INT64_MAX = np.iinfo(np.int64).max
THREADS = numba.get_num_threads()


def _random_pairs(rng, n_pairs=30, n_values=40, n_groups=6, longest=12):
    """Sparse pairs with ties (few distinct levels), pairs with no candidates, pairs whose
    positives lie partly among dropped pixels, and caps of every kind."""
    counts = rng.integers(0, longest, n_pairs)
    counts[::5] = 0
    start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    levels = rng.integers(-1, rng.integers(2, n_values), start[-1]).astype(np.int64)
    labels = (rng.random(start[-1]) < 0.4).astype(np.uint8)
    positives = np.add.reduceat(np.append(labels, 0), start[:-1]).astype(np.int64)
    positives[counts == 0] = 0
    positives += rng.integers(0, 3, n_pairs) * (rng.random(n_pairs) < 0.3)
    group = rng.integers(0, n_groups, n_pairs).astype(np.int64)
    caps = np.stack(
        [np.full(n_pairs, INT64_MAX), rng.integers(-1, n_values, n_pairs), np.full(n_pairs, -1)]
    ).astype(np.int64)
    return levels, labels, start, positives, group, caps


@pytest.mark.parametrize("seed", range(40))
def test_fold_sums_match_the_per_pair_reference(seed):
    rng = np.random.default_rng(seed)
    arrays = _random_pairs(rng)
    lowest, n_values = int(rng.integers(0, 10)), 40
    fixed = empty_fixed(float(rng.choice([0.0, 0.5, 1.0])))
    delta = kernels.mean_dice_fold_sums(*arrays, 6, lowest, n_values, fixed, THREADS)
    expected = kernels.mean_dice_fold_sums_reference(*arrays, 6, lowest, n_values, fixed)
    np.testing.assert_array_equal(kernels.suffix_sums(delta)[..., lowest:], expected[..., lowest:])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_values", [300, 3000])
def test_fold_sums_of_long_pairs_match_the_reference(seed, n_values):
    """Pairs of hundreds of pixels: levels spread wide (the radix-sorted walk) or packed
    (the histogram walk)."""
    rng = np.random.default_rng(seed)
    arrays = _random_pairs(rng, n_pairs=12, n_values=n_values, longest=900)
    fixed = empty_fixed(1.0)
    delta = kernels.mean_dice_fold_sums(*arrays, 6, 5, n_values, fixed, THREADS)
    expected = kernels.mean_dice_fold_sums_reference(*arrays, 6, 5, n_values, fixed)
    np.testing.assert_array_equal(kernels.suffix_sums(delta)[..., 5:], expected[..., 5:])


@pytest.mark.parametrize("count", [0, 1, 63, 64, 700, 5000])
@pytest.mark.parametrize("top", [1, 255, 256, 70_000, 2**40])
def test_radix_sort_matches_numpy(count, top):
    keys = np.random.default_rng(count + top).integers(0, top + 1, count).astype(np.int64)
    buffer, scratch = np.append(keys, [7, 7]), np.zeros(count + 2, dtype=np.int64)
    kernels.sort_descending(buffer, count, scratch)
    np.testing.assert_array_equal(buffer[:count], np.sort(keys)[::-1])
    assert list(buffer[count:]) == [7, 7]  # past count: untouched


@pytest.mark.parametrize("seed", range(30))
def test_best_per_set_matches_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    sums = rng.integers(0, 4, (3, 2 * 4, 20)).astype(np.int64)  # few values: many ties
    excluded = FoldSets.nested(4).excluded
    lowest = int(rng.integers(0, 5))
    got = kernels.best_mean_per_set(sums, lowest, 4, excluded)
    expected = kernels.best_mean_per_set_reference(sums, lowest, 4, excluded)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", range(18))
def test_scored_moves_match_reference(seed):
    rng = np.random.default_rng(seed)
    # the last seeds: long pairs, on the histogram walk (15) or radix-sorted (16, 17)
    longest = [400, 150, 400][seed - 15] if seed >= 15 else 12
    levels, labels, start, positives, group, _ = _random_pairs(rng, n_groups=2 * 3, longest=longest)
    values = rng.integers(0, 14 if seed <= 15 else 256, (3, len(labels))).astype(np.uint8)
    # the moves of bases (1, 0, 0) and (1, 1, 0): +config 0, +config 2, +config 1, -config 1
    weights = np.array([[2, 0, 0], [1, 0, 1], [1, 2, 0], [1, 0, 0]], dtype=np.int64)
    lowest = 2 * weights.sum(axis=1)
    args = (
        weights,
        values,
        lowest,
        (labels, start, positives, group),
        np.array([0, 2, 5, 100], dtype=np.int64),
        6,
        3,
        FoldSets.nested(3).excluded,
        255 * 3 + 1,
        empty_fixed(1.0),
    )
    expected = kernels.score_mean_dice_moves_reference(*args)
    # each move's pairs are split among the workers: any number of them, more than pairs too
    for workers in (THREADS, 1, 3, 500):
        for a, b in zip(kernels.score_mean_dice_moves(*args, workers), expected):
            np.testing.assert_array_equal(a, b)


def _problem(seed, n=12, n_classes=2, n_configs=3, side=12, empty_class=False):
    """Dense OOF codes ``(N, C, H, W)`` and labels, most pairs empty; folds ``i % 3``."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, n_classes, side, side), np.uint8)
    for i, c in np.ndindex(n, n_classes):
        if rng.random() < 0.4 and not (empty_class and c == 1):
            r, col = rng.integers(0, side - 4, 2)
            labels[i, c, r : r + rng.integers(1, 4), col : col + rng.integers(1, 5)] = 1
    oofs = []
    for k in range(n_configs):
        noise = rng.normal(0, 0.2 + 0.05 * k, labels.shape)
        oofs.append(to_codes(np.clip(labels * 0.5 + 0.1 + noise, 0, 1) ** 2))
    return oofs, labels, np.arange(n) % 3


def _dense_pair_scores(oofs, labels, weights, rules, empty_score):
    """Per (image, class) f1 of the dense masks under per-class (threshold, min_pixels,
    min_component) rules, by scikit-learn."""
    scores = np.zeros(labels.shape[:2])
    for c, (threshold, min_pixels, min_component) in enumerate(rules):
        sums = sum(int(w) * oof[:, c].astype(np.int64) for w, oof in zip(weights[c], oofs))
        masks = apply_min_pixels_reference(sums >= threshold, min_pixels)
        for i in range(len(masks)):
            mask = remove_small_components_reference(masks[i], min_component)
            scores[i, c] = f1_score(labels[i, c].ravel(), mask.ravel(), zero_division=empty_score)
    return scores


def _rules(choice):
    return [(c.threshold_sum, c.min_pixels, c.min_component) for c in choice.classes]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("empty_score", [1.0, 0.0])
def test_choices_score_what_dense_masks_score_with_sklearn(seed, empty_score):
    oofs, labels, folds = _problem(seed, empty_class=seed == 3)
    classes = class_candidates(oofs, labels, folds)
    weights = np.array([[1, 2, 0], [0, 1, 1]])  # per-class weights
    tables = mean_dice_tables(classes, weights, (0, 3, 30), (0, 3), empty_score)
    sets = FoldSets.nested(3)
    for s in range(len(sets)):
        choice = choose_per_class(tables, sets, s)
        scores = _dense_pair_scores(oofs, labels, weights, _rules(choice), empty_score)
        in_set = sets.members(s)[folds]
        assert choice.dice == pytest.approx(scores[in_set].mean(), abs=1e-8)
        for k in range(3):
            held = mean_of(heldout_sum(choice, k), 2 * (folds == k).sum())
            assert held == pytest.approx(scores[folds == k].mean(), abs=1e-8)


def test_tables_in_chunks_equal_one_pass(monkeypatch):
    """Chunks of a few images reuse one set of buffers (value order, neighbour table,
    component levels): the tables equal those of one pass."""
    from ensemble_kit.blend import threshold

    oofs, labels, folds = _problem(6, n=24, side=16)
    classes = class_candidates(oofs, labels, folds)
    args = (classes, np.array([2, 1, 1]), (0, 3, 30), (0, 2, 5))
    whole = mean_dice_tables(*args)
    monkeypatch.setattr(threshold, "TABLE_CHUNK_PIXELS", 150)  # read by ranked_chunks
    assert len(threshold.image_chunks(classes[0].image_start, 150)) > 2
    np.testing.assert_array_equal(mean_dice_tables(*args).sums, whole.sums)


def _dense_best(sums, truth, lowest, grids):
    """Best mean over images of one class's per-image dice (1 when both empty) over every
    (threshold, min-pixels, min-component), from dense masks in plain numpy."""
    best = -1.0
    for t in [*np.unique(sums[sums >= lowest]), sums.max() + 1]:
        raw = sums >= t
        counts = raw.sum(axis=(1, 2))
        for m in grids[1]:
            kept = remove_small_components_batch(raw, m) if m > 1 else raw
            for n in grids[0]:
                masks = kept & (counts >= n)[:, None, None]  # min-pixels, then components
                tp = (masks & (truth > 0)).sum(axis=(1, 2))
                denominator = masks.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
                dice = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
                best = max(best, dice.mean())
    return best


def test_choice_is_the_best_of_every_dense_rule():
    oofs, labels, folds = _problem(5, n=6, side=10)
    classes = class_candidates(oofs, labels, folds)
    grids = ((0, 4, 40), (0, 3))
    choice = choose_per_class(mean_dice_tables(classes, [2, 1, 1], *grids), FoldSets.nested(3), 0)
    for c in range(2):
        sums = sum(w * oof[:, c].astype(np.int64) for w, oof in zip([2, 1, 1], oofs))
        best = _dense_best(sums, labels[:, c], classes[0].floor * 4, grids)
        assert choice.classes[c].dice == pytest.approx(best, abs=1e-8)


def test_dropped_positives_count_as_missed():
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[0, 0, :4] = 1  # two positives the model sees, two it scores 0 everywhere
    oof = np.zeros((2, 8, 8), np.uint8)
    oof[0, 0, :2] = 200
    choice = choose_per_class(
        mean_dice_tables(class_candidates([oof], labels, np.array([0, 1])), np.array([1])),
        FoldSets.nested(2),
        0,
    )
    assert choice.dice == pytest.approx((2 * 2 / (2 + 4) + 1.0) / 2, abs=1e-9)


def test_an_all_empty_class_predicts_nothing_and_scores_the_empty_score():
    oofs, labels, folds = _problem(1, empty_class=True)
    tables = mean_dice_tables(class_candidates(oofs, labels, folds), np.array([1, 1, 1]))
    choice = choose_per_class(tables, FoldSets.nested(3), 0)
    sums = sum(oof[:, 1].astype(np.int64) for oof in oofs)
    assert choice.classes[1].threshold_sum > sums.max()  # the smallest that predicts nothing
    assert choice.classes[1].dice == 1.0


def test_scorer_agrees_with_tables_and_drives_the_greedy_selection():
    oofs, labels, folds = _problem(2, n=15)
    classes = class_candidates(oofs, labels, folds)
    sets = FoldSets.nested(3)
    scorer = MeanDiceScorer(classes, sets, empty_score=1.0, pixel_grid=(5, 20))
    paths = greedy_paths(scorer, steps=4)
    for s, path in enumerate(paths):
        weights = best_prefix_weights(path, len(oofs))
        dice, thresholds, min_pixels = scorer.score(weights)
        assert dice[s] == max(score for _, score in path)
        choice = choose_per_class(mean_dice_tables(classes, weights, (0, 5, 20)), sets, s)
        assert dice[s] == pytest.approx(choice.dice, abs=1e-12)
        assert [c.threshold_sum for c in choice.classes] == list(thresholds[:, s])
        assert [c.min_pixels for c in choice.classes] == list(min_pixels[:, s])


def test_one_class_per_scorer_gives_per_class_weights():
    oofs, labels, folds = _problem(3)
    classes = class_candidates(oofs, labels, folds)
    both = MeanDiceScorer(classes).score(np.array([1, 0, 2]))[0]
    alone = [MeanDiceScorer([cands]).score(np.array([1, 0, 2]))[0] for cands in classes]
    np.testing.assert_allclose(both, np.mean(alone, axis=0), atol=1e-12)


def test_a_holdout_of_one_fold_is_searched_as_set_zero():
    oofs, labels, _ = _problem(4, n=6)
    folds = np.zeros(6, dtype=np.int64)
    tables = mean_dice_tables(class_candidates(oofs, labels, folds), np.array([1, 1, 0]), (0, 5))
    choice = choose_per_class(tables, FoldSets.nested(1), 0)
    scores = _dense_pair_scores(oofs, labels, np.array([[1, 1, 0]] * 2), _rules(choice), 1.0)
    assert choice.dice == pytest.approx(scores.mean(), abs=1e-8)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_empty_score_outside_zero_one_is_an_error(bad):
    with pytest.raises(EkError, match="empty_score"):
        empty_fixed(bad)


def test_nested_estimate_scores_each_fold_with_the_choice_made_without_it():
    oofs, labels, folds = _problem(6)
    classes = class_candidates(oofs, labels, folds)
    sets = FoldSets.nested(3)
    tables = mean_dice_tables(classes, [1, 1, 1], (0, 5), (0,))
    choices = [choose_per_class(tables, sets, s) for s in range(len(sets))]
    pooled, per_fold = nested_mean_dice(choices, sets, tables.fold_images)
    weights = np.ones((2, 3), dtype=np.int64)
    scores = np.zeros(labels.shape[:2])
    for k in range(3):
        rules = _rules(choices[sets.index(k)])
        scores[folds == k] = _dense_pair_scores(oofs, labels, weights, rules, 1.0)[folds == k]
        assert per_fold[k] == pytest.approx(scores[folds == k].mean(), abs=1e-8)
    assert pooled == pytest.approx(scores.mean(), abs=1e-8)


def test_refinement_on_the_mean_dice_scorer_never_lowers_a_sets_score():
    oofs, labels, folds = _problem(7)
    scorer = MeanDiceScorer(class_candidates(oofs, labels, folds), pixel_grid=(5,))
    start = np.array([1, 0, 1], dtype=np.int64)
    refined = refine_weights(scorer, [start] * len(scorer.sets))
    before = scorer.score(start)[0]
    after = [scorer.score(w)[0][s] for s, w in enumerate(refined)]
    assert all(a >= b - 1e-12 for a, b in zip(after, before))
    assert any(a > b + 1e-9 for a, b in zip(after, before))  # the search found something
