"""Sparse OOF (issue 21): the format, load_codes, and blends of sparse, mixed and dense members."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ensemble_kit.blend.candidates import build_candidates
from ensemble_kit.blend.ensemble_search import search
from ensemble_kit.blend.mean_dice import class_candidates
from ensemble_kit.blend.run import run_blend
from ensemble_kit.blend.sparse import check_rule_floor, class_of
from ensemble_kit.blend.verify import verify_blend
from ensemble_kit.errors import EkError
from ensemble_kit.oof import load_codes
from ensemble_kit.sparse_oof import (
    FlooredCodes,
    SparseCodes,
    SparseWriter,
    decode_units,
    encode_units,
    wants_sparse,
)

FLOOR = 13


def _codes(rng, shape, empty=0.5):
    """uint8 codes: mostly low, some blobs-like runs high, some rows entirely below 13."""
    codes = rng.integers(0, 12, shape).astype(np.uint8)
    high = rng.random(shape) < 0.15
    codes[high] = rng.integers(FLOOR - 2, 256, int(high.sum())).astype(np.uint8)
    codes[rng.random(shape[0]) < empty] = rng.integers(0, FLOOR, shape[1:], dtype=np.uint8)
    return codes


def _write(path, codes, labels=None, floor=FLOOR, order=None):
    order = np.arange(len(codes)) if order is None else order
    with SparseWriter(path, codes.shape, floor) as writer:
        for lo in range(0, len(order), 3):
            rows = order[lo : lo + 3]
            writer.write(rows, codes[rows], None if labels is None else labels[rows])
    return SparseCodes(path)


def test_encode_decode_round_trip_matches_numpy():
    rng = np.random.default_rng(0)
    values = _codes(rng, (9, 40))
    per_unit, start, length, codes = encode_units(values, FLOOR)
    assert int(length.sum()) == len(codes) == int((values >= FLOOR).sum())
    assert per_unit.sum() == len(start)
    out = np.full(values.shape, 7, dtype=np.uint8)
    decode_units((per_unit, start, length), codes, out)
    np.testing.assert_array_equal(out, np.where(values >= FLOOR, values, 0))


@pytest.mark.parametrize("shape", [(10, 12, 9), (7, 3, 8, 5)])
def test_file_round_trip_in_any_row_order(tmp_path, shape):
    rng = np.random.default_rng(1)
    codes = _codes(rng, shape)
    labels = (rng.random(shape) < 0.3).astype(np.uint8)
    sparse = _write(tmp_path / "x.ekz", codes, labels, order=rng.permutation(shape[0]))
    floored = np.where(codes >= FLOOR, codes, 0)
    assert sparse.floor == FLOOR and sparse.shape == shape
    np.testing.assert_array_equal(sparse[:], floored)
    np.testing.assert_array_equal(sparse[[5, 0, 2]], floored[[5, 0, 2]])
    np.testing.assert_array_equal(sparse[3], floored[3])
    units = codes.reshape(-1, shape[-2] * shape[-1])
    positive = labels.reshape(units.shape) > 0
    np.testing.assert_array_equal(
        sparse.below_positives, np.count_nonzero(positive & (units < FLOOR), axis=1)
    )
    np.testing.assert_array_equal(sparse.unit_counts(), (units >= FLOOR).sum(axis=1))


def test_unwritten_rows_or_a_failure_leave_no_file(tmp_path):
    codes = _codes(np.random.default_rng(2), (6, 8, 8))
    path = tmp_path / "x.ekz"
    with pytest.raises(EkError, match="1 rows were never written"):
        with SparseWriter(path, codes.shape, FLOOR) as writer:
            writer.write(slice(0, 5), codes[:5])
    with pytest.raises(RuntimeError):
        with SparseWriter(path, codes.shape, FLOOR) as writer:
            writer.write(slice(0, 6), codes)
            raise RuntimeError("killed")
    assert not path.exists() and not list(tmp_path.iterdir())


def test_wants_sparse_past_4_gb_or_when_asked():
    assert not wants_sparse("auto", 20_529, (256, 256))  # contrails: 1.3 GB stays dense
    assert wants_sparse("auto", 12_568, (4, 256, 1600))  # steel: 20.6 GB
    assert wants_sparse("sparse", 1, (8, 8)) and not wants_sparse("dense", 10**6, (4096, 4096))
    with pytest.raises(EkError, match="oof.format"):
        wants_sparse("zip", 1, (8, 8))


def test_load_codes_reads_either_format(tmp_path):
    codes = _codes(np.random.default_rng(3), (5, 8, 8))
    np.save(tmp_path / "oof.npy", codes)
    _write(tmp_path / "holdout_sparse.ekz", codes)
    np.testing.assert_array_equal(load_codes(tmp_path, "oof"), codes)
    np.testing.assert_array_equal(load_codes(tmp_path, "holdout"), np.where(codes >= 13, codes, 0))
    with pytest.raises(EkError, match="expected 'oof' or 'holdout'"):
        load_codes(tmp_path, "test")
    with pytest.raises(EkError, match="missing"):
        load_codes(tmp_path / "nothing", "oof")


# ----------------------------------------------------------------------------- blends


def _problem(tmp_path, seed=0, n=30, n_configs=3, side=12):
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, side, side), dtype=np.uint8)
    for i in range(0, n, 2):  # blobs in every other image
        r, c = rng.integers(0, side - 4, 2)
        labels[i, r : r + 4, c : c + 4] = 1
    oofs = []
    for _ in range(n_configs):
        p = np.clip(labels * 0.6 + rng.normal(0.0, 0.2, labels.shape), 0, 1)
        p[rng.random(n) < 0.3] *= 0.04  # rows whose every code is below the floor
        oofs.append(np.rint(p * 255).astype(np.uint8))
    folds = np.arange(n) % 3
    sparse = [_write(tmp_path / f"c{i}.ekz", o, labels) for i, o in enumerate(oofs)]
    return oofs, sparse, labels, folds


def _same_candidates(a, b):
    for name in ("values", "labels", "positions", "image_start", "pixel_fold", "folds"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("fold_positives", "fold_pixels", "config_histograms", "image_positives"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.floor == b.floor


def test_candidates_all_sparse_mixed_and_floored_dense_agree(tmp_path):
    oofs, sparse, labels, folds = _problem(tmp_path)
    floored = [FlooredCodes(o, FLOOR) for o in oofs]
    reference = build_candidates(floored, labels, folds)
    _same_candidates(build_candidates(sparse, labels, folds), reference)
    _same_candidates(build_candidates([sparse[0], *oofs[1:]], labels, folds), reference)
    # below_positives unknown (-1): the skipped rows' positives come from the labels
    unknown = [_write(tmp_path / f"u{i}.ekz", o) for i, o in enumerate(oofs)]
    _same_candidates(build_candidates(unknown, labels, folds), reference)
    # the labels themselves sparse (code 1 at every positive, floor 1)
    sparse_labels = _write(tmp_path / "labels.ekz", labels, floor=1)
    _same_candidates(build_candidates(sparse, sparse_labels, folds), reference)


def test_a_class_view_reads_one_class_without_the_others(tmp_path):
    rng = np.random.default_rng(3)
    codes = _codes(rng, (9, 3, 8, 5))
    labels = (rng.random(codes.shape) < 0.3).astype(np.uint8)
    sparse = _write(tmp_path / "x.ekz", codes, labels, order=rng.permutation(9))
    floored = np.where(codes >= FLOOR, codes, 0)
    for c in range(3):
        view = class_of(sparse, c)
        assert view.shape == (9, 8, 5) and view.floor == FLOOR
        np.testing.assert_array_equal(view[:], floored[:, c])
        np.testing.assert_array_equal(view[[4, 1]], floored[[4, 1], c])
        np.testing.assert_array_equal(view.unit_counts(), (floored[:, c] > 0).sum(axis=(1, 2)))
        below = (labels[:, c] > 0) & (codes[:, c] < FLOOR)
        np.testing.assert_array_equal(view.below_positives, below.sum(axis=(1, 2)))
        np.testing.assert_array_equal(class_of(FlooredCodes(codes, FLOOR), c)[:], floored[:, c])
    with pytest.raises(EkError, match="no class 3"):
        sparse.class_view(3)


def test_class_candidates_of_sparse_files_equal_the_floored_dense(tmp_path):
    rng = np.random.default_rng(4)
    labels = (rng.random((12, 2, 10, 10)) < 0.2).astype(np.uint8)
    oofs = [np.where(labels > 0, 200, _codes(rng, labels.shape)).astype(np.uint8) for _ in "ab"]
    sparse = [_write(tmp_path / f"{n}.ekz", o, labels) for n, o in zip("ab", oofs)]
    folds = np.arange(12) % 3
    floored = [FlooredCodes(o, FLOOR) for o in oofs]
    for got, want in zip(
        class_candidates(sparse, labels, folds), class_candidates(floored, labels, folds)
    ):
        _same_candidates(got, want)


def test_a_higher_sparse_floor_raises_the_search_floor(tmp_path):
    oofs, _, labels, folds = _problem(tmp_path)
    high = _write(tmp_path / "high.ekz", oofs[0], labels, floor=40)
    cands = build_candidates([high, oofs[1]], labels, folds)
    assert cands.floor == 40
    assert (cands.values[1][cands.values[0] == 0] >= 40).all()


def _choice(result):
    c = result.choice
    return (
        list(c.weights),
        c.threshold_sum,
        c.top_fraction,
        c.min_pixels,
        c.min_component,
        c.dice,
        result.mode,
        result.nested.pooled(),
        result.nested.per_fold(),
        result.per_fold,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_all_sparse_and_mixed_blends_choose_and_score_alike(tmp_path, seed):
    oofs, sparse, labels, folds = _problem(tmp_path, seed=seed)
    names = ["a", "b", "c"]
    all_sparse = search(sparse, labels, folds, steps=4, names=names)
    mixed = search([oofs[0], sparse[1], oofs[2]], labels, folds, steps=4, names=names)
    assert _choice(all_sparse) == _choice(mixed)
    assert all_sparse.per_config == mixed.per_config


def test_one_config_alone_scores_alike_sparse_or_dense(tmp_path):
    oofs, sparse, labels, folds = _problem(tmp_path)
    dense = search([oofs[1]], labels, folds, steps=2)
    alone = search([sparse[1]], labels, folds, steps=2)
    assert _choice(dense) == _choice(alone)


def test_a_stored_rule_below_the_floor_is_refused():
    rule = {"configs": {"a": 2, "b": 1}, "threshold_sum": 38}
    check_rule_floor(rule, 0, "blend.json")  # all dense: no floor
    check_rule_floor({**rule, "threshold_sum": 39}, FLOOR, "blend.json")
    with pytest.raises(EkError, match=r"blend.json: threshold_sum 38 lies below .* = 39\)"):
        check_rule_floor(rule, FLOOR, "blend.json")


# ----------------------------------------------------------------------------- workdir


def _to_sparse(folder, labels=None):
    """Rewrite a config folder's dense OOF and holdout as sparse files."""
    for split in ("oof", "holdout"):
        dense = folder / f"{split}.npy"
        if dense.is_file():
            _write(folder / f"{split}_sparse.ekz", np.load(dense))
            dense.unlink()


