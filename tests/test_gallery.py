"""The prediction gallery of ``ek blend --oof`` and ``ek show``, on a synthetic workdir.

No model is trained: OOF and holdout codes are noisy copies of the labels, written with the
library's own writers, then ``run_blend`` chooses the blend and draws the gallery.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ensemble_kit import metrics
from ensemble_kit.blend import gallery, show
from ensemble_kit.blend.rule import BlendRule
from ensemble_kit.blend.run import run_blend
from ensemble_kit.cli import main
from ensemble_kit.data.cache import load_labels
from ensemble_kit.data.records import list_records, load_mask
from ensemble_kit.data.splits import HOLDOUT_FOLD, make_splits
from ensemble_kit.files import digest_file, write_json
from ensemble_kit.layout import Layout, fold_files, record_dir
from ensemble_kit.oof import ArrayWriter, read_ids, read_oof, to_codes, write_ids

CONFIGS = ("alpha", "beta")
N_FOLDS = 3


def _write_config(layout, name, data_root, splits, rng, noise):
    """oof.npy, holdout.npy, their ids, DONE markers and summary.json of one config."""
    pool, holdout = splits[splits.fold != HOLDOUT_FOLD], splits[splits.fold == HOLDOUT_FOLD]
    for part, npy, ids_path, ids in (
        (pool, layout.oof_npy(name), layout.oof_ids(name), pool[["record_id", "fold"]]),
        (holdout, layout.holdout_npy(name), layout.holdout_ids(name), holdout[["record_id"]]),
    ):
        labels = load_labels(layout, data_root, part).astype(np.float32)
        codes = to_codes(labels * 0.6 + 0.15 + rng.normal(0, noise, labels.shape))
        with ArrayWriter(npy, codes.shape) as writer:
            writer.write(slice(None), codes)
        write_ids(ids_path, ids)
    for fold in range(N_FOLDS):
        write_json(fold_files(layout.fold_dir(name, fold))["done"], {"fold": fold})
    (layout.config_dir(name) / "config.yaml").write_text(f"name: {name}\n")
    summary = {"n_folds": N_FOLDS, "splits_digest": digest_file(layout.splits_csv)}
    write_json(layout.summary(name), summary)


@pytest.fixture(scope="module")
def blended(synth_root, tmp_path_factory):
    """A workdir with two configs' OOF and a blend (gallery drawn by run_blend)."""
    layout = Layout(tmp_path_factory.mktemp("gallery") / "folds")
    splits = make_splits(layout, synth_root, N_FOLDS)
    rng = np.random.default_rng(0)
    for k, name in enumerate(CONFIGS):
        _write_config(layout, name, synth_root, splits, rng, 0.2 + 0.1 * k)
    result = run_blend(layout, steps=3)
    return layout, synth_root, splits, result


def _outcome_masks(outcome):
    """Predicted and true masks decoded from an outcome image's three colours."""
    tp, fp, fn = (
        np.all(outcome == gallery.OUTCOME_COLOURS[k], axis=-1) for k in ("TP", "FP", "FN")
    )
    return tp | fp, tp | fn


def _reference_masks(layout, rule, set_name):
    """The rule applied to all stored codes of a set at once, and the ids of its rows: the
    holdout (a set ek submit could predict) at its own threshold, the OOF at the chosen one."""
    if set_name == "oof":
        name_npy, ids_path = layout.oof_npy, layout.oof_ids
    else:
        name_npy, ids_path = layout.holdout_npy, layout.holdout_ids
    codes = {n: np.load(name_npy(n)) for n in rule.weights}
    threshold = None if set_name == "holdout" else rule.threshold_sum
    ids = read_ids(ids_path(rule.members[0]))["record_id"].tolist()
    return rule.apply(codes, threshold), ids


def test_gallery_rows_draw_apply_blend_masks(blended):
    layout, data_root, _, fields = blended
    chosen = [read_oof(layout, n) for n in CONFIGS]
    labels = load_labels(
        layout, data_root, pd.DataFrame({"record_id": chosen[0].ids, "split": "train"})
    )
    rows = gallery.write_gallery(layout, data_root, fields.rule, chosen, labels)
    want, ids = _reference_masks(layout, fields.rule, "oof")
    assert rows and {p.kind.split()[0] for p, _ in rows} >= {"worst", "best"}
    for panel, drawn in rows:
        predicted, truth = _outcome_masks(drawn["outcome"])
        np.testing.assert_array_equal(predicted, want[ids.index(panel.record_id)])
        np.testing.assert_array_equal(
            truth, load_mask(record_dir(data_root, "train", panel.record_id))
        )
        np.testing.assert_array_equal(drawn["label"], truth)
        assert drawn["image"].shape == (*truth.shape, 3)
    pngs = sorted((layout.blend_report_dir / "gallery").glob("*.png"))
    assert [p.name.split("_")[-1] for p in pngs] == [f"{p.record_id}.png" for p, _ in rows]
    assert (layout.blend_report_dir / "gallery.png").stat().st_size > 0


def test_gallery_counts_reproduce_the_blend_scores(blended):
    layout, _, splits, fields = blended
    folder = layout.blend_report_dir / "gallery"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["sets"]["oof"]["dice"] == pytest.approx(fields.scores["blend_oof"], abs=1e-12)
    assert meta["sets"]["holdout"]["dice"] == pytest.approx(fields.scores["holdout"], abs=1e-12)
    records = read_ids(folder / "records.csv")
    assert sorted(records["record_id"]) == sorted(splits["record_id"])
    oof = records[records["set"] == "oof"]
    assert 1 + oof["dice_contribution"].sum() == pytest.approx(fields.scores["blend_oof"])
    assert oof["dice_contribution"].is_monotonic_increasing


