"""`ek pseudo` and second-round batches: shifted windows, no leakage, mixing, the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ensemble_kit.blend.rule import BlendRule
from ensemble_kit.cli import main
from ensemble_kit.config import InputSpec, config_from_dict, dump_config
from ensemble_kit.data.cache import ensure_inputs
from ensemble_kit.data.loader import ArraySet, to_float
from ensemble_kit.data.splits import make_splits, read_splits
from ensemble_kit.data.synth import write_synthetic
from ensemble_kit.errors import EkError
from ensemble_kit.files import write_text
from ensemble_kit.inference.checkpoints import load_fold_model
from ensemble_kit.inference.tta import predict_inputs
from ensemble_kit.layout import Layout, fold_files
from ensemble_kit.models import build_model
from ensemble_kit.oof import read_ids, to_codes
from ensemble_kit.training import pseudo as pseudo_module
from ensemble_kit.training.mixing import mixed_batches, mixed_loss, pseudo_count
from ensemble_kit.training.pseudo import (
    PseudoRequest,
    pseudo_set,
    read_pseudo,
    run_pseudo,
    window_set,
    window_spec,
)

TARGETS = (0, 6, 7)
# Each config's input frames at each target frame, written out by hand (clamped at 0 and 7).
WINDOWS = {"a": {0: (0, 0, 1), 6: (5, 6, 7), 7: (6, 7, 7)}, "b": {0: (0,), 6: (6,), 7: (7,)}}
SMALL = {"encoder": "tu-test_resnet", "decoder": {"decoder_channels": [16, 8, 8, 8, 8]}}
CONFIGS = {
    "a": {"input": {"frames": [3, 4, 5]}, "model": SMALL, "tta": ["identity", "hflip"]},
    "b": {"input": {"frames": [4]}, "model": SMALL},
}
SIDE = 32


def test_window_spec_shifts_and_clamps():
    spec = InputSpec(frames=(3, 4, 5))
    assert window_spec(spec, 5) == (InputSpec(frames=(4, 5, 6)), False)
    assert window_spec(spec, 4) == (spec, False)
    assert window_spec(spec, 7) == (InputSpec(frames=(6, 7, 7)), True)
    assert window_spec(spec, 0) == (InputSpec(frames=(0, 0, 1)), True)
    assert window_spec(InputSpec(frames=(0, 4)), 1) == (InputSpec(frames=(0, 1)), True)


def constant_frames_record(folder, side=8):
    """Every band's frame f is the constant image 243 + 6 f K: ash blue = f / 10."""
    folder.mkdir(parents=True)
    values = np.broadcast_to(243.0 + 6.0 * np.arange(8, dtype=np.float32), (side, side, 8))
    for band in range(8, 17):
        np.save(folder / f"band_{band:02d}.npy", np.ascontiguousarray(values))


def test_shifted_window_takes_the_right_frames(tmp_path):
    root = tmp_path / "data"
    for record_id in ("111", "222"):
        constant_frames_record(root / "train" / record_id)
    records = pd.DataFrame({"record_id": ["222", "111"], "split": "train", "label_row": [0, 1]})
    arrays = window_set(Layout(tmp_path / "w"), root, InputSpec(frames=(3, 4, 5)), records, TARGETS)
    inputs, labels = arrays.read(np.arange(len(arrays)))
    assert labels is None and inputs.shape == (6, 9, 8, 8)
    blue = inputs[:, 2::3]  # ash blue of each of the window's three frames
    assert (blue == blue[:, :, :1, :1]).all()
    frames = np.rint(blue[:, :, 0, 0] / 255.0 * 10.0).astype(int)
    expected = [WINDOWS["a"][t] for t in TARGETS for _ in range(2)]
    assert frames.tolist() == [list(w) for w in expected]


@pytest.fixture(scope="module")
def first_round(tmp_path_factory):
    """3 folds of two untrained configs (each fold model a different random init), a hand-made
    blend (weights a: 2, b: 1) and its pseudo-labels at frames 0, 6, 7, on 12 records."""
    folder = tmp_path_factory.mktemp("pseudo")
    root = folder / "data"
    write_synthetic(root, n_train=12, n_validation=2, n_test=1, size=SIDE, seed=1)
    layout = Layout(folder / "folds")
    make_splits(layout, root, 3, seed=0)
    configs = {}
    for index, (name, raw) in enumerate(CONFIGS.items()):
        configs[name] = config_from_dict({"name": name, "train": {"batch_size": 8}, **raw})
        write_text(layout.config_dir(name) / "config.yaml", dump_config(configs[name]))
        for fold in range(3):
            torch.manual_seed(10 * index + fold)
            state = build_model(configs[name]).state_dict()
            path = fold_files(layout.fold_dir(name, fold))["best"]
            path.parent.mkdir(parents=True)
            torch.save({"model": state, "epoch": 1, "dice": 0.0}, path)
    BlendRule({"a": 2, "b": 1}).save(layout.blend_json)
    manifest = run_pseudo(PseudoRequest(layout, root, TARGETS, "p", "cpu"))
    return layout, root, configs, manifest


