"""Numpy reference of the eight dihedral transforms, shared by the augment and TTA tests."""

import numpy as np


def antitranspose(a: np.ndarray) -> np.ndarray:
    """Mirror about the anti-diagonal, by index: out[i, j] = a[rows-1-j, cols-1-i]."""
    rows, cols = a.shape[-2:]
    i, j = np.meshgrid(np.arange(cols), np.arange(rows), indexing="ij")
    return a[..., rows - 1 - j, cols - 1 - i]


NUMPY_DIHEDRAL = {
    "identity": lambda a: a,
    "hflip": lambda a: np.flip(a, -1),
    "vflip": lambda a: np.flip(a, -2),
    "hvflip": lambda a: np.flip(a, (-2, -1)),
    "transpose": lambda a: np.swapaxes(a, -1, -2),
    "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
    "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1)),
    "antitranspose": antitranspose,
}