def test_select_records_by_hand():
    counts = np.array(
        # tp, fp, fn
        [
            [0, 0, 0],  # empty, right: never drawn
            [5, 1, 0],  # own dice 10/11
            [0, 9, 0],  # empty, filled: 9 lost
            [2, 0, 8],  # 8 lost
            [0, 3, 0],  # empty, filled: 3 lost
            [4, 0, 0],  # own dice 1
            [1, 4, 4],  # 8 lost, later than record 3
        ]
    )
    picks = gallery.select_records(counts, n_worst=2, n_best=2, n_empty=2)
    assert picks == [
        ("worst 1", 2),
        ("worst 2", 3),
        ("best 1", 5),
        ("best 2", 1),
        ("empty filled 1", 4),
    ]


def test_dice_contributions_sum_to_global_dice():
    rng = np.random.default_rng(1)
    truth = rng.random((6, 8, 8)) > 0.7
    predicted = rng.random((6, 8, 8)) > 0.6
    counts = gallery.outcome_counts(predicted, truth)
    contributions = gallery.dice_contributions(counts)
    assert 1 + contributions.sum() == pytest.approx(metrics.global_dice(predicted, truth))
    lost = (predicted != truth).reshape(6, -1).sum(axis=1)
    np.testing.assert_allclose(contributions, -lost / (predicted.sum() + truth.sum()))


def _big_id(splits, in_set):
    """A record id of the set above 2**53 (one a float would corrupt)."""
    rows = zip(splits["record_id"], splits["fold"])
    return next(rid for rid, fold in rows if in_set(fold) and int(rid) > 2**53)


def _with_mode(layout, tmp_path, mode):
    """The workdir itself, or a copy whose blend.json marks the top 1 % of each set's pixels."""
    if mode == "stored":
        return layout
    copy = Layout(tmp_path / "folds")
    shutil.copytree(layout.workdir, copy.workdir)
    stored = json.loads(copy.blend_json.read_text())
    stored["rule"] |= {"mode": mode, "top_fraction": 0.01}
    write_json(copy.blend_json, stored)
    return copy


@pytest.mark.parametrize("mode", ["stored", "top_fraction"])
@pytest.mark.parametrize("set_name", ["oof", "holdout"])
def test_show_draws_the_stored_blend_with_the_exact_id(blended, tmp_path, set_name, mode):
    layout, data_root, splits, _ = blended
    layout = _with_mode(layout, tmp_path, mode)
    rule = BlendRule.load(layout.blend_json)
    in_set = (lambda f: f == HOLDOUT_FOLD) if set_name == "holdout" else (lambda f: f >= 0)
    rid = _big_id(splits, in_set)
    shown = show.show_record(layout, rid, out=tmp_path / "row.png")
    want, ids = _reference_masks(layout, rule, set_name)
    predicted, truth = _outcome_masks(shown.drawn["outcome"])
    np.testing.assert_array_equal(predicted, want[ids.index(rid)])
    split = "validation" if set_name == "holdout" else "train"
    np.testing.assert_array_equal(truth, load_mask(record_dir(data_root, split, rid)))
    assert str(int(float(rid))) != rid  # the id does not survive a float
    assert shown.panel.title.split(" · ")[0] == rid
    fold = splits.set_index("record_id").loc[rid, "fold"]
    assert ("holdout" if set_name == "holdout" else f"fold {fold}") in shown.panel.title
    assert (tmp_path / "row.png").stat().st_size > 0
    if mode == "stored":
        records = read_ids(layout.blend_report_dir / "gallery" / "records.csv")
        contribution = records.set_index("record_id").loc[rid, "dice_contribution"]
        assert shown.panel.contribution == pytest.approx(contribution)


def test_show_cli_unknown_id_is_one_line_naming_it(blended):
    layout = blended[0]
    unknown = "9007199254740993123"
    result = CliRunner().invoke(main, ["show", unknown, "--workdir", str(layout.workdir)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ek: error: ") and unknown in lines[0]


def test_show_cli_test_record_draws_no_label(blended, tmp_path):
    layout, data_root = blended[:2]
    rid = list_records(data_root, "test")[0]
    out = tmp_path / "test.png"
    args = ["show", rid, "--workdir", str(layout.workdir), "--out", str(out), "--frames"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert rid in result.output and "image only" in result.output and out.stat().st_size > 0
    shown = show.show_record(layout, rid, out=tmp_path / "again.png", frames=True)
    assert set(shown.drawn) == {"image", "frames"}
    assert shown.panel.label is None and shown.panel.predicted is None
    assert shown.drawn["frames"].shape[0] == 8
    np.testing.assert_array_equal(shown.drawn["frames"][4], shown.drawn["image"])


def test_show_without_gallery_totals_says_so(blended, tmp_path):
    layout, _, splits, _ = blended
    copy = Layout(tmp_path / "folds")
    shutil.copytree(layout.workdir, copy.workdir)
    (copy.blend_report_dir / "gallery" / "meta.json").unlink()
    rid = _big_id(splits, lambda f: f >= 0)
    shown = show.show_record(copy, rid, out=tmp_path / "row.png")
    assert shown.panel.contribution is None and "n/a" in shown.panel.title