def expected_codes(layout, root, configs, record_ids, fold, target):
    """The blend of fold ``fold``'s models at ``target``, from inputs of hand-written windows."""
    sums = 0
    for name, weight in (("a", 2), ("b", 1)):
        entry = ensure_inputs(layout, root, "train", InputSpec(frames=WINDOWS[name][target]))
        x = to_float(torch.from_numpy(entry.arrays["inputs"][entry.index_of(record_ids)]))
        model = load_fold_model(configs[name], layout.fold_dir(name, fold), torch.device("cpu"))
        sums = sums + weight * to_codes(predict_inputs([model], configs[name], x)).astype(int)
    return np.floor(sums / 3 + 0.5)  # round half up, as integer codes


def test_pseudo_labels_are_the_blend_of_the_models_that_did_not_train_on_them(first_round):
    layout, root, configs, manifest = first_round
    _, ids, labels = read_pseudo(layout, "p")
    assert labels.dtype == np.uint8 and labels.shape == (len(ids), 3, SIDE, SIDE)
    assert manifest["frames"] == list(TARGETS) and manifest["weights"] == {"a": 2, "b": 1}
    assert {(c["config"], c["frame"]) for c in manifest["clamped"]} == {
        ("a", 0),
        ("a", 7),
    }
    for fold, target in enumerate(TARGETS):  # every fold, and every frame, once
        rows = np.flatnonzero(ids["fold"].to_numpy() == fold)
        record_ids = ids["record_id"][rows].tolist()
        stored = labels[rows, fold].astype(int)
        right = expected_codes(layout, root, configs, record_ids, fold, target)
        assert np.abs(stored - right).max() <= 1 and np.mean(stored != right) < 0.01
    wrong = expected_codes(layout, root, configs, record_ids, 0, TARGETS[-1])
    assert np.abs(stored - wrong).mean() > 2  # the check tells the fold models apart


def test_no_validation_record_was_labelled_by_a_model_that_trained_on_it(first_round):
    layout, _, _, manifest = first_round
    splits = read_splits(layout)
    pool = splits[splits["fold"] >= 0]
    trained_on = {  # each fold model's training records, from splits.csv
        f"{c}/fold_{k}": set(pool["record_id"][pool["fold"] != k]) for c in "ab" for k in range(3)
    }
    ids = read_ids(layout.pseudo_dir("p") / "ids.csv")
    assert sorted(ids["record_id"]) == sorted(pool["record_id"])
    for fold in range(3):
        validation = set(pool["record_id"][pool["fold"] == fold])
        for row in ids[ids["record_id"].isin(validation)].itertuples():
            assert row.models.split() == [f"a/fold_{fold}", f"b/fold_{fold}"]
            for model in row.models.split():
                assert row.record_id not in trained_on[model]
                assert fold not in manifest["models"][model]["trained_on_folds"]


def test_second_round_fold_trains_only_on_its_training_records(first_round):
    layout, root, _, _ = first_round
    splits = read_splits(layout)
    config = config_from_dict({"name": "r2", "label": {"pseudo": "p"}})
    _, ids, labels = read_pseudo(layout, "p")
    for fold in range(3):
        arrays = pseudo_set(layout, root, config, splits, fold)
        n_train = int((splits["fold"].between(0, 2) & (splits["fold"] != fold)).sum())
        assert len(arrays) == 3 * n_train and arrays.soft
        label_rows = arrays.rows[:, 2]
        assert (ids["fold"].to_numpy()[label_rows] != fold).all()
        member = len(arrays) - 1  # the last member: frame 7 of some training record
        inputs, codes = arrays.read(np.array([member]))
        record_id = ids["record_id"][label_rows[member]]
        entry = ensure_inputs(layout, root, "train", InputSpec(frames=(7,)))
        assert np.array_equal(inputs[0], entry.arrays["inputs"][entry.index_of([record_id])[0]])
        assert np.array_equal(codes[0], labels[label_rows[member], 2])


def test_pseudo_is_written_once(first_round, monkeypatch):
    layout, root, _, manifest = first_round
    monkeypatch.setattr(pseudo_module, "_predict_all", None)  # reusing must not predict
    assert run_pseudo(PseudoRequest(layout, root, TARGETS, "p", "cpu")) == manifest
    with pytest.raises(EkError, match="another blend, frames or splits"):
        run_pseudo(PseudoRequest(layout, root, (1, 2), "p", "cpu"))


