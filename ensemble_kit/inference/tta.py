"""Test-time augmentation (TTA) shared by out-of-fold and submission predictions.

``predict_probs`` runs every model on every dihedral copy of a batch, undoes each
transform on the logits, merges the copies (mean of probabilities or mean of logits) and
averages the models. Copies are concatenated along the batch dimension, ``chunk`` at a
time; ``chunk=0`` applies a fixed rule (:func:`auto_chunk`): all copies in one batch on a
GPU, one copy at a time on CPU.

Transforms act on the last two dims ``(H, W)``, named as in numpy:
``hflip`` = ``np.flip(x, -1)``, ``vflip`` = ``np.flip(x, -2)``, ``hvflip`` = both,
``transpose`` = swap H and W, ``rot90`` = ``np.rot90(x, 1, axes=(-2, -1))`` (counter-
clockwise), ``rot270`` = ``np.rot90(x, 3, ...)``, ``antitranspose`` = transpose about the
anti-diagonal. Only ``identity`` and ``transpose`` keep the labels' +0.5 px offset.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..config import Config, tta_list
from ..errors import EkError
from ..geometry import dihedral, dihedral_inverse, shift_label
from ..registry import TTA, TTA_MERGES, TTA_NAMES
from ..runtime import amp_dtype, inference_dtype

log = logging.getLogger(__name__)

SWAPS_AXES = frozenset({"transpose", "rot90", "rot270", "antitranspose"})
# a merge: (map each copy's logits into the averaging space, map the mean to probabilities)
TTA_MERGES.register("mean")((torch.sigmoid, lambda mean: mean))
TTA_MERGES.register("logit")((lambda logits: logits, torch.sigmoid))


def tta_transform(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the dihedral transform ``name`` to the last two dims of ``x``."""
    return dihedral(x, _check_name(name))


def tta_inverse(x: torch.Tensor, name: str) -> torch.Tensor:
    """Undo :func:`tta_transform`: ``tta_inverse(tta_transform(x, n), n) == x``."""
    return dihedral_inverse(x, _check_name(name))


def predict_probs(
    models: Sequence[nn.Module],
    images: torch.Tensor,
    tta: Sequence[str] = ("identity",),
    merge: str = "mean",
    chunk: int = 0,
    amp: str | None = None,
) -> torch.Tensor:
    """Probabilities ``(B, 1, H, W)``: the mean over models of each one's TTA-merged output.

    Args:
        models: segmentation models returning logits ``(B, 1, H, W)``; each is run in eval
            mode and left in the mode it had.
        images: ``(B, C, H, W)``, moved to each model's device and dtype.
        tta: transform names (see the module docstring); ``d4`` stands for all eight.
        merge: ``mean`` of sigmoid probabilities, or ``logit`` (sigmoid of the mean logit).
        chunk: transformed copies per forward pass; 0 picks by :func:`auto_chunk`.
        amp: None keeps the caller's autocast; ``auto`` (bf16 on CUDA, off on CPU),
            ``bf16``, ``fp16`` or ``none`` set it.

    Returns:
        float32 probabilities on ``images``' device.
    """
    names = _expand(tta)
    TTA_MERGES.check(merge)
    if chunk < 0:
        raise EkError(f"tta_chunk must be 0 (automatic) or positive, got {chunk}")
    if not models:
        raise EkError("predict_probs needs at least one model")
    probs = (_model_probs(m, images, names, merge, chunk, amp).to(images.device) for m in models)
    total = next(probs)
    for more in probs:
        total = total + more
    return total / len(models)


class NonFiniteLogits(EkError):
    """A model gave inf or NaN logits under fp16 autocast (bf16-trained weights can overflow)."""


def predict_inputs(
    models: Sequence[nn.Module],
    config: Config,
    x: torch.Tensor,
    precision: str = "auto",
    chunk: int | None = None,
) -> np.ndarray:
    """Probabilities ``(B, H, W)`` (``(B, C, H, W)`` for several classes) of float inputs on
    the models' device: the config's TTA and merge, mean over models, the half-pixel
    correction undone — the one path OOF and submission share.

    Args:
        models: The fold models.
        config: Their config (TTA, merge, chunk, label shift).
        x: Float inputs ``(B, C, H, W)``.
        precision: ``auto`` (from the device: fp32 on CPU, fp16 below sm80, bf16 from sm80
            on), ``fp32``, ``fp16`` or ``bf16`` (:func:`ensemble_kit.runtime.choose_precision`).
            A batch whose fp16 logits hold inf or NaN is redone in fp32, with a warning.
        chunk: TTA copies per forward pass (default: the config's ``tta_chunk``).
    """
    dtype = inference_dtype(precision, x.device)
    try:
        probs = _predict_at(models, config, x, dtype, chunk)
    except NonFiniteLogits:
        log.warning("fp16 gave inf/NaN logits on a batch of %d records; redone in fp32", len(x))
        probs = _predict_at(models, config, x, None, chunk)
    if config.label.shift_correct:
        probs = shift_label(probs, 0.5, 0.5)
    return (probs[:, 0] if probs.shape[1] == 1 else probs).cpu().numpy()


