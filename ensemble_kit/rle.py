"""Kaggle run-length encoding of binary masks.

Pixels are numbered column-major and 1-indexed: pixel ``(r, c)`` of an ``(H, W)`` mask is
number ``c * H + r + 1``. An encoding is space-separated ``start length`` pairs with starts
ascending and runs neither overlapping nor touching; an empty mask is ``-``. Example: a
mask whose only positives are rows 0-2 of column 0 is ``1 3``.

:func:`encode`, :func:`encode_batch` and :func:`decode` are vectorised numpy;
:func:`encode_reference` and :func:`decode_reference` are the plain per-pixel Python loops
they are tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import EkError

EMPTY = "-"


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


def _format_runs(edges: np.ndarray) -> str:
    """``start length`` text from 0-based run edges ``[begin0, end0, begin1, end1, ...]``."""
    if edges.size == 0:
        return EMPTY
    runs = edges.reshape(-1, 2).copy()
    runs[:, 1] -= runs[:, 0]
    runs[:, 0] += 1
    return " ".join(map(str, runs.ravel().tolist()))


def encode(mask: np.ndarray) -> str:
    """Run-length encode one 2-D binary mask.

    Args:
        mask: ``(H, W)`` array of bool or 0/1 values.

    Returns:
        The Kaggle RLE text, ``-`` for an empty mask.

    Raises:
        ValueError: ``mask`` is not 2-D or has values other than 0 and 1.
    """
    mask = _check_mask(mask, 2)
    if not mask.any():
        return EMPTY
    height, width = mask.shape
    # One copy: the column-major pixels between a False on either side, so every run
    # has both a rising and a falling edge.
    padded = np.zeros(height * width + 2, dtype=bool)
    padded[1:-1].reshape(width, height)[...] = mask.T
    return _format_runs(np.flatnonzero(padded[1:] != padded[:-1]))


def encode_batch(masks: np.ndarray) -> list[str]:
    """Run-length encode a batch of masks at once.

    Args:
        masks: ``(B, H, W)`` array of bool or 0/1 values.

    Returns:
        One RLE text per mask, in order (``-`` for empty masks).

    Raises:
        ValueError: ``masks`` is not 3-D or has values other than 0 and 1.
    """
    masks = _check_mask(masks, 3)
    batch, height, width = masks.shape
    pixels = height * width
    # Each mask's column-major pixels followed by one False, after a leading False, so
    # runs never join across masks and a single edge search covers the whole batch.
    padded = np.zeros(1 + batch * (pixels + 1), dtype=bool)
    rows = padded[1:].reshape(batch, pixels + 1)
    rows[:, :pixels].reshape(batch, width, height)[...] = masks.transpose(0, 2, 1)
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    owner = edges // (pixels + 1)
    bounds = np.searchsorted(owner, np.arange(batch + 1))
    local = edges - owner * (pixels + 1)
    return [_format_runs(local[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _pixel_count(shape: Sequence[int]) -> int:
    """Pixels of a 2-D ``shape``; ValueError for anything else."""
    if len(shape) != 2 or any(int(side) < 0 for side in shape):
        raise ValueError(f"expected a 2-D shape (H, W), got {tuple(shape)}")
    return int(shape[0]) * int(shape[1])


def _parse_numbers(tokens: list[str]) -> np.ndarray:
    """The tokens as int64; EkError naming the first one that is not a positive integer."""
    joined = "".join(tokens)
    if not (joined.isascii() and joined.isdigit()):
        bad = next(t for t in tokens if not (t.isascii() and t.isdigit()))
        raise EkError(f"RLE token {bad[:30]!r} is not a positive integer")
    try:
        return np.array(tokens, dtype=np.int64)
    except OverflowError:
        raise EkError("RLE has a number too large for any image") from None


def _check_runs(starts: np.ndarray, lengths: np.ndarray, pixels: int) -> None:
    """EkError for zero starts or lengths, unordered/overlapping/touching runs, overruns."""
    for name, values in (("start", starts), ("length", lengths)):
        if values.size and values.min() < 1:
            pair = int(np.argmax(values < 1)) + 1
            raise EkError(f"RLE pair {pair} has {name} 0 (starts and lengths are >= 1)")
    ends = starts + lengths  # 1-indexed, one past the run
    gaps = starts[1:] - ends[:-1]
    if gaps.size and gaps.min() <= 0:
        i = int(np.argmax(gaps <= 0))
        a, b = f"{starts[i]} {lengths[i]}", f"{starts[i + 1]} {lengths[i + 1]}"
        if starts[i + 1] <= starts[i]:
            problem = "starts are not ascending"
        elif gaps[i] < 0:
            problem = "runs overlap"
        else:
            problem = "runs touch (they should be one run)"
        raise EkError(f"RLE pairs {i + 1} and {i + 2} ({a!r}, {b!r}): {problem}")
    if ends.size and ends[-1] - 1 > pixels:
        raise EkError(
            f"RLE run '{starts[-1]} {lengths[-1]}' ends at pixel {ends[-1] - 1}, "
            f"past the image end ({pixels} pixels)"
        )


def parse_runs(rle: str, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Validate an RLE text and return its runs.

    Args:
        rle: Kaggle RLE; ``-``, an empty string or only whitespace mean an empty mask.
            Any whitespace may separate the numbers.
        shape: ``(H, W)`` of the mask the RLE describes.

    Returns:
        ``(starts, lengths)`` as int64 arrays, starts 1-indexed column-major.

    Raises:
        EkError: the text is not a valid RLE for ``shape``, with a one-line reason.
    """
    pixels = _pixel_count(shape)
    if not isinstance(rle, str):
        raise EkError(f"RLE must be a string, got {type(rle).__name__} {rle!r}")
    tokens = rle.split()
    if not tokens or tokens == [EMPTY]:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    if len(tokens) % 2:
        raise EkError(
            f"RLE has an odd number of values ({len(tokens)}); expected start/length pairs"
        )
    numbers = _parse_numbers(tokens)
    starts, lengths = numbers[0::2], numbers[1::2]
    _check_runs(starts, lengths, pixels)
    return starts, lengths


def decode(rle: str, shape: Sequence[int]) -> np.ndarray:
    """Decode a Kaggle RLE into a mask.

    Args:
        rle: Kaggle RLE; ``-`` or an empty string for an empty mask.
        shape: ``(H, W)`` of the mask.

    Returns:
        A C-contiguous bool array of ``shape``.

    Raises:
        EkError: malformed RLE (odd count, non-integer, zero start or length, starts not
            ascending, overlapping or touching runs, a run past the image end).
    """
    starts, lengths = parse_runs(rle, shape)
    height = int(shape[0])
    mask = np.zeros((height, int(shape[1])), dtype=bool)
    if starts.size == 0:
        return mask
    # Flat 0-based index of every positive pixel: each run's start, plus 0..length-1.
    run_offset = np.cumsum(lengths) - lengths
    index = np.repeat(starts - 1 - run_offset, lengths) + np.arange(int(lengths.sum()))
    mask[index % height, index // height] = True
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
