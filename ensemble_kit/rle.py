"""Moved to :mod:`ensemble_kit.inference.rle`;
kept so that ``ensemble_kit.rle`` still imports."""

from .inference.rle import (
    EMPTY,
    decode,
    decode_reference,
    encode,
    encode_batch,
    encode_reference,
    parse_runs,
)

__all__ = [
    "EMPTY",
    "encode",
    "encode_batch",
    "parse_runs",
    "decode",
    "encode_reference",
    "decode_reference",
]
