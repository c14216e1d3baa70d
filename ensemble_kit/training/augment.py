"""Batch augmentations on tensors.

:class:`Augmenter` transforms a whole batch where it lives (CPU or GPU) with one call:
every random number is drawn on the CPU from a ``torch.Generator`` (so a seed gives the same
batch on any device), and each operation picks its samples with masks and ``torch.where``
instead of a Python loop over the batch. Geometric transforms move images and targets
together; cutout touches only images; cutmix and mixup mix both with another sample of the
batch. Images and targets must be floating point. The dihedral group and the half-pixel
label shift live in :mod:`ensemble_kit.geometry`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AugmentSpec
from ..errors import EkError

PROBABILITIES = ("hflip", "vflip", "rot90", "cutmix", "mixup", "cutout")


class Augmenter:
    """Random batch augmentations from an :class:`AugmentSpec`, in a fixed order.

    Order: a training crop (``crop: [h, w]``), hflip, vflip, rot90 (square inputs only),
    random resized crop (``crop`` a probability), cutmix, mixup, cutout. Each probability
    applies per sample.
    """

    def __init__(self, spec: AugmentSpec):
        _check_spec(spec)
        self.spec = spec

    @property
    def crop_size(self) -> tuple[int, int] | None:
        """``(h, w)`` of the training crops (``augment.crop: [h, w]``), else None."""
        return self.spec.crop if isinstance(self.spec.crop, tuple) else None

    @property
    def resized_crop(self) -> float:
        """Probability of a random resized crop (``augment.crop`` as a number)."""
        return 0.0 if isinstance(self.spec.crop, tuple) else float(self.spec.crop)

    @property
    def enabled(self) -> bool:
        """False when every probability is 0 and no crop size is set (``__call__`` is then
        the identity)."""
        probabilities = [getattr(self.spec, name) for name in PROBABILITIES]
        return self.crop_size is not None or max(probabilities + [self.resized_crop]) > 0

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch: images ``(B, C, H, W)``, targets ``(B, 1, H, W)``."""
        if not self.enabled:
            return images, targets
        if generator.device.type != "cpu":
            raise ValueError("the augmentation generator must live on the CPU")
        spec, draw = self.spec, _Draw(generator, images.shape[0], images.device)
        if self.crop_size is not None:
            images, targets = training_crop(images, targets, self.crop_size, spec.crop_masked, draw)
        if spec.hflip > 0:
            images, targets = _flip(images, targets, draw.chosen(spec.hflip), dim=-1)
        if spec.vflip > 0:
            images, targets = _flip(images, targets, draw.chosen(spec.vflip), dim=-2)
        if spec.rot90 > 0 and images.shape[-2] == images.shape[-1]:
            images, targets = _rot90(images, targets, draw.quarter_turns(spec.rot90))
        if self.resized_crop > 0:
            chosen = draw.chosen(self.resized_crop)
            images, targets = _crop(images, targets, chosen, draw, spec.crop_scale)
        if spec.cutmix > 0 and images.shape[0] > 1:
            images, targets = _cutmix(images, targets, draw.chosen(spec.cutmix), draw)
        if spec.mixup > 0 and images.shape[0] > 1:
            images, targets = _mixup(
                images, targets, draw.chosen(spec.mixup), draw, spec.mixup_alpha
            )
        if spec.cutout > 0:
            images = _cutout(images, draw.chosen(spec.cutout), draw, spec)
        return images, targets


def _check_spec(spec: AugmentSpec) -> None:
    for name in PROBABILITIES + ("crop_masked",):
        if not 0.0 <= getattr(spec, name) <= 1.0:
            raise EkError(f"augment.{name} is a probability in [0, 1], got {getattr(spec, name)}")
    crop = spec.crop
    if (
        isinstance(crop, tuple)
        and min(crop) < 1
        or not isinstance(crop, tuple)
        and not 0 <= crop <= 1
    ):
        raise EkError(f"augment.crop is a probability in [0, 1] or a size [h, w], got {crop}")
    low, high = spec.crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise EkError(f"augment.crop_scale needs 0 < low <= high <= 1, got {spec.crop_scale}")
    if spec.mixup > 0 and spec.mixup_alpha <= 0:
        raise EkError(f"augment.mixup_alpha must be positive, got {spec.mixup_alpha}")
    if spec.cutout > 0 and (spec.cutout_holes < 1 or not 0.0 < spec.cutout_size <= 1.0):
        raise EkError("augment.cutout needs cutout_holes >= 1 and 0 < cutout_size <= 1")


