"""Cost-aware blending: the measured prediction cost of each config bounds the ensemble."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_blend import _labels, _write_workdir

from ensemble_kit.blend.ensemble_search import search
from ensemble_kit.blend.run import run_blend
from ensemble_kit.blend.selection import Budget
from ensemble_kit.cli import main
from ensemble_kit.errors import EkError
from ensemble_kit.oof import to_codes
from ensemble_kit.training.assembly import prediction_cost


def _complementary(seed=5, n=30):
    """Two configs each blind on one half of the image: the blend of both beats either."""
    rng = np.random.default_rng(seed)
    labels = _labels(rng, n=n)
    left = np.zeros(labels.shape, bool)
    left[:, :, :8] = True
    a = to_codes(np.where(left, labels * 0.8 + 0.1, 0.45) + rng.normal(0, 0.05, labels.shape))
    b = to_codes(np.where(~left, labels * 0.8 + 0.1, 0.45) + rng.normal(0, 0.05, labels.shape))
    return [a, b], labels, np.arange(n) % 3


def test_a_limit_between_two_costs_keeps_only_the_cheaper_config():
    oofs, labels, folds = _complementary()
    costs = [0.9, 0.3]  # a is three times as expensive as b
    free = search(oofs, labels, folds, steps=6, costs=costs)
    assert (free.choice.weights > 0).all()  # without a limit both are chosen
    assert free.cost == pytest.approx(1.2)
    limited = search(oofs, labels, folds, steps=6, costs=costs, max_cost=0.5)
    assert limited.choice.weights[0] == 0 and limited.choice.weights[1] > 0
    assert limited.cost == pytest.approx(0.3)
    for choices in limited.nested.choices.values():  # every set of folds kept to the limit
        assert all(c.weights[0] == 0 for c in choices)


def test_a_config_costs_once_whatever_its_weight():
    oofs, labels, folds = _complementary()
    # both fit together (1.2 <= 1.2): picking one of them again adds nothing to the cost
    result = search(oofs, labels, folds, steps=8, refine=True, costs=[0.9, 0.3], max_cost=1.2)
    assert (result.choice.weights > 0).all()
    assert result.cost == pytest.approx(1.2)
    budget = Budget(np.array([0.9, 0.3]), 1.0)
    assert budget.cost(np.array([5, 0])) == pytest.approx(0.9)
    assert not budget.allows(np.array([5, 1]))


def test_refinement_stays_within_the_limit():
    oofs, labels, folds = _complementary()
    result = search(oofs, labels, folds, steps=6, refine=True, costs=[0.9, 0.3], max_cost=0.95)
    for choices in result.nested.choices.values():
        for choice in choices:
            assert np.count_nonzero(choice.weights) == 1


def test_no_config_under_the_limit_is_a_one_line_error():
    oofs, labels, folds = _complementary()
    with pytest.raises(EkError, match="no config fits; the cheapest, 'config_1'") as error:
        search(oofs, labels, folds, steps=2, costs=[0.9, 0.3], max_cost=0.1)
    assert "\n" not in str(error.value)


def _set_cost(layout, name, seconds):
    path = layout.summary(name)
    summary = json.loads(path.read_text())
    summary["prediction_cost"] = {"seconds_per_record": seconds, "device": "cpu (2 CPU threads)"}
    path.write_text(json.dumps(summary))


def test_run_blend_limit_and_report(tmp_path):
    layout, _ = _write_workdir(tmp_path)  # alpha is the better config
    _set_cost(layout, "alpha", 0.04)
    _set_cost(layout, "beta", 0.01)
    free = run_blend(layout, steps=3)
    assert "alpha" in free.rule.weights
    written = run_blend(layout, steps=3, max_seconds_per_record=0.02)
    assert list(written.rule.weights) == ["beta"]
    cost = written.cost
    assert cost["seconds_per_record"] == pytest.approx(0.01)
    assert cost["seconds_for_2000_records"] == pytest.approx(20.0)
    assert cost["max_seconds_per_record"] == 0.02
    assert cost["per_config"] == {"alpha": 0.04, "beta": 0.01}
    report = (layout.blend_report_dir / "report.txt").read_text()
    assert "cost: 0.01 s per record" in report and "20 s for 2,000 records" in report
    assert "limit 0.02 s per record" in report and "cpu (2 CPU threads)" in report


def test_limit_without_a_measured_cost_names_the_summary(tmp_path):
    layout, _ = _write_workdir(tmp_path)
    _set_cost(layout, "alpha", 0.04)
    with pytest.raises(EkError) as error:
        run_blend(layout, steps=2, max_seconds_per_record=1.0)
    message = str(error.value)
    assert str(layout.summary("beta")) in message and "\n" not in message
    written = run_blend(layout, configs=["beta"], steps=2)  # no limit: older is fine
    assert written.cost["seconds_per_record"] is None
    assert "cost: unknown" in (layout.blend_report_dir / "report.txt").read_text()


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_cli_rejects_a_bad_limit(tmp_path, value):
    args = ["blend", "--oof", "--workdir", str(tmp_path), "--max-seconds-per-record", value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--max-seconds-per-record" in result.output


def test_prediction_cost_sums_the_folds():
    folds = [
        {"predict_seconds_per_record": 0.02, "predict_device": "cpu (2 CPU threads)"},
        {"predict_seconds_per_record": 0.03, "predict_device": "cpu (2 CPU threads)"},
    ]
    cost = prediction_cost(folds)
    assert cost == {"seconds_per_record": pytest.approx(0.05), "device": "cpu (2 CPU threads)"}
    assert prediction_cost([folds[0], {"best_dice": 0.5}]) is None  # trained before it was kept


QUICK = """
name: quick
input: {channels: ash, frames: [4]}
model: {arch: Unet, encoder: tu-test_resnet, decoder: {decoder_channels: [16, 8, 8, 8, 8]}}
optim: {name: adam, lr: 0.003}
train: {epochs: 1, batch_size: 8, max_steps_per_epoch: 2, seed: 0}
tta: [identity, hflip]
"""


def test_cv_measures_the_cost_and_blend_and_submit_use_it(tmp_path, synth_root):
    config = tmp_path / "quick.yaml"
    config.write_text(QUICK)
    workdir = tmp_path / "folds"

    def ek(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    ek("cv", "--data", synth_root, "--workdir", workdir, "--folds", "2", config)
    summary = json.loads((workdir / "quick" / "summary.json").read_text())
    per_fold = [f["predict_seconds_per_record"] for f in summary["folds"]]
    assert all(s > 0 for s in per_fold)
    assert summary["prediction_cost"]["seconds_per_record"] == pytest.approx(sum(per_fold))
    assert summary["prediction_cost"]["device"].startswith("cpu")
    limit = 10 * summary["prediction_cost"]["seconds_per_record"]
    args = ("blend", "--oof", "--workdir", workdir, "--steps", "2")
    shown = ek(*args, "--max-seconds-per-record", limit, "--threshold-from", "holdout").output
    assert "s for 2,000 records" in shown and "from holdout]" in shown
    written = json.loads((workdir / "blend.json").read_text())
    out = tmp_path / "validation.csv"
    ek("submit", "--workdir", workdir, "--data", synth_root, "--split", "validation", "--out", out)
    dice = json.loads(out.with_suffix(".json").read_text())["dice"]
    assert dice == pytest.approx(written["scores"]["holdout"], abs=2e-3)
