"""The blend search: kernels against dense references, selection behaviour, file API."""

import json

import numpy as np
import pandas as pd
import pytest

from ensemble_kit import metrics, postprocess
from ensemble_kit.blend.candidates import build_candidates
from ensemble_kit.blend.ensemble_search import search
from ensemble_kit.blend.kernels import best_per_set, best_per_set_reference
from ensemble_kit.blend.rule import BlendRule, top_fraction_threshold
from ensemble_kit.blend.run import rule_of, run_blend
from ensemble_kit.blend.scorer import Scorer
from ensemble_kit.blend.selection import refine_weights
from ensemble_kit.blend.sets import FoldSets
from ensemble_kit.blend.threshold import choose_threshold
from ensemble_kit.blend.verify import verify_blend
from ensemble_kit.errors import EkError
from ensemble_kit.layout import Layout
from ensemble_kit.oof import to_codes


def _labels(rng, n=24, shape=(16, 16)):
    labels = np.zeros((n, *shape), np.uint8)
    for i in range(0, n, 2):  # half the images empty, the others a few blobs
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
            labels[i, r : r + rng.integers(1, 4), c : c + rng.integers(1, 5)] = 1
    return labels


def _noisy(rng, labels, noise, bias=0.0):
    return to_codes(labels * 0.7 + 0.1 + bias + rng.normal(0, noise, labels.shape))


def _problem(seed=0, n=24, n_configs=3):
    rng = np.random.default_rng(seed)
    labels = _labels(rng, n)
    oofs = [_noisy(rng, labels, 0.15 + 0.05 * i) for i in range(n_configs)]
    return oofs, labels, np.arange(n) % 3


def _dense_best(oofs, labels, weights, lowest):
    sums = sum(int(w) * o.astype(np.int64) for w, o in zip(weights, oofs))
    dice = [
        metrics.global_dice(sums >= t, labels) for t in range(lowest, 255 * int(sum(weights)) + 2)
    ]
    return max(dice)


def test_best_per_set_matches_reference():
    rng = np.random.default_rng(3)
    hist = rng.integers(0, 5, (4, 40, 2))
    positives = hist[:, :, 1].sum(axis=1) + rng.integers(0, 4, 4)
    excluded = FoldSets.nested(4).excluded  # all, each fold out, each pair out
    assert len(excluded) == 1 + 4 + 6
    for lowest in (0, 7, 39):
        dice, thresholds = best_per_set(hist, positives, lowest, excluded)
        ref_dice, ref_thresholds = best_per_set_reference(hist, positives, lowest, excluded)
        np.testing.assert_array_equal(thresholds, ref_thresholds)
        np.testing.assert_allclose(dice, ref_dice, rtol=0, atol=1e-15)


def test_candidates_keep_every_pixel_above_the_floor():
    oofs, labels, folds = _problem()
    cands = build_candidates(oofs, labels, folds, floor=60)
    top = np.max(oofs, axis=0).reshape(len(labels), -1)
    image, position = np.nonzero(top >= 60)
    np.testing.assert_array_equal(cands.positions, position)
    np.testing.assert_array_equal(
        cands.values, np.stack(oofs).reshape(len(oofs), len(labels), -1)[:, image, position]
    )
    np.testing.assert_array_equal(cands.labels, labels.reshape(len(labels), -1)[image, position])
    assert cands.fold_positives.sum() == labels.sum()
    for c, oof in enumerate(oofs):
        want = metrics.image_histograms_reference(oof, labels)
        np.testing.assert_array_equal(cands.config_histograms[c].sum(axis=0), want.sum(axis=0))


def test_candidates_from_memmap_match_in_memory(tmp_path):
    oofs, labels, folds = _problem()
    np.save(tmp_path / "a.npy", oofs[0])
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    a = build_candidates([mapped], labels, folds)
    b = build_candidates([oofs[0]], labels, folds)
    np.testing.assert_array_equal(a.values, b.values)


