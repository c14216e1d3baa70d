"""``ek blend --oof`` on OOF of several classes, scored by mean Dice over (image, class) pairs.

The metric is written here from the contract (each pair's dice; a pair empty in both truth
and prediction scores ``empty_score``; the mean over every pair), never ek's own.
"""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ensemble_kit.blend.class_search import search_classes
from ensemble_kit.blend.rule import BlendRule
from ensemble_kit.blend.run import run_blend
from ensemble_kit.cli import main
from ensemble_kit.errors import EkError
from ensemble_kit.layout import Layout

CLASSES = ["scratch", "pit", "stain"]
SIDE = 16


def _pair_dice(predicted, truth, empty_score=1.0):
    """Per (image, class) pair dice of bool ``(N, C, H, W)`` masks, from the definition."""
    p, t = predicted.astype(bool), truth.astype(bool)
    both = (p & t).sum(axis=(2, 3))
    total = p.sum(axis=(2, 3)) + t.sum(axis=(2, 3))
    return np.where(total == 0, empty_score, 2.0 * both / np.maximum(total, 1))


def _class_dice_at(rule, codes, labels, c, thresholds):
    """Class ``c``'s mean dice over its images at each threshold, its postprocessing kept."""
    one = rule.class_rule(c)
    own = {name: code[:, c] for name, code in codes.items()}
    return np.array(
        [
            _pair_dice(
                replace(one, threshold_sum=int(t)).apply(own)[:, None], labels[:, c : c + 1]
            ).mean()
            for t in thresholds
        ]
    )


def _labels(rng, n, n_classes=len(CLASSES), filled=0.2):
    """uint8 ``(n, C, SIDE, SIDE)``: about ``filled`` of the pairs hold one rectangle."""
    labels = np.zeros((n, n_classes, SIDE, SIDE), np.uint8)
    for i in range(n):
        for c in range(n_classes):
            if rng.random() < filled:
                y, x = rng.integers(0, SIDE - 6, 2)
                labels[i, c, y : y + rng.integers(3, 7), x : x + rng.integers(3, 7)] = 1
    return labels


def _codes(rng, labels, noise):
    """Noisy uint8 codes: the mask blurred by noise, and small false blobs on empty pairs."""
    values = labels * 150.0 + rng.normal(60, 255 * noise, labels.shape)
    blobs = rng.random(labels.shape[:2]) < 0.3
    for i, c in zip(*np.nonzero(blobs)):
        y, x = rng.integers(0, SIDE - 3, 2)
        values[i, c, y : y + 2, x : x + 2] += 120
    return np.clip(values, 0, 255).astype(np.uint8)


def _workdir(tmp_path, seed=3, n_train=24, n_holdout=12, configs=("alpha", "beta", "gamma")):
    """A workdir of (N, C, H, W) OOF and holdout codes, and the labels of both."""
    rng = np.random.default_rng(seed)
    workdir = tmp_path / "folds"
    train_ids = [f"img{i:03d}" for i in range(n_train)]
    holdout_ids = [f"val{i:03d}" for i in range(n_holdout)]
    labels, holdout_labels = _labels(rng, n_train), _labels(rng, n_holdout)
    folds = np.arange(n_train) % 3
    workdir.mkdir()
    pd.DataFrame(
        {
            "record_id": train_ids + holdout_ids,
            "split": ["train"] * n_train + ["validation"] * n_holdout,
            "fold": list(folds) + [-1] * n_holdout,
        }
    ).to_csv(workdir / "splits.csv", index=False)
    (workdir / "splits.json").write_text(json.dumps({"data_root": str(tmp_path), "n_folds": 3}))
    for k, name in enumerate(configs):
        folder = workdir / name
        for k in range(3):
            (folder / f"fold_{k}").mkdir(parents=True)
            (folder / f"fold_{k}" / "DONE").write_text("")
        (folder / "config.yaml").write_text("name: x\n")
        np.save(folder / "oof.npy", _codes(rng, labels, 0.15 + 0.1 * k))
        np.save(folder / "holdout.npy", _codes(rng, holdout_labels, 0.15 + 0.1 * k))
        pd.DataFrame({"record_id": train_ids, "fold": folds}).to_csv(
            folder / "oof_ids.csv", index=False
        )
        pd.DataFrame({"record_id": holdout_ids}).to_csv(folder / "holdout_ids.csv", index=False)
        summary = {"n_folds": 3, "splits_digest": "s1", "config_digest": "c", "data_digest": "d"}
        (folder / "summary.json").write_text(json.dumps(summary))
    return Layout(workdir), labels, holdout_labels


def _codes_of(layout, rule, split):
    return {name: np.load(layout.workdir / name / f"{split}.npy") for name in rule.members}


def _blend(layout, labels, holdout_labels, **options):
    return run_blend(
        layout,
        steps=3,
        class_names=CLASSES,
        labels=labels,
        holdout_labels=holdout_labels,
        **options,
    )


def test_labels_are_mostly_empty_pairs():
    labels = _labels(np.random.default_rng(3), 200)
    empty = 1 - labels.any(axis=(2, 3)).mean()
    assert 0.7 <= empty <= 0.9


