"""The threshold on the holdout: its best one beside the OOF one, and --threshold-from holdout."""

import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from test_blend import _labels, _noisy, _write_workdir

from ensemble_kit import metrics
from ensemble_kit.blend.ensemble_search import search
from ensemble_kit.blend.holdout import CROSSFIT_REPEATS, check_holdout, random_halves
from ensemble_kit.blend.rule import BlendRule, fraction_threshold
from ensemble_kit.blend.run import run_blend
from ensemble_kit.blend.verify import verify_blend
from ensemble_kit.cli import main
from ensemble_kit.errors import EkError


def _oof_and_holdout(seed=0, n=30, m=24, holdout_scale=1.0):
    rng = np.random.default_rng(seed)
    labels, holdout_labels = _labels(rng, n), _labels(rng, m)
    oofs = [_noisy(rng, labels, 0.12 + 0.05 * i) for i in range(3)]
    holdout = [
        (_noisy(rng, holdout_labels, 0.12 + 0.05 * i) * holdout_scale).astype(np.uint8)
        for i in range(3)
    ]
    return oofs, labels, np.arange(n) % 3, holdout, holdout_labels


def _fields(choice, mode, floor):
    return BlendRule(
        weights={f"c{i}": int(w) for i, w in enumerate(choice.weights) if w > 0},
        mode=mode,
        threshold_sum=int(choice.threshold_sum),
        top_fraction=choice.top_fraction,
        floor=floor,
        min_pixels=choice.min_pixels,
        min_component=choice.min_component,
    )


def _counts(fields, codes, labels, rows, threshold):
    arrays = {f"c{i}": c[rows] for i, c in enumerate(codes) if f"c{i}" in fields.weights}
    predicted, truth = fields.apply(arrays, threshold), labels[rows] > 0
    return np.array(
        [(predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()]
    )


def _dense_best(fields, codes, labels, rows):
    """Best threshold on ``rows`` by trying every one through apply_blend (smallest on ties)."""
    top = 255 * sum(fields.weights.values()) + 1
    dice = [
        metrics.dice_from_counts(*_counts(fields, codes, labels, rows, t))
        for t in range(fields.floor_sum, top + 1)
    ]
    best = int(np.argmax(dice))
    return fields.floor_sum + best, dice[best]


def _applied(fields, codes, rows, threshold, fraction, mode):
    if mode == "value":
        return threshold
    arrays = {f"c{i}": c[rows] for i, c in enumerate(codes) if f"c{i}" in fields.weights}
    histogram = fields.histogram(arrays)
    return fraction_threshold(histogram, fraction, fields.floor_sum)


def _fraction_at(fields, codes, rows, threshold):
    arrays = {f"c{i}": c[rows] for i, c in enumerate(codes) if f"c{i}" in fields.weights}
    sums = fields.sums(arrays)
    return np.count_nonzero(sums >= threshold) / sums.size


@pytest.mark.parametrize("mode", ["value", "top_fraction"])
def test_check_holdout_matches_apply_blend_threshold_by_threshold(mode):
    oofs, labels, folds, holdout, holdout_labels = _oof_and_holdout(holdout_scale=0.8)
    result = search(oofs, labels, folds, steps=3, min_pixels_grid=(0, 5), min_component_grid=(0, 2))
    choice = result.choice
    check = check_holdout(
        holdout, holdout_labels, choice, mode, result.floor, crossfit=True, repeats=3
    )
    fields = _fields(choice, mode, result.floor)
    every = np.arange(len(holdout_labels))
    best, best_dice = _dense_best(fields, holdout, holdout_labels, every)
    assert (check.best_threshold_sum, check.best_dice) == (
        best,
        pytest.approx(best_dice, abs=1e-12),
    )
    assert check.best_top_fraction == pytest.approx(_fraction_at(fields, holdout, every, best))
    rule = _applied(fields, holdout, every, choice.threshold_sum, choice.top_fraction, mode)
    at_rule = _counts(fields, holdout, holdout_labels, every, rule)
    assert check.rule_threshold_sum == rule
    assert check.rule_dice == pytest.approx(metrics.dice_from_counts(*at_rule), abs=1e-12)
    assert check.gap >= 0
    for halves, got in zip(random_halves(len(holdout_labels), 3, 0), check.crossfit):
        total = np.zeros(3, np.int64)
        for scored in (0, 1):
            chosen, _ = _dense_best(
                fields, holdout, holdout_labels, np.flatnonzero(halves != scored)
            )
            fraction = _fraction_at(fields, holdout, np.flatnonzero(halves != scored), chosen)
            rows = np.flatnonzero(halves == scored)
            applied = _applied(fields, holdout, rows, chosen, fraction, mode)
            total += _counts(fields, holdout, holdout_labels, rows, applied)
        assert got == pytest.approx(metrics.dice_from_counts(*total), abs=1e-12)


def test_random_halves_are_halves_and_seeded():
    first, second = random_halves(9, 2, 0), random_halves(9, 2, 0)
    assert [h.sum() for h in first] == [5, 5]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], first[1])


