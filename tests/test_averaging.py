"""`train.average_top_k` (weight averaging of the best epochs) and `train.seeds` (members)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ensemble_kit.config import config_digest, config_from_dict, seed_members
from ensemble_kit.data.loader import ArraySet
from ensemble_kit.errors import EkError
from ensemble_kit.layout import fold_files
from ensemble_kit.metrics import best_threshold
from ensemble_kit.training import trainer as train_module
from ensemble_kit.training.averaging import average_state_dicts, recompute_batchnorm

CPU = torch.device("cpu")
SMALL = {"encoder": "tu-test_resnet", "decoder": {"decoder_channels": [16, 8, 8, 8, 8]}}


@pytest.fixture(scope="module", autouse=True)
def numba_threads_started():
    """The first parallel numba kernel of a process (the dice sweep in ``evaluate``) resets
    OpenMP's thread count, which torch shares: a run before it and a run after it differ in
    the last bits. Start numba first, so that runs compared bit for bit run alike."""
    best_threshold(np.zeros((1, 2, 2), np.uint8), np.zeros((1, 2, 2), np.uint8))


def toy_sets(n=8, side=32) -> tuple[ArraySet, ArraySet]:
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8).numpy()
    labels = (torch.rand(n, side, side, generator=g) > 0.8).to(torch.uint8).numpy()
    rows = np.c_[np.zeros(n, np.int64), np.arange(n)]
    half = n // 2
    return ArraySet(((inputs, labels),), rows[:half]), ArraySet(((inputs, labels),), rows[half:])


def config(**train):
    raw = {"epochs": 3, "batch_size": 4, "seed": 0, **train}
    return config_from_dict({"model": SMALL, "optim": {"lr": 0.01}, "train": raw})


def best_weights(fold_dir) -> dict:
    return torch.load(fold_files(fold_dir)["best"], weights_only=True)["model"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_average_of_identical_checkpoints_is_that_checkpoint():
    torch.manual_seed(0)
    state = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)).state_dict()
    state = {k: v + torch.rand_like(v.float()).to(v.dtype) / 3 for k, v in state.items()}
    for k in (2, 3, 5, 7):
        assert same(average_state_dicts([state] * k), state)


def test_average_is_the_elementwise_mean():
    a = {"w": torch.tensor([1.0, 2.0, 0.1]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, -2.0, 0.2]), "n": torch.tensor(9)}
    averaged = average_state_dicts([a, b])
    expected = (np.array([1.0, 2.0, 0.1]) + np.array([3.0, -2.0, 0.2])) / 2
    assert np.array_equal(averaged["w"].numpy(), expected.astype(np.float32))
    assert averaged["n"] == 3  # integer counters come from the first


def test_batchnorm_statistics_are_the_mean_over_batches():
    layer = nn.BatchNorm2d(2)
    layer.running_mean.fill_(5.0)
    model = nn.Sequential(layer, nn.Dropout(0.5)).train()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 2, 3, 3, generator=g) * (i + 1) + i for i in range(3)]
    assert recompute_batchnorm(model, batches) == 3
    values = [b.numpy().transpose(1, 0, 2, 3).reshape(2, -1) for b in batches]
    mean = np.mean([v.mean(axis=1) for v in values], axis=0)
    var = np.mean([v.var(axis=1, ddof=1) for v in values], axis=0)
    assert np.allclose(layer.running_mean.numpy(), mean, atol=1e-6)
    assert np.allclose(layer.running_var.numpy(), var, atol=1e-5)
    assert layer.momentum == 0.1 and model.training and model[1].training  # modes restored


def test_top_1_is_todays_best_checkpoint(tmp_path):
    train, val = toy_sets()
    off, k1 = config(epochs=2), config(epochs=2, average_top_k=1)
    plain = train_module.train_fold(off, tmp_path / "off", 0, train, val, CPU)
    one = train_module.train_fold(k1, tmp_path / "k1", 0, train, val, CPU)
    assert same(best_weights(tmp_path / "off"), best_weights(tmp_path / "k1"))
    assert plain == {**one, "seconds": plain["seconds"]} and "top_k_dice" not in one


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    """One fold trained 3 epochs with average_top_k: 2."""
    train, val = toy_sets()
    fold_dir = tmp_path_factory.mktemp("top_k") / "fold_0"
    summary = train_module.train_fold(config(average_top_k=2), fold_dir, 0, train, val, CPU)
    return fold_dir, summary


def test_top_k_averages_the_k_best_epochs(averaged):
    fold_dir, summary = averaged
    metrics = pd.read_csv(fold_files(fold_dir)["metrics"])
    ranked = metrics.sort_values(["val_dice", "epoch"], ascending=[False, True])
    assert summary["top_k_epochs"] == ranked["epoch"].tolist()[:2]
    assert summary["best_dice"] == metrics["val_dice"].max()
    assert metrics["top_k_dice"].iloc[-1] == summary["top_k_dice"]
    assert metrics["top_k_dice"].iloc[:-1].isna().all()
    kept = [torch.load(p, weights_only=True) for p in fold_dir.glob("top_*.pt")]
    kept = {c["epoch"]: c["model"] for c in kept}
    best = best_weights(fold_dir)
    for name, value in best.items():
        if "running_" in name or "num_batches" in name:
            continue  # BatchNorm statistics are recomputed
        pair = [kept[e][name].double().numpy() for e in summary["top_k_epochs"]]
        assert np.array_equal(value.numpy(), ((pair[0] + pair[1]) / 2).astype(np.float32))
    statistic = next(name for name in best if name.endswith("running_mean"))
    assert all(not torch.equal(best[statistic], kept[e][statistic]) for e in kept)


def test_top_k_resumes_after_a_kill_between_slot_and_last(averaged, tmp_path, monkeypatch):
    train, val = toy_sets()
    real_save = train_module.save_checkpoint

    def killed_at_epoch_2(path, payload):
        if path.name == "last.pt" and payload["state"]["epoch"] == 2:
            assert len(payload["state"]["top"]) == 2  # epoch 2 was kept in a slot
            raise KeyboardInterrupt  # after epoch 2's slot was written, before last.pt
        real_save(path, payload)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_at_epoch_2)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_module.train_fold(config(average_top_k=2), resumed, 0, train, val, CPU)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    summary = train_module.train_fold(config(average_top_k=2), resumed, 0, train, val, CPU)
    assert summary["epochs"] == 3 and summary["top_k_dice"] == averaged[1]["top_k_dice"]
    assert same(best_weights(averaged[0]), best_weights(resumed))


def test_seed_members():
    base = config_from_dict({"name": "x", "train": {"seeds": [0, 1, 2], "seed": 7}})
    members = seed_members(base)
    assert [m.name for m in members] == ["x-s0", "x-s1", "x-s2"]
    assert [m.train.seed for m in members] == [0, 1, 2]
    assert all(m.train.seeds == () and seed_members(m) == [m] for m in members)
    assert len({config_digest(m) for m in members}) == 3
    assert seed_members(config_from_dict({"name": "y"}))[0].name == "y"
    with pytest.raises(EkError, match="train.seeds"):
        config_from_dict({"train": {"seeds": [1, 1]}})


def test_seeds_give_distinct_reproducible_members(tmp_path):
    train, val = toy_sets()
    s0, s1 = seed_members(config(epochs=1, seeds=[0, 1]))
    for name, member in (("s0", s0), ("s0_again", s0), ("s1", s1)):
        train_module.train_fold(member, tmp_path / name, 0, train, val, CPU)
    assert same(best_weights(tmp_path / "s0"), best_weights(tmp_path / "s0_again"))
    assert not same(best_weights(tmp_path / "s0"), best_weights(tmp_path / "s1"))


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"label": {"pseudo_fraction": 1.0}}, "label.pseudo_fraction"),
        ({"label": {"pseudo_weight": -1}}, "label.pseudo_weight"),
        ({"train": {"average_top_k": -1}}, "train.average_top_k"),
    ],
)
def test_bad_winner_keys(raw, key):
    with pytest.raises(EkError, match=key):
        config_from_dict(raw)
