"""Data: Kaggle records and false colour (:mod:`.records`), synthetic data, caches, the
loader, splits.

The names of :mod:`ensemble_kit.data.records` are importable from here, as before the move."""

from .records import (
    ASH_RANGES,
    INDIVIDUAL_FILE,
    LABELLED_FRAME,
    MASK_FILE,
    N_FRAMES,
    ash_false_color,
    band_file,
    band_statistics,
    build_input,
    has_labels,
    list_records,
    load_band,
    load_bands,
    load_mask,
    load_soft_label,
    normalise_bands,
)

__all__ = [
    "N_FRAMES",
    "LABELLED_FRAME",
    "ASH_RANGES",
    "MASK_FILE",
    "INDIVIDUAL_FILE",
    "band_file",
    "list_records",
    "load_band",
    "load_bands",
    "ash_false_color",
    "normalise_bands",
    "build_input",
    "load_mask",
    "load_soft_label",
    "has_labels",
    "band_statistics",
]