def test_frames_option_takes_every_value(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(
        pseudo_module,
        "run_pseudo",
        lambda r: seen.append(r) or {"clamped": [], "frames": [], "models": {}, "blend_digest": ""},
    )

    def frames_of(*args):
        result = CliRunner().invoke(main, ["pseudo", "--workdir", str(tmp_path), *args])
        assert result.exit_code == 0, result.output
        return seen[-1].frames, seen[-1].name

    assert frames_of("--frames", "0", "1", "2", "3", "5", "6", "7", "--out", "x") == (
        (0, 1, 2, 3, 5, 6, 7),
        "x",
    )
    assert frames_of("--frames", "0,1", "--frames", "2") == ((0, 1, 2), "pseudo")
    assert frames_of()[0] == (0, 1, 2, 3, 5, 6, 7)
    result = CliRunner().invoke(main, ["pseudo", "--frames", "1", "a"])
    assert result.exit_code == 2 and "ek: error: --frames" in result.output


def test_bad_frames_and_names_are_refused(tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(EkError, match="frames are 0..7"):
        run_pseudo(PseudoRequest(layout, None, (8,)))
    with pytest.raises(EkError, match="folder name"):
        run_pseudo(PseudoRequest(layout, None, (1,), "../x"))


def toy_set(offset: int, n: int, soft: bool) -> ArraySet:
    inputs = np.repeat(np.arange(offset, offset + n, dtype=np.uint8), 4).reshape(n, 1, 2, 2)
    labels = np.ones((n, 2, 2), np.uint8) * (77 if soft else 1)
    return ArraySet(((inputs, labels),), np.c_[np.zeros(n, np.int64), np.arange(n)], soft=soft)


def test_mixed_batches_put_labelled_records_first():
    train, pseudo = toy_set(0, 20, soft=False), toy_set(100, 7, soft=True)
    loader = mixed_batches(train, pseudo, batch_size=8, n_pseudo=3, seed=5)
    seen_pseudo = []
    for inputs, labels in loader:
        values = inputs[:, 0, 0, 0].numpy()
        assert (values[:5] < 100).all() and (values[5:] >= 100).all()
        assert (labels[:5] == 255).all() and (labels[5:] == 77).all()
        seen_pseudo += list(values[5:])
    assert len(loader) == 4 and sorted(seen_pseudo[:7]) == list(range(100, 107))
    again = [b[0] for b in mixed_batches(train, pseudo, 8, 3, seed=5)]
    other = [b[0] for b in mixed_batches(train, pseudo, 8, 3, seed=6)]
    assert all(torch.equal(a, b[0]) for a, b in zip(again, loader))
    assert not all(torch.equal(a, b) for a, b in zip(again, other))


def test_pseudo_count():
    def count(fraction, batch=8):
        raw = {"train": {"batch_size": batch}, "label": {"pseudo_fraction": fraction}}
        return pseudo_count(config_from_dict(raw), toy_set(0, 4, True))

    assert (count(0.5), count(0.01), count(0.99), count(0.0)) == (4, 1, 7, 0)
    assert pseudo_count(config_from_dict({}), None) == 0


def test_mixed_loss_weights_the_pseudo_part():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, 4, 4, generator=g, requires_grad=True)
    target = torch.rand(6, 1, 4, 4, generator=g)
    bce = F.binary_cross_entropy_with_logits
    # weight 1: every sample counts the same, so a per-pixel mean is the whole batch's mean
    assert torch.allclose(mixed_loss(bce, logits, target, 2, 1.0), bce(logits, target))
    zero = mixed_loss(bce, logits, target, 2, 0.0)
    assert torch.allclose(zero, bce(logits[:4], target[:4]) * 4 / 6)
    zero.backward()
    assert (logits.grad[4:] == 0).all() and (logits.grad[:4] != 0).any()
    assert torch.equal(mixed_loss(bce, logits, target, 0, 0.3), bce(logits, target))


ROUND = """
name: {name}
input: {{channels: ash, frames: [3, 4, 5]}}
model: {{arch: Unet, encoder: tu-test_resnet}}
train: {{epochs: 2, batch_size: 8, max_steps_per_epoch: 2{train}}}
{extra}
"""


@pytest.mark.slow
def test_two_rounds_end_to_end(tmp_path, synth_root):
    """The 4th place's recipe through the CLI: cv, blend, pseudo, then a second round with
    pseudo-labels, averaging and two seeds; it blends with the first round."""

    def ek(*args):
        result = CliRunner().invoke(main, [*args, "--workdir", str(tmp_path / "w")])
        assert result.exit_code == 0, result.output
        return result.output

    first = tmp_path / "first.yaml"
    first.write_text(ROUND.format(name="first", train="", extra=""))
    second = tmp_path / "second.yaml"
    second.write_text(
        ROUND.format(
            name="second",
            train=", average_top_k: 2, seeds: [3, 4]",
            extra="label: {pseudo: r1, pseudo_fraction: 0.25}",
        )
    )
    ek("cv", "--data", str(synth_root), "--folds", "2", str(first))
    ek("blend", "--oof")
    output = ek("pseudo", "--frames", "0", "1", "7", "--out", "r1")
    assert "first: frame 7 clamped to [6, 7, 7]" in output
    ek("cv", str(second))
    layout = Layout(tmp_path / "w")
    for member in ("second-s3", "second-s4"):
        summary = pd.read_json(layout.summary(member), typ="series")
        assert all("top_k_dice" in fold for fold in summary["folds"])
        assert np.load(layout.oof_npy(member)).shape == np.load(layout.oof_npy("first")).shape
    assert "second-s3" in ek("blend", "--oof")