@pytest.mark.parametrize("weights", [(1, 0, 0), (2, 1, 0), (1, 1, 3)])
def test_scorer_matches_dense_blend(weights):
    oofs, labels, folds = _problem()
    cands = build_candidates(oofs, labels, folds, floor=20)
    base = np.array(weights, np.int64) - np.eye(3, dtype=np.int64)[0]
    dice, _ = Scorer(cands).moves([base], [(0, 0, 1)])[0]
    assert dice[0] == pytest.approx(
        _dense_best(oofs, labels, weights, 20 * sum(weights)), abs=1e-12
    )
    held_in = folds != 1
    want = _dense_best([o[held_in] for o in oofs], labels[held_in], weights, 20 * sum(weights))
    assert dice[2] == pytest.approx(want, abs=1e-12)


def test_choose_threshold_table_matches_dense_postprocessing():
    oofs, labels, folds = _problem(seed=1)
    cands = build_candidates(oofs, labels, folds, floor=20)
    weights = np.array([1, 1, 0], np.int64)
    choice = choose_threshold(cands, weights, 0, (0, 5), (0, 3))
    sums = oofs[0].astype(np.int64) + oofs[1]
    for i, min_pixels in enumerate((0, 5)):
        for j, min_size in enumerate((0, 3)):
            dice = [
                metrics.global_dice(
                    postprocess.remove_small_components(
                        postprocess.apply_min_pixels(sums >= t, min_pixels), min_size
                    ),
                    labels,
                )
                for t in range(40, 512)
            ]
            assert choice.table[i, j] == pytest.approx(max(dice), abs=1e-12)


def test_greedy_blend_beats_configs_with_complementary_errors():
    rng = np.random.default_rng(5)
    labels = _labels(rng, n=30)
    left = np.zeros(labels.shape, bool)
    left[:, :, :8] = True
    # each config is blind on one half of the image and sharp on the other
    a = to_codes(np.where(left, labels * 0.8 + 0.1, 0.45) + rng.normal(0, 0.05, labels.shape))
    b = to_codes(np.where(~left, labels * 0.8 + 0.1, 0.45) + rng.normal(0, 0.05, labels.shape))
    result = search([a, b], labels, np.arange(30) % 3, steps=6)
    singles = [s["dice"] for s in result.per_config.values()]
    assert result.choice.dice > max(singles) + 0.05
    assert (result.choice.weights > 0).all()


def _single_config_nested(oof, labels, folds) -> float:
    """By hand: one config, its threshold chosen on the other folds, pooled held-out dice."""
    tp = fp = fn = 0
    for k in np.unique(folds):
        fit, held = folds != k, folds == k
        dice = [metrics.global_dice(oof[fit] >= t, labels[fit]) for t in range(256)]
        predicted, truth = oof[held] >= int(np.argmax(dice)), labels[held].astype(bool)
        tp += (predicted & truth).sum()
        fp += (predicted & ~truth).sum()
        fn += (~predicted & truth).sum()
    return 2 * tp / (2 * tp + fp + fn)


def test_nested_is_not_above_optimistic_on_average():
    gaps = []
    for seed in range(4):
        oofs, labels, folds = _problem(seed=seed + 10)
        result = search(
            oofs, labels, folds, steps=4, min_pixels_grid=(0, 5), min_component_grid=(0, 2)
        )
        nested = result.nested.pooled()
        gaps.append(result.choice.dice - nested)
        # three noisy views of the same masks blend better than the sharpest one alone
        assert nested > _single_config_nested(oofs[0], labels, folds)
    assert np.mean(gaps) >= 0


def test_apply_blend_reproduces_the_scored_dice():
    oofs, labels, folds = _problem(seed=2)
    result = search(
        oofs, labels, folds, steps=4, min_pixels_grid=(0, 5, 20), min_component_grid=(0, 2, 4)
    )
    rule = rule_of(result)
    predicted = rule.apply(dict(zip(result.names, oofs)), rule.threshold_sum)
    assert metrics.global_dice(predicted, labels) == pytest.approx(result.choice.dice, abs=1e-12)
    assert rule.threshold == pytest.approx(result.threshold)
    assert rule.threshold == pytest.approx(rule.threshold_sum / (255 * rule.weight_total))


