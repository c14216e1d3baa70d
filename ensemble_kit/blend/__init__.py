"""``ek blend --oof``: choose blend weights, threshold and postprocessing on OOF predictions.

The search algorithm (arrays in, weights out) is kept apart from the file-level wrapper:

- :mod:`.kernels`: numba kernels (histograms, blend sums, best threshold per set).
- :mod:`.candidates`: one chunked pass over the OOF -> the sparse candidate pixels.
- :mod:`.sets`: the sets of folds a nested search chooses on.
- :mod:`.scorer`: memoised best-threshold dice of integer weight vectors on every set.
- :mod:`.selection`: Caruana greedy forward selection (optionally within a cost budget) and
  integer weight refinement.
- :mod:`.threshold`: exact threshold jointly with min-pixel / min-component postprocessing.
- :mod:`.nested`: the procedure on a set of folds, every option chosen by cross-validation
  inside it, and its fully nested estimate.
- :mod:`.ensemble_search`: the search on arrays, :func:`search` (the algorithm is
  described there).
- :mod:`.holdout`: the holdout's own best threshold, and the threshold chosen on the holdout
  with its cross-fitted estimate.
- :mod:`.apply`: :func:`apply_blend`, :func:`top_fraction_threshold` and :func:`verify_blend`,
  the one code path that submission also uses; it imports none of the search modules.
- :mod:`.run`: :func:`run_blend`, the workdir I/O (writes ``blend.json`` and a report).

Only :mod:`.apply` is imported with the package; every other public name is loaded on first
access, so ``ek submit`` never imports the search.
"""

from __future__ import annotations

import importlib
from typing import Any

from .apply import (
    apply_blend,
    blend_histogram,
    blend_sums,
    floor_sum,
    fraction_threshold,
    top_fraction_threshold,
    verify_blend,
)

_LAZY_EXPORTS = {
    "candidates": ("CHUNK_IMAGES", "DEFAULT_FLOOR", "Candidates", "build_candidates"),
    "kernels": ("best_per_set_reference", "fold_histograms", "weighted_sum"),
    "scorer": ("Scorer",),
    "sets": ("FoldSets",),
    "selection": (
        "Budget",
        "REFINE_ROUNDS",
        "REFINE_SCALE",
        "best_prefix_weights",
        "greedy_paths",
        "refine_weights",
    ),
    "threshold": (
        "MODES",
        "Choice",
        "Tables",
        "choose_threshold",
        "heldout_counts",
        "threshold_tables",
    ),
    "nested": ("OPTIONS", "Nested", "Option", "nested_search"),
    "ensemble_search": (
        "MIN_COMPONENT_GRID",
        "MIN_PIXELS_GRID",
        "SearchResult",
        "dice_curves",
        "per_config_scores",
        "search",
    ),
    "holdout": ("CROSSFIT_REPEATS", "HoldoutCheck", "check_holdout", "random_halves"),
    "run": ("blend_dict", "run_blend"),
}
_MODULE_OF = {name: module for module, names in _LAZY_EXPORTS.items() for name in names}

__all__ = [
    "apply_blend",
    "blend_histogram",
    "blend_sums",
    "floor_sum",
    "fraction_threshold",
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
