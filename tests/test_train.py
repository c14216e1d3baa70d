"""Training knobs each change what they claim (tiny model, 32 px, CPU)."""

import math

import numpy as np
import pytest
import torch

from ensemble_kit.config import ScheduleSpec, config_from_dict
from ensemble_kit.runtime import resolve_runtime
from ensemble_kit.training.optim import lr_factor, make_optimizer
from ensemble_kit.training.trainer import Trainer

CPU = torch.device("cpu")


def trainer(**overrides) -> Trainer:
    model = {"encoder": "tu-test_resnet", "decoder": {"decoder_channels": [8] * 5}}
    raw = {"model": model, "train": {"batch_size": 4}, **overrides}
    config = config_from_dict(raw)
    torch.manual_seed(0)
    return Trainer(config, resolve_runtime(config, CPU), total_steps=100)


def batch(seed=0, n=4, side=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    y = (torch.rand(n, side, side, generator=g) > 0.9).to(torch.uint8)
    return x, y


def step(t: Trainer, seed=0, index=0):
    x, y = t.prepare(*batch(seed))
    return t.train_step(x, y, index, torch.Generator().manual_seed(seed))


def weights(t: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in t.model.parameters()]).clone()


def test_warmup_then_cosine_to_min_lr():
    spec = ScheduleSpec(name="cosine", warmup_iters=10, min_lr=0.0)
    factors = [lr_factor(spec, s, 110, 1.0) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5, abs=0.02)
    assert factors[-1] < 0.01 and all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(ScheduleSpec(name="none"), 50, 100, 1.0) == 1.0


def test_schedulers_move_the_learning_rate():
    for name in ("cosine", "onecycle"):
        t = trainer(schedule={"name": name, "warmup_iters": 5})
        lrs = []
        for i in range(8):
            step(t, index=i)
            lrs.append(t.optimizer.param_groups[0]["lr"])
        assert len(set(np.round(lrs, 8))) > 3, name


def test_optimisers():
    params = [torch.nn.Parameter(torch.zeros(2))]
    spec = config_from_dict({"optim": {"name": "sgd", "lr": 0.2, "momentum": 0.9}}).optim
    sgd = make_optimizer(spec, params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        assert (
            type(make_optimizer(config_from_dict({"optim": {"name": name}}).optim, params)) is cls
        )


def test_training_steps_change_weights_and_accumulation_delays_them():
    t = trainer(train={"batch_size": 4, "accumulate": 2})
    before = weights(t)
    step(t, index=0)
    assert torch.equal(before, weights(t)), "first of two accumulated batches must not step"
    step(t, index=1)
    assert not torch.equal(before, weights(t))


def test_bf16_autocast_on_cpu():
    t = trainer(train={"amp": "bf16"})
    assert t.runtime.amp_dtype == torch.bfloat16
    x, _ = t.prepare(*batch())
    with t.autocast():
        assert t.model(x).dtype == torch.bfloat16
    assert math.isfinite(step(t))
    assert resolve_runtime(t.config, CPU).use_scaler is False
    assert resolve_runtime(config_from_dict({"train": {"amp": "fp16"}}), CPU).use_scaler


def test_channels_last():
    t = trainer(train={"channels_last": True})
    kernel = next(p for p in t.model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert kernel.is_contiguous(memory_format=torch.channels_last) and not kernel.is_contiguous()
    x, _ = t.prepare(*batch())
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert trainer().runtime.channels_last is False  # auto: CUDA only


def test_gradient_clipping_bounds_the_norm(monkeypatch):
    t = trainer(
        train={"clip_grad": 1e-3},
        optim={"name": "sgd", "lr": 1.0, "momentum": 0.0},
        schedule={"name": "none"},
    )
    before = weights(t)
    step(t)
    assert (weights(t) - before).norm() <= 1e-3 + 1e-6


def test_ema_lags_the_model():
    t = trainer(train={"ema": 0.9})
    ema_before = torch.cat([p.flatten() for p in t.ema.model.parameters()]).clone()
    step(t)
    ema_after = torch.cat([p.flatten() for p in t.ema.model.parameters()])
    model_delta = weights(t) - ema_before
    assert torch.allclose(ema_after - ema_before, 0.1 * model_delta, atol=1e-6)
    assert t.eval_model is t.ema.model


def test_compile_is_opt_in(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    trainer()
    assert calls == []
    trainer(train={"compile": True})
    assert calls == [{"mode": "reduce-overhead"}]


def test_soft_labels_and_smoothing_reach_the_loss():
    t = trainer(label={"smoothing": 0.2})
    x, y = t.prepare(*batch())
    seen = []
    t.loss_fn = lambda logits, target: seen.append(target) or logits.mean() * 0
    t.train_step(x, y, 0, torch.Generator().manual_seed(0))
    assert seen[0].min() == pytest.approx(0.1) and seen[0].max() == pytest.approx(0.9)
    soft = torch.full((1, 32, 32), 128, dtype=torch.uint8)
    _, target = t.prepare(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), soft, soft=True)
    assert target.max().item() == pytest.approx(128 / 255)


def test_shift_correct_moves_the_label_half_a_pixel():
    t = trainer(label={"shift_correct": True})
    label = torch.zeros(1, 32, 32, dtype=torch.uint8)
    label[0, 10, 10] = 1
    _, target = t.prepare(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), label)
    assert target.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert target[0, 0, 10, 10] < 1.0 and target[0, 0, 9:11, 9:11].sum().item() == pytest.approx(
        1.0, abs=1e-5
    )


def test_same_seed_same_weights_after_steps():
    a, b = trainer(), trainer()
    step(a), step(b)
    assert torch.equal(weights(a), weights(b))


def test_early_stopping_stops_after_patience(tmp_path, monkeypatch):
    from ensemble_kit.data.loader import ArraySet
    from ensemble_kit.training import trainer as train_module

    scores = iter([0.5, 0.4, 0.3, 0.9, 0.9])
    monkeypatch.setattr(train_module, "evaluate", lambda trainer, val: (1.0, next(scores), 128))
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8).numpy()
    labels = (torch.rand(8, 32, 32, generator=g) > 0.9).to(torch.uint8).numpy()
    arrays = ArraySet(((inputs, labels),), np.c_[np.zeros(8, np.int64), np.arange(8)])
    config = config_from_dict(
        {
            "model": {"encoder": "tu-test_resnet"},
            "train": {"epochs": 5, "batch_size": 4, "early_stop": 2},
        }
    )
    summary = train_module.train_fold(config, tmp_path, 0, arrays, arrays, CPU)
    assert summary["epochs"] == 3 and summary["best_epoch"] == 1
    no_patience = config_from_dict(
        {"model": {"encoder": "tu-test_resnet"}, "train": {"epochs": 2, "batch_size": 4}}
    )
    scores = iter([0.5, 0.4])
    assert (
        train_module.train_fold(no_patience, tmp_path / "b", 0, arrays, arrays, CPU)["epochs"] == 2
    )