def test_top_fraction_threshold():
    counts = np.array([90, 5, 3, 2])  # 100 pixels
    assert top_fraction_threshold(counts, 0.02) == 3
    assert top_fraction_threshold(counts, 0.05) == 2
    assert top_fraction_threshold(counts, 0.0) == 4
    sums = np.array([[0, 3], [3, 3]])  # ties: three pixels share the top value
    assert top_fraction_threshold(sums, 0.5) == 4
    assert top_fraction_threshold(sums, 0.75) == 1


@pytest.mark.parametrize("bad", ["empty_pool", "all_empty_labels", "shape", "one_fold"])
def test_search_rejects_bad_arrays(bad):
    oofs, labels, folds = _problem()
    if bad == "empty_pool":
        oofs = []
    elif bad == "all_empty_labels":
        labels = np.zeros_like(labels)
    elif bad == "shape":
        oofs[1] = oofs[1][:, :8]
    else:
        folds = np.zeros_like(folds)
    with pytest.raises(EkError):
        search(oofs, labels, folds, steps=2)


# ----------------------------------------------------------------------------- files


def _write_workdir(tmp_path, configs=("alpha", "beta"), n_train=12, n_holdout=4, side=16):
    rng = np.random.default_rng(7)
    workdir, data = tmp_path / "folds", tmp_path / "data"
    train_ids = [str(10**17 + 7 * i) for i in range(n_train)]
    holdout_ids = [str(9 * 10**17 + 3 * i) for i in range(n_holdout)]
    labels = {
        rid: _labels(rng, 1, (side, side))[0] if i % 3 else np.zeros((side, side), np.uint8)
        for i, rid in enumerate(train_ids + holdout_ids)
    }
    for rid, mask in labels.items():
        folder = data / ("train" if rid in train_ids else "validation") / rid
        folder.mkdir(parents=True)
        np.save(folder / "human_pixel_masks.npy", mask.astype(np.int32)[:, :, None])
    folds = [i % 3 for i in range(n_train)]
    splits = pd.DataFrame(
        {
            "record_id": train_ids + holdout_ids,
            "split": ["train"] * n_train + ["validation"] * n_holdout,
            "fold": folds + [-1] * n_holdout,
        }
    )
    workdir.mkdir()
    splits.to_csv(workdir / "splits.csv", index=False)
    (workdir / "splits.json").write_text(json.dumps({"data_root": str(data), "n_folds": 3}))
    for k, name in enumerate(configs):
        _write_config(workdir / name, rng, labels, train_ids, holdout_ids, folds, 0.1 + 0.1 * k)
    return Layout(workdir), data