def _predict_at(
    models: Sequence[nn.Module],
    config: Config,
    x: torch.Tensor,
    dtype: torch.dtype | None,
    chunk: int | None,
) -> torch.Tensor:
    size = config.tta_chunk if chunk is None else chunk
    with _autocast_dtype(x.device, dtype):
        return predict_probs(models, x, tta_list(config), config.tta_merge, size).float()


def auto_chunk(model: nn.Module, x: torch.Tensor, copies: int) -> int:
    """Copies per forward pass, by a fixed rule so that predictions are reproducible.

    All copies in one pass on an accelerator; one copy at a time on CPU, where batching the
    copies of 4 x 9 x 256^2 inputs ran 0.64x (2.3M-parameter U-Net) and 0.79x (resnet18) as
    fast as one pass per flip on an idle 2-core machine. A timing probe was tried and
    dropped: OOF must not depend on the machine's load.
    """
    if copies <= 1 or x.device.type == "cpu":
        return 1
    return copies


def _model_probs(
    model: nn.Module,
    images: torch.Tensor,
    names: tuple[str, ...],
    merge: str,
    chunk: int,
    amp: str | None,
) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else images.device
    x = images.to(device=device, dtype=param.dtype if param is not None else images.dtype)
    square = x.shape[-1] == x.shape[-2]
    to_mean, to_probs = TTA_MERGES.get(merge)
    with torch.inference_mode(), _autocast(device, amp), _eval_mode(model):
        size = chunk or auto_chunk(model, x, max(len(g) for g in _groups(names, square)))
        total = None
        for logits in _run_copies(model, x, names, size, square):
            part = to_mean(logits)
            total = part if total is None else total + part
    assert total is not None  # _expand refuses an empty TTA list
    return to_probs(total / len(names))


def _run_copies(
    model: nn.Module, x: torch.Tensor, names: tuple[str, ...], size: int, square: bool
) -> Iterator[torch.Tensor]:
    """Yield each copy's float32 logits, back in x's orientation; ``size`` copies per pass."""
    for group in _groups(names, square):
        for start in range(0, len(group), size):
            part = group[start : start + size]
            batch = (
                torch.cat([tta_transform(x, name) for name in part])
                if len(part) > 1
                else tta_transform(x, part[0])
            )
            raw = model(batch)
            if raw.dtype == torch.float16 and not bool(torch.isfinite(raw).all()):
                raise NonFiniteLogits("fp16 logits hold inf or NaN; predict with precision fp32")
            for name, logits in zip(part, raw.float().split(len(x))):
                yield tta_inverse(logits, name)


def _groups(names: tuple[str, ...], square: bool) -> list[tuple[str, ...]]:
    """Copies that can share a batch: all, or for non-square inputs those of equal shape."""
    if square:
        return [names]
    kept = tuple(n for n in names if n not in SWAPS_AXES)
    swapped = tuple(n for n in names if n in SWAPS_AXES)
    return [g for g in (kept, swapped) if g]


def _expand(tta: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tta, str):
        tta = (tta,)
    names = tuple(n for name in tta for n in (TTA_NAMES if name == "d4" else (name,)))
    if not names:
        raise EkError("tta needs at least one transform (identity for none)")
    return tuple(_check_name(name) for name in names)


def _check_name(name: str) -> str:
    return TTA.check(name)


def _autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return _autocast_dtype(device, amp_dtype(amp, device))


def _autocast_dtype(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype``, or autocast off (also inside a caller's autocast) for None.

    Off is spelled without a dtype: torch 2.0 refuses ``torch.autocast("cpu",
    dtype=torch.float32, enabled=False)`` ("AutocastCPU only support Bfloat16").
    """
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
