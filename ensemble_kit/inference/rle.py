"""Kaggle run-length encoding of binary masks.

Pixels are numbered column-major and 1-indexed: pixel ``(r, c)`` of an ``(H, W)`` mask is
number ``c * H + r + 1``. An encoding is space-separated ``start length`` pairs with starts
ascending and runs neither overlapping nor touching; an empty mask is ``-``. Example: a
mask whose only positives are rows 0-2 of column 0 is ``1 3``.

Other competitions number pixels differently: ``order="row"`` numbers them left to right
then top to bottom (pixel ``(r, c)`` is ``r * W + c + base``) and ``base=0`` starts at 0.
:func:`decode`, :func:`encode` and :func:`parse_runs` take both; the defaults are the
contrail (and Severstal) convention above.

:func:`encode`, :func:`encode_batch` and :func:`decode` are vectorised numpy;
:func:`encode_reference` and :func:`decode_reference` are the plain per-pixel Python loops
they are tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..runlength import EMPTY, parse_runs

__all__ = [
    "EMPTY",
    "decode",
    "decode_reference",
    "encode",
    "encode_batch",
    "encode_reference",
    "parse_runs",
]


def _check_mask(mask: np.ndarray, ndim: int) -> np.ndarray:
    """``mask`` as a bool array; ValueError for a wrong rank or values other than 0/1."""
    mask = np.asarray(mask)
    if mask.ndim != ndim:
        raise ValueError(f"expected a {ndim}-D mask, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask
    binary = mask.astype(bool)
    if not np.array_equal(binary, mask):
        raise ValueError("mask has values other than 0 and 1; threshold it first")
    return binary


def _format_runs(starts: np.ndarray, ends: np.ndarray) -> str:
    """``start length`` text from 0-based column-major run starts and (exclusive) ends."""
    if starts.size == 0:
        return EMPTY
    runs = np.empty((starts.size, 2), dtype=np.int64)
    runs[:, 0] = starts + 1
    runs[:, 1] = ends - starts
    # str() of a list formats the ints in C, about twice as fast as joining map(str, ...).
    return str(runs.ravel().tolist())[1:-1].replace(",", "")


def _runs_dense(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs from one pass over every pixel; cost independent of the positive count."""
    height, width = mask.shape
    # The column-major pixels between a False on either side, so every run has both a
    # rising and a falling edge.
    padded = np.zeros(height * width + 2, dtype=bool)
    padded[1:-1].reshape(width, height)[...] = mask.T
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges[0::2], edges[1::2]


def _runs_sparse(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs from the sorted column-major indices of the positives; cost grows with them."""
    height, width = mask.shape
    rows, cols = np.divmod(np.flatnonzero(mask), width)
    index = cols * height + rows
    index.sort()
    breaks = np.flatnonzero(np.diff(index) != 1)
    starts = index[np.concatenate(([0], breaks + 1))]
    ends = index[np.concatenate((breaks, [index.size - 1]))] + 1
    return starts, ends


def _encode_bool(mask: np.ndarray) -> str:
    """:func:`encode` of a checked 2-D bool mask."""
    positives = np.count_nonzero(mask)
    if positives == 0:
        return EMPTY
    # Sorting the positives beats a full pass while they are a small fraction, as in
    # contrail masks (usually well under 5% of pixels).
    dense = positives > mask.size // 16
    return _format_runs(*(_runs_dense(mask) if dense else _runs_sparse(mask)))


def encode(mask: np.ndarray, order: str = "column", base: int = 1, empty: str = EMPTY) -> str:
    """Run-length encode one 2-D binary mask.

    Args:
        mask: ``(H, W)`` array of bool or 0/1 values.
        order: ``column`` (pixels numbered top to bottom, then left to right) or ``row``.
        base: Number of the first pixel: 1 or 0.
        empty: The text of an empty mask (``-`` for contrails, ``""`` for most others).

    Returns:
        The Kaggle RLE text, ``empty`` for an empty mask.

    Raises:
        ValueError: ``mask`` is not 2-D or has values other than 0 and 1.
    """
    mask = _check_mask(mask, 2)
    if order not in ("column", "row") or base not in (0, 1):
        raise ValueError(f"order must be column or row and base 0 or 1, got {order!r}, {base!r}")
    text = _encode_bool(mask.T if order == "row" else mask)
    if text == EMPTY:
        return empty
    if base == 0:
        numbers = np.array(text.split(), dtype=np.int64)
        numbers[0::2] -= 1
        return " ".join(map(str, numbers.tolist()))
    return text


def encode_batch(masks: np.ndarray) -> list[str]:
    """Run-length encode a batch of masks.

    Args:
        masks: ``(B, H, W)`` array of bool or 0/1 values.

    Returns:
        One RLE text per mask, in order (``-`` for empty masks).

    Raises:
        ValueError: ``masks`` is not 3-D or has values other than 0 and 1.
    """
    return [_encode_bool(mask) for mask in _check_mask(masks, 3)]


def decode(rle: str, shape: Sequence[int], order: str = "column", base: int = 1) -> np.ndarray:
    """Decode a Kaggle RLE into a mask.

    Args:
        rle: Kaggle RLE; ``-`` or an empty string for an empty mask.
        shape: ``(H, W)`` of the mask.
        order: ``column`` (pixels numbered top to bottom, then left to right) or ``row``
            (left to right, then top to bottom).
        base: Number of the first pixel: 1 or 0.

    Returns:
        A C-contiguous bool array of ``shape``.

    Raises:
        EkError: malformed RLE (odd count, non-integer, zero start or length, starts not
            ascending, overlapping or touching runs, a run past the image end).
    """
    if order not in ("column", "row"):
        raise ValueError(f"order must be 'column' or 'row', got {order!r}")
    if order == "row":  # row-major numbering of (H, W) is column-major numbering of (W, H)
        return decode(rle, (shape[1], shape[0]), "column", base).T.copy()
    starts, lengths = parse_runs(rle, shape, base)
    mask = np.zeros((int(shape[0]), int(shape[1])), dtype=bool)
    if starts.size:
        # Column-major index of every positive pixel: its run's start plus 0..length-1.
        run_offset = np.cumsum(lengths) - lengths
        index = np.repeat(starts - 1 - run_offset, lengths) + np.arange(
            run_offset[-1] + lengths[-1]
        )
        mask.T.flat[index] = True  # the transposed view's flat order is column-major
    return mask


def encode_reference(mask: np.ndarray) -> str:
    """Slow per-pixel Python loop equivalent of :func:`encode` (for tests and benchmarks)."""
    height, width = np.shape(mask)
    pixels = np.asarray(mask).T.ravel().tolist()  # column-major
    numbers, start = [], None
    for index, value in enumerate(pixels + [0]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            numbers += [start + 1, index - start]
            start = None
    return " ".join(map(str, numbers)) if numbers else EMPTY


def decode_reference(rle: str, shape: Sequence[int]) -> np.ndarray:
    """Slow per-pixel Python loop equivalent of :func:`decode`, for valid input only."""
    height, width = shape
    pixels = [False] * (height * width)
    numbers = [int(token) for token in rle.split() if token != EMPTY]
    for start, length in zip(numbers[0::2], numbers[1::2]):
        for index in range(start - 1, start - 1 + length):
            pixels[index] = True
    return np.array(pixels, dtype=bool).reshape(width, height).T.copy()