def _write_config(folder, rng, labels, train_ids, holdout_ids, folds, noise, splits_digest="s1"):
    for k in range(3):
        (folder / f"fold_{k}").mkdir(parents=True)
        (folder / f"fold_{k}" / "DONE").write_text("")
    (folder / "config.yaml").write_text("name: x\n")
    oof = np.stack([_noisy(rng, labels[r], noise) for r in train_ids])
    np.save(folder / "oof.npy", oof)
    pd.DataFrame({"record_id": train_ids, "fold": folds}).to_csv(
        folder / "oof_ids.csv", index=False
    )
    np.save(folder / "holdout.npy", np.stack([_noisy(rng, labels[r], noise) for r in holdout_ids]))
    pd.DataFrame({"record_id": holdout_ids}).to_csv(folder / "holdout_ids.csv", index=False)
    summary = {
        "n_folds": 3,
        "splits_digest": splits_digest,
        "config_digest": "c",
        "data_digest": "d",
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_run_blend_end_to_end(tmp_path):
    layout, _ = _write_workdir(tmp_path)
    result = run_blend(layout, steps=3)
    written = json.loads(layout.blend_json.read_text())
    assert written == json.loads(json.dumps(result.to_dict()))
    assert set(written) == {"rule", "scores", "cost", "digests"}
    assert "threshold" not in written["rule"]  # derived, never stored
    rule = BlendRule.load(layout.blend_json)
    assert rule == result.rule and rule.version == 1
    assert set(rule.weights) <= {"alpha", "beta"} and all(w > 0 for w in rule.weights.values())
    assert rule.mode in ("value", "top_fraction")
    assert isinstance(rule.threshold_sum, int)
    assert rule.threshold == pytest.approx(rule.threshold_sum / (255 * rule.weight_total))
    assert (rule.top_fraction is None) == (rule.mode == "value")
    scores = written["scores"]
    assert set(scores["per_config"]) == {"alpha", "beta"}
    assert len(scores["nested"]["per_fold"]) == 3 and 0 <= scores["holdout"] <= 1
    assert set(written["digests"]["oof"]) == {"alpha", "beta"}
    for name in ("thresholds.png", "selection.png", "min_pixels.png", "folds.png", "report.txt"):
        assert (layout.blend_report_dir / name).stat().st_size > 0
    assert verify_blend(layout) == rule


def test_verify_blend_detects_changes(tmp_path):
    layout, _ = _write_workdir(tmp_path)
    with pytest.raises(EkError, match="ek blend --oof"):
        verify_blend(layout)
    run_blend(layout, steps=2)
    oof = np.load(layout.oof_npy("beta"))
    oof[0, 0, 0] ^= 1
    np.save(layout.oof_npy("beta"), oof)
    with pytest.raises(EkError, match="stale blend.json: .*beta.*oof.npy"):
        verify_blend(layout)


def test_run_blend_uses_named_configs_and_explicit_data(tmp_path):
    layout, data = _write_workdir(tmp_path)
    (layout.splits_meta).write_text("{}")
    result = run_blend(layout, data_root=data, configs=["beta"], steps=2)
    assert list(result.rule.weights) == ["beta"]


@pytest.mark.parametrize(
    "bad", ["different_splits", "not_done", "shapes", "empty_pool", "all_empty", "unknown_config"]
)
def test_run_blend_bad_inputs_are_one_line_errors(tmp_path, bad):
    layout, data = _write_workdir(tmp_path)
    configs = None
    if bad == "different_splits":
        summary = json.loads(layout.summary("beta").read_text())
        layout.summary("beta").write_text(json.dumps({**summary, "splits_digest": "other"}))
    elif bad == "not_done":
        (layout.fold_dir("beta", 1) / "DONE").unlink()
    elif bad == "shapes":
        np.save(layout.oof_npy("beta"), np.zeros((12, 8, 8), np.uint8))
    elif bad == "empty_pool":
        for name in ("alpha", "beta"):
            layout.summary(name).unlink()
    elif bad == "all_empty":
        for mask in data.glob("*/*/human_pixel_masks.npy"):
            np.save(mask, np.zeros((16, 16, 1), np.int32))
    else:
        configs = ["gamma"]
    with pytest.raises(EkError) as error:
        run_blend(layout, configs=configs, steps=2)
    assert "\n" not in str(error.value)


def test_refinement_never_lowers_a_sets_dice_and_moves_weight_to_the_sharp_config():
    rng = np.random.default_rng(4)
    labels = _labels(rng, n=24)
    oofs = [_noisy(rng, labels, noise) for noise in (0.1, 0.3, 0.3)]
    folds = np.arange(24) % 3
    cands = build_candidates(oofs, labels, folds, floor=20)
    start = [np.ones(3, np.int64)] * (cands.n_folds + 1)
    refined = refine_weights(Scorer(cands), start)
    for s, weights in enumerate(refined):
        rows = folds != s - 1  # set 0: every fold; set k + 1: without fold k
        subset = [o[rows] for o in oofs]
        before = _dense_best(subset, labels[rows], start[s], 20 * 3)
        after = _dense_best(subset, labels[rows], weights, 20 * int(weights.sum()))
        assert after >= before - 1e-12, s
    assert _dense_best(oofs, labels, refined[0], 20 * int(refined[0].sum())) > _dense_best(
        oofs, labels, start[0], 60
    )
    assert refined[0][0] > max(refined[0][1:])