def test_default_reports_the_holdout_best_threshold_beside_the_oof_one(tmp_path):
    layout, _ = _write_workdir(tmp_path)
    written = run_blend(layout, steps=3)
    assert written.rule.threshold_from == "oof"
    check = written.scores["holdout_threshold"]
    assert check["dice_at_oof_threshold"] == pytest.approx(written.scores["holdout"], abs=1e-12)
    assert check["best_dice"] >= check["dice_at_oof_threshold"]
    assert check["warning"] == (check["gap"] > 0.005)
    assert written.scores["holdout_crossfit"] is None
    report = (layout.blend_report_dir / "report.txt").read_text()
    assert "holdout best threshold:" in report and "at the OOF threshold" in report


def _shrink_holdout(layout, factor):
    for name in ("alpha", "beta"):
        codes = np.load(layout.holdout_npy(name))
        np.save(layout.holdout_npy(name), (codes * factor).astype(np.uint8))


def test_a_gap_on_the_holdout_is_warned_in_log_and_report(tmp_path, caplog):
    layout, _ = _write_workdir(tmp_path)
    _shrink_holdout(layout, 0.45)  # fold-mean-like: less confident than OOF
    with caplog.at_level(logging.WARNING):
        written = run_blend(layout, steps=3)
    check = written.scores["holdout_threshold"]
    assert check["warning"] and check["gap"] > 0.005
    assert "--threshold-from holdout" in caplog.text
    assert (
        "WARNING: the holdout's best threshold gains"
        in (layout.blend_report_dir / "report.txt").read_text()
    )


def test_threshold_from_holdout(tmp_path):
    layout, _ = _write_workdir(tmp_path)
    _shrink_holdout(layout, 0.45)
    oof = run_blend(layout, steps=3)
    written = run_blend(layout, steps=3, threshold_from="holdout")
    rule, oof_rule = written.rule, oof.rule
    assert rule.threshold_from == "holdout"
    assert rule.weights == oof_rule.weights  # weights and postprocessing still from OOF
    assert rule.min_pixels == oof_rule.min_pixels
    check = written.scores["holdout_threshold"]
    assert rule.threshold_sum == check["best_threshold_sum"] != oof_rule.threshold_sum
    assert rule.threshold == pytest.approx(rule.threshold_sum / (255 * rule.weight_total))
    # scores.holdout goes through the rule, as ek submit does: the best dice comes back
    assert written.scores["holdout"] == pytest.approx(check["best_dice"], abs=1e-12)
    crossfit = written.scores["holdout_crossfit"]
    assert len(crossfit["per_split"]) == CROSSFIT_REPEATS
    assert crossfit["mean"] == pytest.approx(np.mean(crossfit["per_split"]))
    assert crossfit["std"] == pytest.approx(np.std(crossfit["per_split"], ddof=1))
    if rule.mode == "top_fraction":
        assert rule.top_fraction == pytest.approx(check["best_top_fraction"])
    report = (layout.blend_report_dir / "report.txt").read_text()
    assert "from holdout]" in report and "cross-fitted on 10 random halvings" in report
    assert json.loads(layout.blend_json.read_text())["rule"]["threshold_from"] == "holdout"
    assert verify_blend(layout) == rule


def test_threshold_from_holdout_needs_a_holdout(tmp_path):
    layout, _ = _write_workdir(tmp_path)
    for name in ("alpha", "beta"):  # as after `ek folds --pool-validation`
        layout.holdout_npy(name).unlink()
        layout.holdout_ids(name).unlink()
    with pytest.raises(EkError, match="--threshold-from holdout needs holdout") as error:
        run_blend(layout, steps=2, threshold_from="holdout")
    assert "\n" not in str(error.value)


def test_cli_threshold_from_choices(tmp_path):
    args = ["blend", "--oof", "--workdir", str(tmp_path), "--threshold-from", "test"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--threshold-from" in result.output
