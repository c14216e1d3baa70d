"""The geometry shared by training and prediction: the dihedral group and the half-pixel shift.

Labels sit half a pixel down-right of the imagery, so every flip or rotation except the
identity and the transpose moves the label a pixel relative to the image.
:func:`shift_label` resamples a label by a sub-pixel shift; ``shift_label(target)`` centres
the label on the image grid (``LabelSpec.shift_correct``), after which flips are exact, and
``shift_label(pred, 0.5, 0.5)`` puts a prediction back on the label grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import EkError
from .registry import TTA_NAMES, did_you_mean

DIHEDRAL = TTA_NAMES  # identity, hflip, vflip, hvflip, transpose, rot90, rot270, antitranspose
_INVERSE = {"rot90": "rot270", "rot270": "rot90"}  # every other element is its own inverse


def dihedral(x: torch.Tensor, name: str) -> torch.Tensor:
    """One of the eight flips/rotations of the last two dims (rows, columns).

    ``hflip`` reverses columns, ``vflip`` rows, ``rot90`` turns counter-clockwise like
    ``np.rot90``, ``antitranspose`` mirrors about the anti-diagonal.
    """
    if name == "identity":
        return x
    if name == "hflip":
        return x.flip(-1)
    if name == "vflip":
        return x.flip(-2)
    if name == "hvflip":
        return x.flip(-2, -1)
    if name == "transpose":
        return x.transpose(-2, -1)
    if name == "rot90":
        return torch.rot90(x, 1, dims=(-2, -1))
    if name == "rot270":
        return torch.rot90(x, 3, dims=(-2, -1))
    if name == "antitranspose":
        return x.flip(-2, -1).transpose(-2, -1)
    raise EkError(f"unknown flip/rotation '{name}'{did_you_mean(name, DIHEDRAL)}")


def dihedral_inverse(x: torch.Tensor, name: str) -> torch.Tensor:
    """Undo :func:`dihedral`: ``dihedral_inverse(dihedral(x, n), n)`` equals ``x``."""
    return dihedral(x, _INVERSE.get(name, name))


def shift_label(target: torch.Tensor, dx: float = -0.5, dy: float = -0.5) -> torch.Tensor:
    """Move the content of ``(B, C, H, W)`` maps by ``(dx, dy)`` pixels, bilinearly.

    ``out[y, x] = in[y - dy, x - dx]`` with border padding. The default moves a label half a
    pixel up-left onto the image grid; ``(0.5, 0.5)`` moves a prediction back. The pair is
    a 2×2 blur, not an exact inverse.
    """
    batch, _, height, width = target.shape
    theta = torch.zeros(batch, 2, 3, dtype=torch.float32, device=target.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * dx / width  # normalised coordinates span 2 units per side
    theta[:, 1, 2] = -2.0 * dy / height
    grid = F.affine_grid(theta, list(target.shape), align_corners=False)
    shifted = F.grid_sample(
        target.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return shifted.to(target.dtype)
