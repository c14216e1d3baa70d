"""The blend rule: load/save, the three steps, one and several classes, bad files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ensemble_kit.blend.rule import BlendFile, BlendRule, ClassRule
from ensemble_kit.errors import EkError


def _codes(seed=0, shape=(6, 16, 16), names=("a", "b")):
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 256, shape, dtype=np.uint8) for n in names}


def test_threshold_is_derived_from_the_integer_one():
    rule = BlendRule({"a": 2, "b": 1}, threshold_sum=382)
    assert rule.weight_total == 3
    assert rule.threshold == pytest.approx(382 / (255 * 3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.threshold_sum = 3  # type: ignore[misc]


def test_value_mode_masks_by_hand():
    a = np.array([[[0, 100], [200, 255]]], np.uint8)
    b = np.array([[[255, 100], [0, 10]]], np.uint8)
    rule = BlendRule({"a": 2, "b": 1}, threshold_sum=300)
    # sums 2a + b: [[255, 300], [400, 520]]
    np.testing.assert_array_equal(rule.sums({"a": a, "b": b}), [[[255, 300], [400, 520]]])
    np.testing.assert_array_equal(rule.apply({"a": a, "b": b}), [[[False, True], [True, True]]])
    # a streaming caller's threshold wins, but never below the floor (10 x 3 = 30)
    floored = dataclasses.replace(rule, floor=100)
    assert floored.floor_sum == 300
    np.testing.assert_array_equal(floored.apply({"a": a, "b": b}, 0), rule.apply({"a": a, "b": b}))


def test_min_pixels_empties_small_masks():
    codes = {"a": np.zeros((2, 4, 4), np.uint8)}
    codes["a"][0, :2, :2] = 200  # 4 pixels
    codes["a"][1, :3, :3] = 200  # 9 pixels
    masks = BlendRule({"a": 1}, threshold_sum=100, min_pixels=5).apply(codes)
    assert masks[0].sum() == 0 and masks[1].sum() == 9


def test_top_fraction_streamed_equals_whole_set():
    codes = _codes(seed=1)
    rule = BlendRule({"a": 1, "b": 3}, mode="top_fraction", threshold_sum=600, top_fraction=0.05)
    whole = rule.apply(codes)
    histogram = sum(rule.histogram({n: c[i : i + 2] for n, c in codes.items()}) for i in (0, 2, 4))
    threshold = rule.threshold_for(histogram)
    assert np.count_nonzero(rule.sums(codes) >= threshold) <= 0.05 * whole.size
    assert np.count_nonzero(rule.sums(codes) >= threshold - 1) > 0.05 * whole.size
    streamed = np.concatenate(
        [rule.apply({n: c[i : i + 2] for n, c in codes.items()}, threshold) for i in (0, 2, 4)]
    )
    np.testing.assert_array_equal(streamed, whole)


def test_save_load_round_trip_keeps_scores_beside_the_rule(tmp_path):
    rule = BlendRule({"a": 2, "b": 1}, "top_fraction", 400, 0.01, 13, 10, 3, "holdout")
    rule.save(tmp_path / "blend.json", scores={"holdout": 0.5}, digests={"splits": "x"})
    stored = json.loads((tmp_path / "blend.json").read_text())
    assert (
        set(stored) == {"rule", "scores", "cost", "digests"} and "threshold" not in stored["rule"]
    )
    assert BlendRule.load(tmp_path / "blend.json") == rule
    assert BlendFile.load(tmp_path / "blend.json").scores == {"holdout": 0.5}


def test_several_classes_apply_class_by_class(tmp_path):
    codes = _codes(seed=2, shape=(5, 3, 8, 8))
    rule = BlendRule(
        {"a": 1, "b": 1},
        floor=13,
        classes=(
            ClassRule("scratch", 300, min_pixels=3),
            ClassRule("hole", 200, weights={"a": 2}),
            ClassRule("stain", 480, min_component=2),
        ),
    )
    masks = rule.apply(codes)
    assert masks.shape == (5, 3, 8, 8) and masks.dtype == bool
    for c in range(len(rule.class_names)):
        one = rule.class_rule(c)
        np.testing.assert_array_equal(
            masks[:, c], one.apply({n: x[:, c] for n, x in codes.items()})
        )
    # the per-class weights: class 1 is 2 * a alone
    np.testing.assert_array_equal(rule.sums(codes)[:, 1], 2 * codes["a"][:, 1].astype(np.int32))
    np.testing.assert_array_equal(masks[:, 1], 2 * codes["a"][:, 1].astype(int) >= 200)
    assert rule.threshold_for() == (300, 200, 480)
    rule.save(tmp_path / "blend.json")
    assert BlendRule.load(tmp_path / "blend.json") == rule


@pytest.mark.parametrize(
    "stored, message",
    [
        ("{not json", "unreadable"),
        ("[1, 2]", "not a blend.json"),
        ('{"rule": {"version": 9, "weights": {"a": 1}}}', "rule version 9"),
        ('{"rule": {"version": 1, "weights": {"a": 1}, "treshold_sum": 3}}', "treshold_sum"),
        ('{"rule": {"version": 1, "weights": {"a": 0}}}', "positive integers"),
        ('{"rule": {"version": 1, "weights": {"a": 2}, "floor": 13, "threshold_sum": 20}}',
         "below the members' floor"),
        ('{"configs": {"a": 1}}', "older ek"),
    ],
)  # fmt: skip
def test_a_bad_blend_json_is_one_line_naming_it(tmp_path, stored, message):
    path = tmp_path / "blend.json"
    path.write_text(stored)
    with pytest.raises(EkError, match=message) as error:
        BlendRule.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_missing_blend_json_says_what_to_run(tmp_path):
    with pytest.raises(EkError, match="ek blend --oof"):
        BlendRule.load(tmp_path / "blend.json")
