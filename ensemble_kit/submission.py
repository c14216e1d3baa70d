"""Moved to :mod:`ensemble_kit.inference.submission`;
kept so that ``ensemble_kit.submission`` still imports."""

from .inference.submission import (
    COLUMNS,
    HEADER,
    SAMPLE_SUBMISSION,
    check_submission,
    write_submission,
)

__all__ = [
    "HEADER",
    "COLUMNS",
    "SAMPLE_SUBMISSION",
    "write_submission",
    "check_submission",
]