def _scores(result):
    kept = {k: v for k, v in result.to_dict().items() if k not in ("digests", "cost")}  # timed
    return json.loads(json.dumps(kept))


def test_run_blend_all_sparse_equals_mixed(tmp_path):
    from tests.test_blend import _write_workdir

    layout, _ = _write_workdir(tmp_path / "a", configs=("alpha", "beta", "gamma"))
    mixed_dir, sparse_dir = tmp_path / "mixed", tmp_path / "sparse"
    shutil.copytree(tmp_path / "a", mixed_dir)
    shutil.copytree(tmp_path / "a", sparse_dir)
    _to_sparse(mixed_dir / "folds" / "beta")
    for name in ("alpha", "beta", "gamma"):
        _to_sparse(sparse_dir / "folds" / name)
    mixed = run_blend(type(layout)(mixed_dir / "folds"), steps=4)
    all_sparse = run_blend(type(layout)(sparse_dir / "folds"), steps=4)
    assert _scores(mixed) == _scores(all_sparse)
    assert set(all_sparse.digests["oof"]) == {"alpha", "beta", "gamma"}
    assert verify_blend(type(layout)(sparse_dir / "folds"))


# ----------------------------------------------------------------------------- trained

QUICK = """
name: {name}
input: {{channels: ash, frames: [4]}}
model: {{arch: Unet, encoder: tu-test_resnet}}
optim: {{name: adam, lr: 0.003}}
train: {{epochs: 2, batch_size: 8, max_steps_per_epoch: 2, seed: {seed}}}
oof: {{format: {fmt}, floor: 13}}
"""


