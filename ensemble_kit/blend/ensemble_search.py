"""``ek blend --oof``: choose blend weights, threshold and postprocessing on OOF predictions.

The search, on arrays (:func:`search`):

1. Every config alone: global dice at its best threshold, exact over all 256 uint8 codes.
2. Caruana greedy forward selection with replacement: ``steps`` rounds, each adding the
   config whose addition gives the best best-threshold global dice; the best prefix is kept
   and the weights are the integer selection counts, so the blend sum ``S = sum w_i * u_i``
   (``u_i`` the uint8 codes) is an exact integer. Optionally an integer coordinate search
   refines the weights. With a cost per config and a limit, only ensembles whose summed
   cost fits are considered (a config's cost counts once, whatever its weight).
3. Threshold of the blend, exact over every integer value of ``S``, jointly with the
   postprocessing (min-pixel: drop whole masks with fewer pixels; min-component: drop
   8-connected components with fewer pixels). Two threshold modes: ``value`` (predict
   ``S >= threshold_sum``) and ``top_fraction`` (mark the top fraction of all pixels of a
   set; the threshold is recomputed on each set it is applied to). The mode, and plain or
   refined weights, are chosen by cross-validation (:mod:`.nested`).
4. Honest estimates: everything above, those choices included, is repeated on K-1 folds
   and scored on the held-out fold (nested, per fold and pooled; :mod:`.nested`).

Speed: a pixel where every config is below ``floor`` (a uint8 code) has ``S < floor * W``,
so for thresholds ``>= floor * W`` it is never predicted. Such pixels are dropped once; the
labelled positives among them count as false negatives at every threshold. The remaining
sparse candidate set (a few % of the pixels) is all the search touches, and per-fold
histograms of ``(S, label)`` give every threshold's TP/FP/FN as cumulative sums.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import EkError
from ..metrics import N_CODES, dice_from_counts, sweep_from_histogram
from ..sparse_oof import SparseCodes
from .candidates import DEFAULT_FLOOR, Candidates, build_candidates
from .kernels import best_per_set
from .nested import Nested, nested_search
from .scorer import Scorer
from .selection import Budget
from .sets import FoldSets
from .threshold import Choice, heldout_counts

log = logging.getLogger(__name__)

MIN_PIXELS_GRID = (0, 5, 10, 20, 50, 100, 200)
MIN_COMPONENT_GRID = (0, 2, 3, 5, 10, 20)


@dataclass
class SearchResult:
    """The final choice, how it was reached, and every score the report shows."""

    names: list[str]
    choice: Choice
    mode: str
    nested: Nested
    per_config: dict[str, dict]
    floor: int
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (threshold probabilities, dice)
    per_fold: list[float]  # the final choice's dice on each fold (optimistic)
    budget: Budget | None = None

    @property
    def weight_total(self) -> int:
        return int(self.choice.weights.sum())

    @property
    def threshold(self) -> float:
        return self.choice.threshold_sum / (255.0 * self.weight_total)

    @property
    def cost(self) -> float | None:
        """Summed cost of the chosen configs (None without costs)."""
        return None if self.budget is None else self.budget.cost(self.choice.weights)


def search(
    oofs: list[np.ndarray],
    labels: np.ndarray,
    folds: np.ndarray,
    steps: int = 25,
    refine: bool = False,
    names: list[str] | None = None,
    floor: int = DEFAULT_FLOOR,
    min_pixels_grid: tuple[int, ...] = MIN_PIXELS_GRID,
    min_component_grid: tuple[int, ...] = MIN_COMPONENT_GRID,
    costs: np.ndarray | None = None,
    max_cost: float | None = None,
) -> SearchResult:
    """Choose weights, threshold mode and postprocessing on OOF arrays (see module docstring).

    Args:
        oofs: uint8 ``(N, H, W)`` OOF codes per config (memmaps welcome; sparse members:
            :mod:`.sparse`'s floor rule).
        labels: uint8 0/1 ``(N, H, W)``.
        folds: int ``(N,)`` fold of each row, ``0..K-1`` (K >= 2).
        steps: Greedy selection rounds (>= 1).
        refine: Also try an integer coordinate search of the weights; plain or refined is
            chosen by cross-validation inside each set of folds, like the threshold mode.
        names: Config names (default ``config_0``, ...).
        floor: uint8 code below which pixels are never predicted (blend thresholds are
            searched from ``floor / 255`` up).
        min_pixels_grid: Min-pixel values tried (0 is always tried).
        min_component_grid: Min-component values tried (0 is always tried).
        costs: Prediction cost of each config (e.g. seconds per record); with ``max_cost``,
            only ensembles whose summed cost (configs with a non-zero weight) fits are
            considered.
        max_cost: The most an ensemble may cost; None: no limit.

    Returns:
        A :class:`SearchResult`.
    """
    names = names or [f"config_{i}" for i in range(len(oofs))]
    _check_arrays(oofs, labels, folds)
    if steps < 1:
        raise EkError(f"steps: {steps}; the greedy selection needs at least 1 round")
    budget = _budget(costs, max_cost, names)
    cands = build_candidates(oofs, labels, folds, floor)
    log.info("blend: %d candidate pixels of %d", len(cands.labels), int(cands.fold_pixels.sum()))
    grids = (with_zero(min_pixels_grid), with_zero(min_component_grid))
    scorer = Scorer(cands, FoldSets.nested(cands.n_folds))
    limit = budget if max_cost is not None else None
    nested = nested_search(scorer, steps, refine, grids, limit)
    per_config = per_config_scores(cands, names)
    choice = nested.final_choice
    curves = dice_curves(cands, names, choice)
    per_fold = [
        dice_from_counts(*heldout_counts(choice, k, "value", 0, 0, int(cands.fold_positives[k])))
        for k in range(cands.n_folds)
    ]
    return SearchResult(
        names, choice, nested.final.mode, nested, per_config, cands.floor, curves, per_fold, budget
    )


def _budget(costs, max_cost, names) -> Budget | None:
    if costs is None:
        if max_cost is not None:
            raise EkError("max_cost needs the cost of every config")
        return None
    budget = Budget(np.asarray(costs, dtype=np.float64), np.inf if max_cost is None else max_cost)
    budget.check(names)
    return budget


def per_config_scores(cands: Candidates, names: list[str]) -> dict[str, dict]:
    """Each config alone, exact over all 256 codes: pooled, per-fold and nested dice."""
    scores = {}
    assert cands.config_histograms is not None  # dense per-config counts, not regrouped
    for name, hist in zip(names, cands.config_histograms):
        sets = FoldSets.nested(len(hist), depth=1)
        dice, thresholds = best_per_set(hist, hist[:, :, 1].sum(axis=1), 0, sets.excluded)
        nested = np.array([_counts_at(hist[k], thresholds[k + 1]) for k in range(len(hist))])
        scores[name] = {
            "dice": float(dice[0]),
            "threshold": float(thresholds[0] / 255.0),
            "threshold_code": int(thresholds[0]),
            "per_fold": [dice_from_counts(*_counts_at(h, thresholds[0])) for h in hist],
            "nested": dice_from_counts(*nested.sum(axis=0)),
        }
    return scores


def dice_curves(cands: Candidates, names: list[str], choice: Choice) -> dict:
    """Dice against probability threshold: each config (all codes) and the final blend."""
    curves = {}
    assert cands.config_histograms is not None  # dense per-config counts, not regrouped
    for name, hist in zip(names, cands.config_histograms):
        curves[name] = (
            np.arange(N_CODES) / 255.0,
            dice_from_counts(*sweep_from_histogram(hist.sum(axis=0))),
        )
    total = int(choice.weights.sum())
    tp, fp, fn = sweep_from_histogram(choice.levels_hist.sum(axis=0))
    fn = fn + int(cands.fold_positives.sum()) - int(choice.levels_hist[:, :, 1].sum())
    lowest = cands.floor * total
    curves["blend"] = (
        np.arange(lowest, len(tp)) / (255.0 * total),
        dice_from_counts(tp, fp, fn)[lowest:],
    )
    return curves


def _counts_at(hist: np.ndarray, threshold: int) -> tuple[int, int, int]:
    tp, fp = int(hist[threshold:, 1].sum()), int(hist[threshold:, 0].sum())
    return tp, fp, int(hist[:, 1].sum()) - tp


def with_zero(grid) -> tuple[int, ...]:
    """A postprocessing grid, sorted and always holding 0 (off)."""
    return tuple(sorted({0, *map(int, grid)}))


def _check_arrays(oofs, labels, folds) -> None:
    check_pool(oofs, labels, folds)
    if not (labels.any() if isinstance(labels, SparseCodes) else np.asarray(labels).any()):
        raise EkError("every OOF label is empty: there is nothing to fit a threshold to")


def check_pool(oofs, labels, folds) -> None:
    """One-line errors for an empty pool, OOF not shaped like the labels, or bad folds."""
    if not oofs:
        raise EkError("nothing to blend: the pool of configs is empty")
    for i, oof in enumerate(oofs):
        if oof.dtype != np.uint8 or oof.shape != labels.shape:
            raise EkError(
                f"config {i}: OOF {oof.dtype} {oof.shape} does not match labels {labels.shape}"
            )
    folds = np.asarray(folds)
    if folds.shape != (labels.shape[0],) or folds.min() < 0 or len(np.unique(folds)) < 2:
        raise EkError(
            f"folds: need one fold >= 0 per OOF row and at least 2 folds, got {np.unique(folds)}"
        )