def test_written_rule_scores_the_holdout_and_the_oof_as_reported(tmp_path):
    layout, labels, holdout_labels = _workdir(tmp_path)
    written = _blend(layout, labels, holdout_labels)
    rule = BlendRule.load(layout.blend_json)
    assert rule == written.rule and rule.class_names == CLASSES
    scores = json.loads(layout.blend_json.read_text())["scores"]
    holdout = _pair_dice(rule.apply(_codes_of(layout, rule, "holdout")), holdout_labels)
    assert scores["holdout"] == pytest.approx(holdout.mean(), abs=1e-12)
    oof = _pair_dice(rule.apply(_codes_of(layout, rule, "oof")), labels)
    assert scores["blend_oof"] == pytest.approx(oof.mean(), abs=1e-9)
    for c, name in enumerate(CLASSES):
        per_class, own = scores["per_class"][name], rule.classes[c]
        assert per_class["holdout"] == pytest.approx(holdout[:, c].mean(), abs=1e-12)
        assert per_class["dice"] == pytest.approx(oof[:, c].mean(), abs=1e-9)
        assert (per_class["threshold_sum"], per_class["min_pixels"]) == (
            own.threshold_sum,
            own.min_pixels,
        )
        assert per_class["min_component"] == own.min_component
    assert len(scores["nested"]["per_fold"]) == 3 and 0 <= scores["nested"]["pooled"] <= 1
    text = (layout.blend_report_dir / "report.txt").read_text()
    assert all(any(line.startswith(name) for line in text.splitlines()) for name in CLASSES)


def test_per_class_choices_beat_every_shared_threshold_on_oof(tmp_path):
    layout, labels, holdout_labels = _workdir(tmp_path, seed=5)
    rule = _blend(layout, labels, holdout_labels).rule
    codes = _codes_of(layout, rule, "oof")
    chosen = _pair_dice(rule.apply(codes), labels).mean()
    sums = rule.sums(codes)
    thresholds = np.unique(np.append(sums[sums >= rule.floor_sum], sums.max() + 1))
    per_class = [_class_dice_at(rule, codes, labels, c, thresholds) for c in range(len(CLASSES))]
    shared = np.mean(per_class, axis=0)  # one threshold for every class, own postprocessing
    assert chosen >= shared.max() - 1e-12
    assert len({c.threshold_sum for c in rule.classes}) > 1  # the classes did differ


def test_threshold_from_holdout_is_each_class_best_on_the_holdout(tmp_path):
    layout, labels, holdout_labels = _workdir(tmp_path, seed=4)
    written = _blend(layout, labels, holdout_labels, threshold_from="holdout")
    rule = written.rule
    assert rule.threshold_from == "holdout"
    codes = _codes_of(layout, rule, "holdout")
    got = _pair_dice(rule.apply(codes), holdout_labels)
    assert written.scores["holdout"] == pytest.approx(got.mean(), abs=1e-12)
    sums = rule.sums(codes)
    for c in range(len(CLASSES)):
        values = sums[:, c]
        thresholds = np.unique(np.append(values[values >= rule.floor_sum], values.max() + 1))
        best = _class_dice_at(rule, codes, holdout_labels, c, thresholds).max()
        assert got[:, c].mean() == pytest.approx(best, abs=1e-12)


def test_per_class_weights_are_an_option_judged_nested(tmp_path):
    layout, labels, holdout_labels = _workdir(tmp_path, seed=6)
    written = _blend(layout, labels, holdout_labels, per_class_weights=True)
    scores, rule = written.scores, written.rule
    nested = scores["nested"]
    assert set(nested["options"]) == {"shared", "per_class"}
    assert nested["pooled"] == pytest.approx(np.mean(nested["per_fold"]), abs=1e-12)  # 8 each
    assert nested["pooled"] == pytest.approx(np.mean(nested["per_class"]), abs=1e-12)
    assert set(nested["picked"]) <= {"shared", "per_class"} and len(nested["picked"]) == 3
    assert scores["weights"] in ("shared", "per_class")
    assert all((c.weights is None) == (scores["weights"] == "shared") for c in rule.classes)
    holdout = _pair_dice(rule.apply(_codes_of(layout, rule, "holdout")), holdout_labels)
    assert scores["holdout"] == pytest.approx(holdout.mean(), abs=1e-12)


def test_one_class_mean_dice_search_equals_the_one_channel_search(tmp_path):
    rng = np.random.default_rng(8)
    labels = _labels(rng, 24, n_classes=1)
    oofs = [_codes(rng, labels, 0.2)[:, 0], _codes(rng, labels, 0.3)[:, 0]]
    result = search_classes(oofs, labels[:, 0], np.arange(24) % 3, steps=2)
    several = search_classes([o[:, None] for o in oofs], labels, np.arange(24) % 3, steps=2)
    assert result.choice.dice == several.choice.dice
    assert result.nested["pooled"] == several.nested["pooled"]


def test_without_per_class_weights_the_nested_estimate_is_the_shared_option(tmp_path):
    layout, labels, holdout_labels = _workdir(tmp_path, n_train=9, n_holdout=3)
    nested = _blend(layout, labels, holdout_labels).scores["nested"]
    assert nested["picked"] == ["shared"] * 3 and list(nested["options"]) == ["shared"]
    assert nested["pooled"] == nested["options"]["shared"]


def test_global_dice_with_several_classes_is_refused(tmp_path):
    layout, labels, holdout_labels = _workdir(tmp_path, n_train=9, n_holdout=3)
    with pytest.raises(EkError, match="global_dice with several classes"):
        _blend(layout, labels, holdout_labels, metric="global_dice")
    assert not layout.blend_json.exists()


def test_cli_without_the_data_of_several_classes_is_one_line(tmp_path):
    layout, _, _ = _workdir(tmp_path, n_train=9, n_holdout=3)
    result = CliRunner().invoke(main, ["blend", "--oof", "--workdir", str(layout.workdir)])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("ek: error: ") and "no 'train/' folder" in line
    assert not layout.blend_json.exists()