def _cv(folder, synth_root, fmt):
    from click.testing import CliRunner

    from ensemble_kit.cli import main

    paths = []
    for seed, name in enumerate(("qa", "qb")):
        path = folder / f"{name}.yaml"
        path.write_text(QUICK.format(name=name, seed=seed, fmt=fmt))
        paths.append(str(path))
    workdir = folder / "folds"
    args = ["cv", "--data", str(synth_root), "--workdir", str(workdir), "--folds", "2", *paths]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_root):
    """Two quick configs trained twice on the same splits (the same models: training is
    reproducible on CPU): dense OOF, and sparse OOF from sparse fold parts."""
    dense = _cv(tmp_path_factory.mktemp("dense"), synth_root, "dense")
    folder = tmp_path_factory.mktemp("sparse")
    shutil.copytree(dense.parent / "folds", folder / "folds", ignore=_only_splits)
    return dense, _cv(folder, synth_root, "sparse")


def _only_splits(folder, names):
    return (
        [n for n in names if n not in ("splits.csv", "splits.json")]
        if folder.endswith("folds")
        else []
    )


@pytest.mark.slow
def test_ek_cv_writes_sparse_oof_and_parts(trained):
    dense, sparse = trained
    for name in ("qa", "qb"):
        assert not (sparse / name / "oof.npy").exists()
        assert (sparse / name / "fold_0" / "oof_part_sparse.ekz").is_file()
        codes = load_codes(dense / name, "oof")
        np.testing.assert_array_equal(
            load_codes(sparse / name, "oof"), np.where(codes >= 13, codes, 0)
        )
        holdout = load_codes(dense / name, "holdout")
        np.testing.assert_array_equal(
            load_codes(sparse / name, "holdout"), np.where(holdout >= 13, holdout, 0)
        )
        assert SparseCodes(sparse / name / "oof_sparse.ekz").below_positives.min() >= 0


