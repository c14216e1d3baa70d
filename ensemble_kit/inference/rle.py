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

import re
from collections.abc import Sequence

import numpy as np

from ..errors import EkError

EMPTY = "-"
_SPACE = r"[ \t\n\r\x0b\x0c]+"  # ASCII whitespace, as numpy's parser reads it
_DIGITS_AND_SPACE = b"0123456789 \t\n\r\x0b\x0c"


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


def encode(mask: np.ndarray) -> str:
    """Run-length encode one 2-D binary mask.

    Args:
        mask: ``(H, W)`` array of bool or 0/1 values.

    Returns:
        The Kaggle RLE text, ``-`` for an empty mask.

    Raises:
        ValueError: ``mask`` is not 2-D or has values other than 0 and 1.
    """
    return _encode_bool(_check_mask(mask, 2))


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


def _pixel_count(shape: Sequence[int]) -> int:
    """Pixels of a 2-D ``shape``; ValueError for anything else."""
    if len(shape) != 2 or any(int(side) < 0 for side in shape):
        raise ValueError(f"expected a 2-D shape (H, W), got {tuple(shape)}")
    return int(shape[0]) * int(shape[1])


def _parse_numbers(rle: str) -> np.ndarray:
    """The numbers of a non-empty RLE as int64; EkError for a token that is not digits."""
    if not rle.isascii() or rle.encode().translate(None, _DIGITS_AND_SPACE):
        bad = next(t for t in re.split(_SPACE, rle) if not re.fullmatch(r"[0-9]*", t))
        raise EkError(f"RLE token {bad[:30]!r} is not a positive integer")
    # Only ASCII digits and whitespace are left, which fromstring parses exactly and
    # several times faster than converting split tokens; numbers too large for int64
    # saturate, and fail the bound check in _check_runs.
    numbers = np.fromstring(rle, dtype=np.int64, sep=" ")
    if numbers.size % 2:
        raise EkError(
            f"RLE has an odd number of values ({numbers.size}); expected start/length pairs"
        )
    return numbers


def _check_runs(numbers: np.ndarray, rle: str, pixels: int) -> None:
    """EkError for zero or oversized values, unordered/overlapping/touching runs, overruns."""
    if numbers.min() < 1:
        i = int(np.argmax(numbers < 1))
        name = ("start", "length")[i % 2]
        raise EkError(f"RLE pair {i // 2 + 1} has {name} 0 (starts and lengths are >= 1)")
    if numbers.max() > pixels:  # also catches values too large for int64, saturated
        i = int(np.argmax(numbers > pixels))
        name = ("start", "length")[i % 2]
        raise EkError(
            f"RLE pair {i // 2 + 1} has {name} {re.split(_SPACE, rle.strip())[i][:30]}, "
            f"past the image end ({pixels} pixels)"
        )
    starts, lengths = numbers[0::2], numbers[1::2]
    ends = starts + lengths  # 1-indexed, one past the run
    gaps = starts[1:] - ends[:-1]
    if gaps.size and gaps.min() <= 0:
        i = int(np.argmax(gaps <= 0))
        if starts[i + 1] <= starts[i]:
            problem = "starts are not ascending"
        elif gaps[i] < 0:
            problem = "runs overlap"
        else:
            problem = "runs touch (they should be one run)"
        pairs = f"'{starts[i]} {lengths[i]}', '{starts[i + 1]} {lengths[i + 1]}'"
        raise EkError(f"RLE pairs {i + 1} and {i + 2} ({pairs}): {problem}")
    if ends[-1] - 1 > pixels:
        raise EkError(
            f"RLE run '{starts[-1]} {lengths[-1]}' ends at pixel {ends[-1] - 1}, "
            f"past the image end ({pixels} pixels)"
        )


def parse_runs(rle: str, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Validate an RLE text and return its runs.

    Args:
        rle: Kaggle RLE; ``-``, an empty string or only whitespace mean an empty mask.
            Any ASCII whitespace may separate the numbers.
        shape: ``(H, W)`` of the mask the RLE describes.

    Returns:
        ``(starts, lengths)`` as int64 arrays, starts 1-indexed column-major.

    Raises:
        EkError: the text is not a valid RLE for ``shape``, with a one-line reason.
    """
    pixels = _pixel_count(shape)
    if not isinstance(rle, str):
        raise EkError(f"RLE must be a string, got {type(rle).__name__} {rle!r}")
    if rle.strip() in ("", EMPTY):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    numbers = _parse_numbers(rle)
    _check_runs(numbers, rle, pixels)
    return numbers[0::2], numbers[1::2]


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
