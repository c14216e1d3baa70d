"""The nested estimate is fully nested; one threshold rule in the search, holdout and submit."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ensemble_kit import metrics
from ensemble_kit.blend.candidates import build_candidates
from ensemble_kit.blend.ensemble_search import search
from ensemble_kit.blend.nested import OPTIONS
from ensemble_kit.blend.rule import BlendRule, top_fraction_threshold
from ensemble_kit.blend.run import rule_of
from ensemble_kit.blend.sets import FoldSets
from ensemble_kit.blend.threshold import choose_threshold, heldout_counts
from ensemble_kit.cli import main
from ensemble_kit.errors import EkError
from ensemble_kit.oof import to_codes

GRIDS = {"min_pixels_grid": (0, 5), "min_component_grid": (0, 2)}


def _labels(rng, n, shape=(16, 16)):
    labels = np.zeros((n, *shape), np.uint8)
    for i in range(0, n, 2):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
            labels[i, r : r + rng.integers(1, 4), c : c + rng.integers(1, 5)] = 1
    return labels


def _miscalibrated(seed=0, n=48, n_folds=4):
    """Three configs whose probabilities are shifted by a different amount in each fold.

    A threshold value then carries over badly between folds and the top fraction of pixels
    better, so which mode wins depends on which folds the choice sees.
    """
    rng = np.random.default_rng(seed)
    labels = _labels(rng, n)
    folds = (np.arange(n) // 2) % n_folds
    shift = rng.normal(0, 0.12, n_folds)[folds][:, None, None]
    oofs = [
        to_codes(labels * 0.6 + 0.1 + shift + rng.normal(0, 0.12 + 0.04 * i, labels.shape))
        for i in range(3)
    ]
    return oofs, labels, folds


def _without(oofs, labels, folds, k):
    keep = folds != k
    others = folds[keep] - (folds[keep] > k)
    return [o[keep] for o in oofs], labels[keep], others


def _dense_dice(fields: BlendRule, arrays: dict, labels) -> float:
    """Dice of a blend on a set the way ``ek submit`` applies it (the rule only)."""
    return metrics.global_dice(_dense_mask(fields, arrays), labels)


@pytest.mark.parametrize("refine", [False, True])
def test_each_fold_is_scored_by_the_search_run_on_the_other_folds_alone(refine):
    # before the fix, the mode (and refinement) was picked by comparing pooled nested scores,
    # so folds 1 and 2 here were scored in top_fraction mode although a search on the other
    # folds alone picks value (nested 0.90 and 1.0 reported, 0.76 and 0.73 honest)
    oofs, labels, folds = _miscalibrated(seed=0)
    result = search(oofs, labels, folds, steps=3, refine=refine, **GRIDS)
    modes = set()
    for k in range(4):
        alone = search(*_without(oofs, labels, folds, k), steps=3, refine=refine, **GRIDS)
        choice, option = result.nested.choice_for(k)
        assert (option.mode, option.refine) == (alone.mode, alone.nested.refined)
        np.testing.assert_array_equal(choice.weights, alone.choice.weights)
        assert choice.threshold_sum == alone.choice.threshold_sum
        assert (choice.min_pixels, choice.min_component) == (
            alone.choice.min_pixels,
            alone.choice.min_component,
        )
        fields = rule_of(alone)
        held_out = dict(zip(alone.names, [o[folds == k] for o in oofs]))
        want = _dense_dice(fields, held_out, labels[folds == k])
        assert result.nested.per_fold()[k] == pytest.approx(want, abs=1e-12)
        modes.add(option.mode)
    assert result.mode == "top_fraction" and "value" in modes  # the case the bug needs


def test_final_option_is_the_best_cross_validated_option():
    oofs, labels, folds = _miscalibrated(seed=0)
    result = search(oofs, labels, folds, steps=3, refine=True, **GRIDS)
    nested = result.nested
    assert set(nested.option_scores()) == {
        "value",
        "top_fraction",
        "value+refine",
        "top_fraction+refine",
    }
    for option in OPTIONS:  # each option's score: its choice on K-1 folds, applied densely
        tp = fp = fn = 0
        for k in range(4):
            choice = nested.choices[option.refine][nested.sets.index(k)]
            fields = _fields(result.names, choice, option.mode, result.floor)
            arrays = dict(zip(result.names, [o[folds == k] for o in oofs]))
            predicted = _dense_mask(fields, arrays)
            truth = labels[folds == k] > 0
            tp += int((predicted & truth).sum())
            fp += int((predicted & ~truth).sum())
            fn += int((~predicted & truth).sum())
        assert nested.option_scores()[option.label] == pytest.approx(
            metrics.dice_from_counts(tp, fp, fn), abs=1e-12
        )
    scores = nested.option_scores()
    assert scores[nested.final.label] == max(scores.values())


def _fields(names, choice, mode, floor):
    return BlendRule(
        weights={n: int(w) for n, w in zip(names, choice.weights) if w > 0},
        mode=mode,
        threshold_sum=int(choice.threshold_sum),
        top_fraction=choice.top_fraction,
        floor=floor,
        min_pixels=choice.min_pixels,
        min_component=choice.min_component,
    )


def _dense_mask(rule, arrays):
    return rule.apply(arrays)  # top_fraction: the threshold of these arrays' own histogram


def test_top_fraction_below_the_floor_is_raised_to_it_in_search_and_submit_alike():
    oofs, labels, folds = _miscalibrated(seed=3, n_folds=3)
    quiet = folds == 2  # one fold with almost no confident pixels
    oofs = [np.where(quiet[:, None, None], o // 8, o).astype(np.uint8) for o in oofs]
    cands = build_candidates(oofs, labels, folds)
    weights = np.array([1, 1, 0], np.int64)
    sets = FoldSets.nested(3)
    choice = choose_threshold(cands, weights, sets.index(2), (0,), (0,), sets=sets)
    fields = _fields(["a", "b", "c"], choice, "top_fraction", cands.floor)
    arrays = {"a": oofs[0][quiet], "b": oofs[1][quiet]}
    raw = top_fraction_threshold(fields.histogram(arrays), choice.top_fraction)
    assert raw < fields.floor_sum  # the case: the fraction reaches below the floor
    tp, fp, fn = heldout_counts(
        choice,
        2,
        "top_fraction",
        fields.floor_sum,
        int(cands.fold_pixels[2]),
        int(cands.fold_positives[2]),
    )
    predicted = fields.apply(arrays, raw)  # as ek submit calls it
    truth = labels[quiet] > 0
    assert (tp, fp) == (int((predicted & truth).sum()), int((predicted & ~truth).sum()))
    assert fn == int((~predicted & truth).sum())
    floor_mask = fields.apply(arrays, fields.floor_sum)
    np.testing.assert_array_equal(predicted, floor_mask)


def test_floor_sum_of_an_older_blend_json_comes_from_search_floor(tmp_path):
    old = {
        "configs": {"a": 2, "b": 1},
        "threshold_mode": "value",
        "threshold_sum": 300,
        "threshold": 0.5,
        "top_fraction": None,
        "min_pixels": 0,
        "min_component": 0,
        "scores": {"search_floor": 13 / 255},
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert BlendRule.load(tmp_path / "old.json").floor_sum == 39
    del old["scores"]
    (tmp_path / "older.json").write_text(json.dumps(old))
    assert BlendRule.load(tmp_path / "older.json").floor_sum == 0


@pytest.mark.parametrize("steps", [0, -3])
def test_search_rejects_fewer_than_one_step(steps):
    oofs, labels, folds = _miscalibrated()
    with pytest.raises(EkError, match="steps"):
        search(oofs, labels, folds, steps=steps)


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_cli_rejects_fewer_than_one_step(tmp_path, steps):
    result = CliRunner().invoke(
        main, ["blend", "--oof", "--workdir", str(tmp_path), "--steps", steps]
    )
    assert result.exit_code == 2
    assert "--steps" in result.output and "Traceback" not in result.output


def test_two_folds_keep_the_default_option_inside_each_one_fold_set():
    oofs, labels, folds = _miscalibrated(n_folds=2)
    result = search(oofs, labels, folds, steps=2, refine=True, **GRIDS)
    assert [o.label for o in result.nested.picked] == ["value", "value"]
    assert len(result.nested.sets) == 3  # all, fold 0 out, fold 1 out: no pair sets
