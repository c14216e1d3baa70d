"""``ek blend --oof``: choose blend weights, threshold and postprocessing on OOF predictions.

The search algorithm (arrays in, weights out) is kept apart from the file-level wrapper:

- :mod:`.kernels`: numba kernels (histograms, blend sums, best threshold per set).
- :mod:`.candidates`: one chunked pass over the OOF -> the sparse candidate pixels.
- :mod:`.scorer`: memoised best-threshold dice of integer weight vectors on every set.
- :mod:`.selection`: Caruana greedy forward selection and integer weight refinement.
- :mod:`.threshold`: exact threshold jointly with min-pixel / min-component postprocessing.
- :mod:`.ensemble_search`: the nested search on arrays, :func:`search` (the algorithm is
  described there).
- :mod:`.apply`: :func:`apply_blend`, :func:`top_fraction_threshold` and :func:`verify_blend`,
  the one code path that submission also uses; it imports none of the search modules.
- :mod:`.run`: :func:`run_blend`, the workdir I/O (writes ``blend.json`` and a report).

Only :mod:`.apply` is imported with the package; every other public name is loaded on first
access, so ``ek submit`` never imports the search.
"""

from __future__ import annotations

import importlib
from typing import Any

from .apply import apply_blend, blend_histogram, blend_sums, top_fraction_threshold, verify_blend

_LAZY_EXPORTS = {
    "candidates": ("CHUNK_IMAGES", "DEFAULT_FLOOR", "Candidates", "build_candidates"),
    "kernels": ("best_per_set_reference", "fold_histograms", "weighted_sum"),
    "scorer": ("Scorer",),
    "selection": (
        "REFINE_ROUNDS",
        "REFINE_SCALE",
        "best_prefix_weights",
        "greedy_paths",
        "refine_weights",
    ),
    "threshold": ("Choice", "Tables", "choose_threshold", "heldout_counts", "threshold_tables"),
    "ensemble_search": (
        "MIN_COMPONENT_GRID",
        "MIN_PIXELS_GRID",
        "Nested",
        "SearchResult",
        "dice_curves",
        "nested_search",
        "per_config_scores",
        "search",
    ),
    "run": ("blend_dict", "run_blend"),
}
_MODULE_OF = {name: module for module, names in _LAZY_EXPORTS.items() for name in names}

__all__ = [
    "apply_blend",
    "blend_histogram",
    "blend_sums",
    "top_fraction_threshold",
    "verify_blend",
    *_MODULE_OF,
]


def __getattr__(name: str) -> Any:
    """Load the submodule of a lazily exported name on first access (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
