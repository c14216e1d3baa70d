"""``ek blend --oof``: choose blend weights, threshold and postprocessing on OOF predictions.

The search algorithm (arrays in, weights out) is kept apart from the file-level wrapper:

- :mod:`.rule`: :class:`BlendRule`, the chosen blend and the one place that turns member
  codes into masks (``sums`` -> ``threshold_for`` -> ``apply``), and ``blend.json``
  (:class:`BlendFile`).
- :mod:`.verify`: :func:`verify_blend`, the rule of a ``blend.json`` whose OOF is unchanged.
- :mod:`.kernels`: numba kernels (histograms, blend sums, best threshold per set).
- :mod:`.candidates`: one chunked pass over the OOF -> the sparse candidate pixels.
- :mod:`.sets`: the sets of folds a nested search chooses on.
- :mod:`.scorer`: memoised best-threshold dice of integer weight vectors on every set.
- :mod:`.selection`: Caruana greedy forward selection (optionally within a cost budget) and
  integer weight refinement.
- :mod:`.threshold`: exact threshold jointly with min-pixel / min-component postprocessing.
- :mod:`.nested`: the procedure on a set of folds, every option chosen by cross-validation
  inside it, and its fully nested estimate.
- :mod:`.ensemble_search`: the search on arrays, ``search`` (the algorithm is described
  there).
- :mod:`.holdout`: the holdout's own best threshold, and the threshold chosen on the holdout
  with its cross-fitted estimate.
- :mod:`.run`: ``run_blend``, the workdir I/O (writes ``blend.json``, the report, the gallery).

Only :mod:`.rule` and :mod:`.verify` are imported with the package, so ``ek submit`` never
imports the search; import the search's names from their modules, or from
:mod:`ensemble_kit.api`.
"""

from __future__ import annotations

from .rule import BlendFile, BlendRule
from .verify import verify_blend

__all__ = ["BlendFile", "BlendRule", "verify_blend"]
