"""Segmentation losses looked up by name and combined as a weighted sum.

Every term takes logits ``(B, 1, H, W)`` and a float target of the same shape in [0, 1]
(soft labels allowed) and returns a scalar. With ``p = sigmoid(logits)`` and ``t`` the
target:

- ``dice``: ``1 - (2 Σ p·t + 1) / (Σ p + Σ t + 1)``, one sum over every pixel of the batch
  (global, like the competition metric). An all-empty batch still penalises false positives
  (smp's ``DiceLoss`` would give it zero loss, which is why it is not used).
- ``bce``: mean binary cross-entropy with logits.
- ``focal``: mean of ``α_t · |t - p|^γ · BCE`` with ``γ = 2``; ``|t - p|`` equals the usual
  ``1 - p_t`` on hard targets and reaches zero at ``p = t`` on soft ones (the "quality focal"
  form). ``α_t = α·t + (1 - α)(1 - t)`` when ``α`` is given; by name, ``α`` is off.
- ``logcosh_dice``: ``log(cosh(dice))``.
- ``lovasz``: Lovász hinge over the whole batch as one set of pixels (global, matching the
  metric), on the hard target ``t > 0.5`` (the aggregated label's "more than half of the
  annotators" rule, so soft and smoothed labels threshold back to their majority label).

All terms are computed in float32, even under autocast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LossTerm
from ..errors import EkError
from ..registry import LOSSES

DICE_SMOOTH = 1.0
FOCAL_GAMMA = 2.0

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH
) -> torch.Tensor:
    """Soft dice loss over the whole batch: ``1 - (2 Σpt + s) / (Σp + Σt + s)``."""
    prob = torch.sigmoid(logits)
    intersection = (prob * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (prob.sum() + target.sum() + smooth)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits (soft targets allowed)."""
    return F.binary_cross_entropy_with_logits(logits, target)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = FOCAL_GAMMA,
    alpha: float | None = None,
) -> torch.Tensor:
    """Focal loss ``mean(α_t · |t - p|^γ · BCE)``, well defined on soft targets.

    Args:
        logits: raw model outputs.
        target: labels in [0, 1], same shape.
        gamma: focusing power; 0 gives plain BCE.
        alpha: weight of the positive class in [0, 1]; ``None`` weighs both classes 1.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = (target - torch.sigmoid(logits)).abs().pow(gamma) * bce
    if alpha is not None:
        loss = loss * (alpha * target + (1.0 - alpha) * (1.0 - target))
    return loss.mean()


def logcosh_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log(cosh(dice_loss))``: dice with a smoother, smaller gradient near zero loss."""
    return torch.log(torch.cosh(dice_loss(logits, target)))


def lovasz_hinge_loss(
    logits: torch.Tensor, target: torch.Tensor, per_image: bool = False
) -> torch.Tensor:
    """Lovász hinge (Berman et al. 2018) on the hard target ``target > 0.5``.

    Args:
        logits: raw model outputs ``(B, ...)``.
        target: labels in [0, 1]; thresholded at 0.5.
        per_image: mean of one loss per image instead of one loss over the batch.
    """
    rows = logits.shape[0] if per_image else 1
    scores = logits.reshape(rows, -1)
    labels = (target > 0.5).reshape(rows, -1).to(scores.dtype)
    errors = 1.0 - scores * (2.0 * labels - 1.0)
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    labels_sorted = torch.gather(labels, 1, order)
    return (F.relu(errors_sorted) * _lovasz_grad(labels_sorted)).sum(dim=1).mean()


def _lovasz_grad(labels_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Jaccard loss's Lovász extension at sorted errors, row by row."""
    positives = labels_sorted.sum(dim=1, keepdim=True)
    intersection = positives - labels_sorted.cumsum(dim=1)
    union = positives + (1.0 - labels_sorted).cumsum(dim=1)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


for _name, _function in (
    ("dice", dice_loss),
    ("bce", bce_loss),
    ("focal", focal_loss),
    ("logcosh_dice", logcosh_dice_loss),
    ("lovasz", lovasz_hinge_loss),
):
    LOSSES.register(_name)(_function)


class WeightedLoss(nn.Module):
    """Weighted sum of named loss terms, computed in float32."""

    def __init__(self, terms: tuple[LossTerm, ...]):
        super().__init__()
        self.terms = tuple(terms)

    def parts(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term's unweighted value, keyed by name (``name_2`` for a repeated name)."""
        if logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ"
            )
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, target = logits.float(), target.float()
            values: dict[str, torch.Tensor] = {}
            for term in self.terms:
                key = _unique_key(term.name, values)
                values[key] = LOSSES.get(term.name)(logits, target)
        return values

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        values = self.parts(logits, target).values()
        weighted = [term.weight * value for term, value in zip(self.terms, values)]
        return torch.stack(weighted).sum()

    def extra_repr(self) -> str:
        return " + ".join(f"{term.weight:g}*{term.name}" for term in self.terms)


def _unique_key(name: str, taken: dict) -> str:
    key, count = name, 1
    while key in taken:
        count += 1
        key = f"{name}_{count}"
    return key


def build_loss(terms: tuple[LossTerm, ...]) -> WeightedLoss:
    """The weighted sum of ``terms``; an unknown name is an :class:`EkError`.

    Example:
        >>> loss = build_loss((LossTerm("dice", 1.0), LossTerm("bce", 0.5)))
    """
    if not terms:
        raise EkError("a loss needs at least one term")
    for term in terms:
        LOSSES.check(term.name)
    return WeightedLoss(terms)


def smooth_labels(target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing towards 0.5: ``y * (1 - s) + s / 2``; ``s = 0`` returns ``target``."""
    if not 0.0 <= smoothing < 1.0:
        raise EkError(f"label smoothing must be in [0, 1), got {smoothing}")
    if smoothing == 0.0:
        return target
    return target * (1.0 - smoothing) + smoothing / 2.0