@pytest.mark.slow
def test_trained_blends_all_sparse_and_mixed_alike(trained, tmp_path):
    from ensemble_kit.layout import Layout

    dense, sparse = trained
    mixed = tmp_path / "folds"
    shutil.copytree(dense, mixed)
    for split in ("oof", "holdout"):
        (mixed / "qb" / f"{split}.npy").unlink()
        shutil.copy(sparse / "qb" / f"{split}_sparse.ekz", mixed / "qb")
    all_sparse = run_blend(Layout(sparse), steps=3)
    assert _scores(run_blend(Layout(mixed), steps=3)) == _scores(all_sparse)
    assert all_sparse["scores"]["search_floor"] == 13 / 255
    alone = search([SparseCodes(sparse / "qa" / "oof_sparse.ekz")], *_labels_folds(sparse))
    plain = search([np.load(dense / "qa" / "oof.npy")], *_labels_folds(sparse))
    assert _choice(alone) == _choice(plain)


def _labels_folds(workdir):
    from ensemble_kit.blend.run import _load_labels, _read_splits, _splits_data_root
    from ensemble_kit.layout import Layout
    from ensemble_kit.oof import read_oof

    layout = Layout(workdir)
    oof = read_oof(layout, "qa")
    return _load_labels(layout, _splits_data_root(layout), oof.ids, _read_splits(layout)), oof.folds
