"""Loss terms against numpy references, and the weighted sum built from config terms."""

import numpy as np
import pytest
import torch
from segmentation_models_pytorch.losses.lovasz import _lovasz_hinge

from ensemble_kit.config import LossTerm
from ensemble_kit.errors import EkError
from ensemble_kit.training.losses import (
    LOSSES,
    build_loss,
    dice_loss,
    focal_loss,
    lovasz_hinge_loss,
    smooth_labels,
)

NAMES = ("dice", "bce", "focal", "logcosh_dice", "lovasz")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _bce(x, t):
    p = _sigmoid(x)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def _dice(x, t):
    p = _sigmoid(x)
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


NUMPY_REFERENCES = {
    "dice": _dice,
    "bce": lambda x, t: _bce(x, t).mean(),
    "focal": lambda x, t: (np.abs(t - _sigmoid(x)) ** 2 * _bce(x, t)).mean(),
    "logcosh_dice": lambda x, t: np.log(np.cosh(_dice(x, t))),
}


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 1, 5, 6)) * 2
    soft = rng.integers(0, 5, size=(3, 1, 5, 6)) / 4  # annotator means
    return logits, soft


@pytest.mark.parametrize("name", sorted(NUMPY_REFERENCES))
def test_term_matches_numpy(batch, name):
    logits, soft = batch
    value = LOSSES[name](
        torch.tensor(logits, dtype=torch.float32), torch.tensor(soft, dtype=torch.float32)
    )
    assert value.shape == ()
    assert value.item() == pytest.approx(NUMPY_REFERENCES[name](logits, soft), rel=1e-5)


def test_dice_is_global_over_the_batch():
    # per-image dice would average 0 and 1; the global sum counts the pixels together
    logits = torch.tensor([20.0, 20.0, 20.0, -20.0]).view(4, 1, 1, 1)
    target = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(4, 1, 1, 1)
    expected = 1 - (2 * 3 + 1) / (3 + 4 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_dice_penalises_false_positives_on_an_empty_batch():
    target = torch.zeros(2, 1, 8, 8)
    assert dice_loss(torch.full_like(target, 5.0), target) > 0.9
    assert dice_loss(torch.full_like(target, -20.0), target) < 1e-6


def test_focal_alpha_weights_the_classes(batch):
    logits, soft = (torch.tensor(a, dtype=torch.float32) for a in batch)
    plain = (
        soft - torch.sigmoid(logits)
    ).abs() ** 2 * torch.nn.functional.binary_cross_entropy_with_logits(
        logits, soft, reduction="none"
    )
    weighted = (plain * (0.25 * soft + 0.75 * (1 - soft))).mean()
    assert focal_loss(logits, soft, alpha=0.25).item() == pytest.approx(weighted.item(), rel=1e-6)
    assert focal_loss(logits, soft, gamma=0.0).item() == pytest.approx(
        LOSSES["bce"](logits, soft).item(), rel=1e-6
    )


def test_lovasz_equals_jaccard_loss_on_an_indicator_of_errors():
    # errors 1 - logit * sign are 1 on the mispredicted set M and 0 elsewhere, where the
    # Lovász extension equals the set function |M| / |G ∪ M|
    target = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1], dtype=torch.float32).view(1, 1, 2, 4)
    sign = 2 * target - 1
    mispredicted = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool).view(1, 1, 2, 4)
    logits = torch.where(mispredicted, torch.zeros_like(sign), sign)
    truth_or_errors = 4 + 2  # G has 4 pixels; M adds 2 negatives
    assert lovasz_hinge_loss(logits, target).item() == pytest.approx(3 / truth_or_errors)


@pytest.mark.parametrize("per_image", [False, True])
def test_lovasz_matches_the_reference_implementation(per_image):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 1, 6, 6, generator=generator)
    target = (torch.rand(4, 1, 6, 6, generator=generator) > 0.7).float()
    target[2] = 0  # an empty image
    expected = _lovasz_hinge(logits.squeeze(1), target.squeeze(1), per_image=per_image)
    actual = lovasz_hinge_loss(logits, target, per_image=per_image)
    assert actual.item() == pytest.approx(expected.item(), rel=1e-5)


def test_lovasz_thresholds_soft_targets_at_half():
    logits = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    hard = (torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    soft = torch.where(hard > 0, torch.full_like(hard, 0.75), torch.full_like(hard, 0.5))
    assert lovasz_hinge_loss(logits, soft).item() == pytest.approx(
        lovasz_hinge_loss(logits, hard).item()
    )


@pytest.mark.parametrize("name", NAMES)
def test_perfect_prediction_gives_minimal_loss(name):
    target = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)) > 0.6).float()
    perfect = (2 * target - 1) * 20
    wrong = -perfect
    loss = build_loss((LossTerm(name, 1.0),))
    assert loss(perfect, target).item() < 1e-3
    assert loss(wrong, target).item() > 0.4  # log(cosh(1)) = 0.43 is the most logcosh_dice gives


@pytest.mark.parametrize("name", ["bce", "focal"])
def test_soft_target_loss_is_stationary_at_the_target(name):
    target = torch.tensor([0.25, 0.5, 0.75, 1 / 3]).view(1, 1, 2, 2)
    logits = torch.logit(target).requires_grad_(True)
    LOSSES[name](logits, target).backward()
    assert logits.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow(name, batch):
    logits = torch.tensor(batch[0], dtype=torch.float32, requires_grad=True)
    target = torch.tensor(batch[1] > 0.5, dtype=torch.float32)
    build_loss((LossTerm(name, 1.0),))(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_weighted_sum_equals_sum_of_parts(batch):
    logits, soft = (torch.tensor(a, dtype=torch.float32) for a in batch)
    weights = (0.5, 2.0, 1.5, 0.25, 3.0)
    loss = build_loss(tuple(LossTerm(n, w) for n, w in zip(NAMES, weights)))
    expected = sum(w * LOSSES[n](logits, soft) for n, w in zip(NAMES, weights))
    assert loss(logits, soft).item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(loss.parts(logits, soft)) == set(NAMES)


def test_repeated_terms_keep_separate_parts(batch):
    logits, soft = (torch.tensor(a, dtype=torch.float32) for a in batch)
    loss = build_loss((LossTerm("bce", 1.0), LossTerm("bce", 2.0)))
    assert list(loss.parts(logits, soft)) == ["bce", "bce_2"]
    assert loss(logits, soft).item() == pytest.approx(
        3 * LOSSES["bce"](logits, soft).item(), rel=1e-6
    )


def test_computed_in_float32_under_autocast(batch):
    logits = torch.tensor(batch[0], dtype=torch.bfloat16)
    target = torch.tensor(batch[1], dtype=torch.bfloat16)
    loss = build_loss(tuple(LossTerm(n, 1.0) for n in NAMES))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits, target)
    assert value.dtype == torch.float32
    expected = loss(logits.float(), target.float())
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(EkError, match="did you mean dice") as error:
        build_loss((LossTerm("dcie", 1.0),))
    for name in NAMES:
        assert name in str(error.value)
    with pytest.raises(EkError):
        build_loss(())


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ"):
        build_loss((LossTerm("bce", 1.0),))(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_smooth_labels():
    target = torch.tensor([0.0, 1.0, 0.5])
    assert torch.allclose(smooth_labels(target, 0.1), torch.tensor([0.05, 0.95, 0.5]))
    assert smooth_labels(target, 0.0) is target
    with pytest.raises(EkError):
        smooth_labels(target, 1.0)
