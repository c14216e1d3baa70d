"""Moved to :mod:`ensemble_kit.inference.tta`;
kept so that ``ensemble_kit.predict`` still imports."""

from .inference.tta import (
    SWAPS_AXES,
    auto_chunk,
    predict_inputs,
    predict_probs,
    tta_inverse,
    tta_transform,
)

__all__ = [
    "SWAPS_AXES",
    "tta_transform",
    "tta_inverse",
    "predict_probs",
    "predict_inputs",
    "auto_chunk",
]
