"""Moved to :mod:`ensemble_kit.data.synth`;
kept so that ``ensemble_kit.synth`` still imports."""

from .data.synth import (
    AIRCRAFT_PX_PER_FRAME,
    BANDS,
    FRAME_OFFSETS,
    ICE_FACTOR,
    MIN_SIZE,
    SPLIT_SEEDS,
    WATER_FACTOR,
    Contrail,
    annotate,
    clear_sky,
    contrail_depth,
    draw_contrails,
    record_ids,
    render_bands,
    smooth_fields,
    track_distance,
    write_synthetic,
)

__all__ = [
    "BANDS",
    "SPLIT_SEEDS",
    "MIN_SIZE",
    "ICE_FACTOR",
    "WATER_FACTOR",
    "FRAME_OFFSETS",
    "AIRCRAFT_PX_PER_FRAME",
    "Contrail",
    "write_synthetic",
    "record_ids",
    "draw_contrails",
    "track_distance",
    "contrail_depth",
    "annotate",
    "render_bands",
    "clear_sky",
    "smooth_fields",
]
