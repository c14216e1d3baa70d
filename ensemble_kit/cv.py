"""Moved to :mod:`ensemble_kit.training.cv`;
kept so that ``ensemble_kit.cv`` still imports."""

from .inference.tta import predict_inputs
from .training.assembly import ROW_CHUNK, assemble
from .training.cv import (
    CvRequest,
    FoldJob,
    fold_sets,
    predict_set,
    run_cv,
    run_fold,
)

__all__ = [
    "predict_inputs",
    "ROW_CHUNK",
    "CvRequest",
    "FoldJob",
    "run_cv",
    "fold_sets",
    "predict_set",
    "run_fold",
    "assemble",
]
