"""Parsing and checking run-length texts (the part of RLE that data readers need too).

Kept at the bottom of the package so that :mod:`ensemble_kit.data` can read RLE mask CSVs
with the same strict checks :mod:`ensemble_kit.inference.rle` applies to submissions. Pixel
numbering is explained there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from .errors import EkError

EMPTY = "-"
_SPACE = r"[ \t\n\r\x0b\x0c]+"  # ASCII whitespace, as numpy's parser reads it
_DIGITS_AND_SPACE = b"0123456789 \t\n\r\x0b\x0c"


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


def _check_runs(numbers: np.ndarray, rle: str, pixels: int, allow_touching: bool = False) -> None:
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
    limit = -1 if allow_touching else 0
    if gaps.size and gaps.min() <= limit:
        i = int(np.argmax(gaps <= limit))
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


def parse_runs(
    rle: str, shape: Sequence[int], base: int = 1, allow_touching: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Validate an RLE text and return its runs.

    Args:
        rle: Kaggle RLE; ``-``, an empty string or only whitespace mean an empty mask.
            Any ASCII whitespace may separate the numbers.
        shape: ``(H, W)`` of the mask the RLE describes.
        base: Number of the first pixel in ``rle``: 1 (Kaggle's usual) or 0.
        allow_touching: Accept a run that starts right where the previous one ends (some
            training CSVs have them); overlapping or unsorted runs are errors either way.

    Returns:
        ``(starts, lengths)`` as int64 arrays, starts 1-indexed (whatever ``base``).

    Raises:
        EkError: the text is not a valid RLE for ``shape``, with a one-line reason.
    """
    pixels = _pixel_count(shape)
    if base not in (0, 1):
        raise ValueError(f"base must be 0 or 1, got {base!r}")
    if not isinstance(rle, str):
        raise EkError(f"RLE must be a string, got {type(rle).__name__} {rle!r}")
    if rle.strip() in ("", EMPTY):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    numbers = _parse_numbers(rle)
    if base == 0:
        numbers[0::2] += 1
    _check_runs(numbers, rle, pixels, allow_touching)
    return numbers[0::2], numbers[1::2]