class _Draw:
    """Random numbers for one batch, drawn on the CPU generator and moved to the device."""

    def __init__(self, generator: torch.Generator, batch: int, device: torch.device):
        self.generator, self.batch, self.device = generator, batch, device

    def uniform(self, *shape: int) -> torch.Tensor:
        values = torch.rand((self.batch, *shape), generator=self.generator)
        return values.to(self.device)

    def chosen(self, probability: float) -> torch.Tensor:
        """``(B,)`` bool: which samples get the augmentation."""
        return self.uniform() < probability

    def quarter_turns(self, probability: float) -> torch.Tensor:
        """``(B,)`` counter-clockwise quarter turns: 0, or 1-3 with ``probability``."""
        turns = torch.randint(1, 4, (self.batch,), generator=self.generator).to(self.device)
        return torch.where(self.chosen(probability), turns, torch.zeros_like(turns))

    def partners(self) -> torch.Tensor:
        """``(B,)`` index of another sample of the batch for each sample (needs B > 1)."""
        offset = torch.randint(1, self.batch, (self.batch,), generator=self.generator)
        return ((torch.arange(self.batch) + offset) % self.batch).to(self.device)

    def beta(self, alpha: float) -> torch.Tensor:
        """``(B,)`` Beta(alpha, alpha) draws; torch's Beta takes no generator, numpy's does."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        values = np.random.default_rng(seed).beta(alpha, alpha, size=self.batch)
        return torch.as_tensor(values, dtype=torch.float32).to(self.device)


def _per_sample(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1)


def _flip(images, targets, chosen, dim):
    where = _per_sample(chosen)
    return torch.where(where, images.flip(dim), images), torch.where(
        where, targets.flip(dim), targets
    )


def _rot90(images, targets, turns):
    rotated_images, rotated_targets = images, targets
    for k in (1, 2, 3):
        where = _per_sample(turns == k)
        rotated_images = torch.where(where, torch.rot90(images, k, dims=(-2, -1)), rotated_images)
        rotated_targets = torch.where(
            where, torch.rot90(targets, k, dims=(-2, -1)), rotated_targets
        )
    return rotated_images, rotated_targets


def training_crop(images, targets, size: tuple[int, int], masked: float, draw):
    """A random ``h x w`` window of each sample (the same for its image and target); with
    probability ``masked`` per sample the window is centred, as far as the borders allow, on
    a random masked pixel of its target (when it has one).

    Raises:
        EkError: The crop is larger than the images.
    """
    height, width = images.shape[-2], images.shape[-1]
    crop_h, crop_w = size
    if crop_h > height or crop_w > width:
        raise EkError(
            f"augment.crop {[crop_h, crop_w]} is larger than the images ({height}x{width})"
        )
    top = (draw.uniform().cpu() * (height - crop_h + 1)).long().clamp_(max=height - crop_h)
    left = (draw.uniform().cpu() * (width - crop_w + 1)).long().clamp_(max=width - crop_w)
    if masked > 0:
        centred = draw.chosen(masked).cpu()
        pick = draw.uniform().cpu()
        for b in torch.nonzero(centred).flatten().tolist():
            rows, cols = torch.nonzero(targets[b].amax(dim=0) > 0, as_tuple=True)
            if len(rows):
                k = min(int(pick[b] * len(rows)), len(rows) - 1)
                top[b] = int(rows[k]) - crop_h // 2
                left[b] = int(cols[k]) - crop_w // 2
        top.clamp_(0, height - crop_h)
        left.clamp_(0, width - crop_w)
    return _window(images, top, left, size), _window(targets, top, left, size)


def _window(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size) -> torch.Tensor:
    """``x[b, :, top[b]:top[b]+h, left[b]:left[b]+w]`` of every sample ``b``, stacked."""
    rows = top.to(x.device)[:, None] + torch.arange(size[0], device=x.device)
    cols = left.to(x.device)[:, None] + torch.arange(size[1], device=x.device)
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _crop(images, targets, chosen, draw, scale):
    """Random resized crop: a square box of area fraction U(scale) resized back to H×W."""
    low, high = scale
    side = (low + (high - low) * draw.uniform()).sqrt()  # fraction of each side
    corner = draw.uniform(2) * (1.0 - side[:, None])  # top-left (x, y) as fractions
    theta = torch.zeros(images.shape[0], 2, 3, dtype=torch.float32, device=images.device)
    theta[:, 0, 0] = side
    theta[:, 1, 1] = side
    theta[:, :, 2] = 2.0 * corner + side[:, None] - 1.0  # box centre in [-1, 1]
    where = _per_sample(chosen)
    return (
        torch.where(where, _resample(images, theta), images),
        torch.where(where, _resample(targets, theta), targets),
    )


def _resample(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", align_corners=False)


def _boxes(draw, height, width, side, inside):
    """``(B, 1, H, W)`` bool masks of axis-aligned square boxes, the union over holes.

    ``side`` is ``(B, holes)`` box sides as fractions of each image side. Box centres are
    uniform over the image (boxes clipped at the edges) or, with ``inside``, over the
    positions that keep the whole box in the image.
    """
    low = side / 2 if inside else torch.zeros_like(side)
    centre = low[..., None] + draw.uniform(side.shape[1], 2) * (1 - 2 * low[..., None])
    rows = torch.arange(height, device=side.device).view(1, 1, -1, 1) + 0.5
    cols = torch.arange(width, device=side.device).view(1, 1, 1, -1) + 0.5
    half_h, half_w = (side * height / 2)[..., None, None], (side * width / 2)[..., None, None]
    centre_y = (centre[..., 1] * height)[..., None, None]
    centre_x = (centre[..., 0] * width)[..., None, None]
    inside_box = ((rows - centre_y).abs() < half_h) & ((cols - centre_x).abs() < half_w)
    return inside_box.any(dim=1, keepdim=True)


def _cutmix(images, targets, chosen, draw):
    """Paste a box from another sample into image and target.

    The box lies inside the image with area fraction U(0, 1) (at least 2×2 pixels).
    """
    height, width = images.shape[-2:]
    partner = draw.partners()
    side = draw.uniform(1).sqrt().clamp_min(min(1.0, 2.0 / min(height, width)))
    box = _boxes(draw, height, width, side, inside=True) & _per_sample(chosen)
    return (
        torch.where(box, images[partner], images),
        torch.where(box, targets[partner], targets),
    )


def _mixup(images, targets, chosen, draw, alpha):
    """Convex mix ``λ·x + (1 − λ)·x_other`` of images and targets, ``λ ~ Beta(α, α)``."""
    partner = draw.partners()
    weight = _per_sample(draw.beta(alpha))
    where = _per_sample(chosen)
    mixed_images = torch.lerp(images[partner], images, weight.to(images.dtype))
    mixed_targets = torch.lerp(targets[partner], targets, weight.to(targets.dtype))
    return torch.where(where, mixed_images, images), torch.where(where, mixed_targets, targets)


def _cutout(images, chosen, draw, spec):
    """Zero ``cutout_holes`` square holes of side ``cutout_size`` (fraction) in the image only."""
    side = torch.full((images.shape[0], spec.cutout_holes), spec.cutout_size, device=images.device)
    holes = _boxes(draw, images.shape[-2], images.shape[-1], side, inside=False) & _per_sample(
        chosen
    )
    return images.masked_fill(holes, 0.0)