def _tiny_set(n: int, side: int = 32):
    from ensemble_kit.data.loader import ArraySet

    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8).numpy()
    labels = (torch.rand(n, side, side, generator=g) > 0.9).to(torch.uint8).numpy()
    return ArraySet(((inputs, labels),), np.c_[np.zeros(n, np.int64), np.arange(n)])


def _expected_lrs(name: str, total: int, base: float, warmup: int, min_lr: float) -> list[float]:
    """The lr of each optimiser step, by hand (cosine, none) or from torch's OneCycleLR."""
    if name == "onecycle":
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=base)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=base, total_steps=total, pct_start=warmup / total
        )
        lrs = []
        for _ in range(total):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs
    lrs = []
    for k in range(total):
        if k < warmup:
            lrs.append(base * (k + 1) / warmup)
        elif name == "none":
            lrs.append(base)
        else:
            cosine = 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
            lrs.append(min_lr + (base - min_lr) * cosine)
    return lrs


@pytest.mark.parametrize("accumulate", [1, 2, 3])
@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "none"])
def test_every_schedule_sees_exactly_the_optimiser_steps_that_run(
    tmp_path, monkeypatch, schedule, accumulate
):
    """5 batches an epoch (10 records, batch 2) over 2 epochs: the last group is partial."""
    from ensemble_kit.registry import SCHEDULES
    from ensemble_kit.training import trainer as train_module

    assert set(SCHEDULES.names) == {"cosine", "onecycle", "none"}  # each one is tested here
    monkeypatch.setattr(train_module, "evaluate", lambda trainer, val: (1.0, 0.5, 128))
    used = []
    original = Trainer.optimizer_step

    def recording(self):
        used.append(self.optimizer.param_groups[0]["lr"])
        original(self)

    monkeypatch.setattr(Trainer, "optimizer_step", recording)
    base, warmup, min_lr = 0.01, 2, 1e-4
    config = config_from_dict(
        {
            "model": {"encoder": "tu-test_resnet", "decoder": {"decoder_channels": [8] * 5}},
            "optim": {"name": "sgd", "lr": base},
            "schedule": {"name": schedule, "warmup_iters": warmup, "min_lr": min_lr},
            "train": {"epochs": 2, "batch_size": 2, "accumulate": accumulate},
        }
    )
    train_module.train_fold(config, tmp_path, 0, _tiny_set(10), _tiny_set(4), CPU)
    total = 2 * math.ceil(5 / accumulate)
    assert len(used) == total
    np.testing.assert_allclose(used, _expected_lrs(schedule, total, base, warmup, min_lr))
    if schedule == "cosine":
        assert used[-1] > min_lr + 1e-6  # the last step is not already at the floor


def test_a_short_last_group_steps_with_its_own_mean_gradient():
    """accumulate 3 over 4 batches: the 4th batch alone is one step, as with accumulate 1."""
    raw = {"optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0}, "schedule": {"name": "none"}}
    grouped = trainer(train={"batch_size": 4, "accumulate": 3}, **raw)
    single = trainer(train={"batch_size": 4, "accumulate": 1}, **raw)
    single.model.load_state_dict(grouped.model.state_dict())
    for index in range(3):
        step(grouped, seed=index, index=index)
    single.model.load_state_dict(grouped.model.state_dict())
    before = weights(grouped)
    x, y = grouped.prepare(*batch(seed=9))
    grouped.train_step(x, y, 3, torch.Generator().manual_seed(9), n_batches=4)
    x, y = single.prepare(*batch(seed=9))
    single.train_step(x, y, 0, torch.Generator().manual_seed(9), n_batches=1)
    assert not torch.equal(before, weights(grouped))
    torch.testing.assert_close(weights(grouped), weights(single), rtol=1e-5, atol=1e-7)
