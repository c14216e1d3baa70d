import numpy as np
import pandas as pd
import pytest

from ensemble_kit.data.splits import assign_folds, ensure_splits, make_splits, read_splits
from ensemble_kit.errors import EkError
from ensemble_kit.layout import Layout


def test_every_record_in_exactly_one_balanced_fold():
    sizes = np.r_[np.zeros(60, int), np.random.default_rng(0).integers(1, 500, 41)]
    folds = assign_folds(sizes, 5, seed=0)
    assert folds.shape == sizes.shape and set(folds) == set(range(5))
    counts = np.bincount(folds)
    assert counts.max() - counts.min() <= 1


def test_stratified_by_empty_and_size():
    rng = np.random.default_rng(1)
    sizes = np.r_[np.zeros(500, int), rng.integers(1, 50, 250), rng.integers(1000, 5000, 250)]
    folds = assign_folds(sizes, 5, seed=3)
    for fold in range(5):
        members = sizes[folds == fold]
        assert abs((members == 0).mean() - 0.5) < 0.02
        assert abs((members >= 1000).mean() - 0.25) < 0.02
    assert np.ptp([np.median(sizes[folds == f]) for f in range(5)]) <= 1

    # a plain random split is far less even on the large-mask share
    def large_share_spread(assignment):
        return np.ptp([(sizes[assignment == f] >= 1000).mean() for f in range(5)])

    random_spreads = [
        large_share_spread(np.random.default_rng(s).permutation(len(sizes)) % 5) for s in range(20)
    ]
    assert large_share_spread(folds) < min(random_spreads)


def test_stable_for_a_seed_and_different_across_seeds():
    sizes = np.random.default_rng(2).integers(0, 100, 200)
    assert np.array_equal(assign_folds(sizes, 4, 7), assign_folds(sizes, 4, 7))
    assert not np.array_equal(assign_folds(sizes, 4, 7), assign_folds(sizes, 4, 8))


def test_too_few_records():
    with pytest.raises(EkError, match="cannot fill 5 folds"):
        assign_folds(np.zeros(3), 5, 0)


def test_splits_file_on_real_layout(sample_root, tmp_path):
    layout = Layout(tmp_path / "folds")
    splits = make_splits(layout, sample_root, n_folds=3, seed=0)
    written = read_splits(layout)
    pd.testing.assert_frame_equal(written, splits.astype({"fold": int}))
    assert written["record_id"].map(type).eq(str).all()
    pool = written[written["fold"] >= 0]
    assert sorted(pool["record_id"]) == sorted(p.name for p in (sample_root / "train").iterdir())
    assert sorted(pool["fold"]) == [0, 1, 2]
    holdout = written[written["fold"] == -1]
    assert set(holdout["split"]) == {"validation"} and len(holdout) == 2
    # reused when it matches; refused with another K or another data set
    ensure_splits(layout, sample_root, 3)
    with pytest.raises(EkError, match="has 3 folds, not 5"):
        ensure_splits(layout, sample_root, 5)


def test_refuses_splits_of_another_data_set(sample_root, sample_copy, tmp_path):
    layout = Layout(tmp_path / "folds")
    make_splits(layout, sample_root, n_folds=2)
    (sample_copy / "train" / "1000603527582775543").rename(sample_copy / "train" / "999")
    with pytest.raises(EkError, match="made for another data set"):
        ensure_splits(layout, sample_copy, 2)


def test_pooling_validation(sample_root, tmp_path):
    splits = make_splits(Layout(tmp_path / "f"), sample_root, n_folds=2, pool_validation=True)
    assert (splits["fold"] >= 0).all() and set(splits["split"]) == {"train", "validation"}
