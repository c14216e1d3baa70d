"""The blend procedure on a set of folds, and its fully nested estimate.

The procedure ``P(F)`` on a set of folds ``F``:

1. greedy weights on ``F`` (with ``--refine``, also the refined weights on ``F``);
2. threshold and postprocessing on ``F``, for each weight vector;
3. the *option*: threshold mode (``value`` / ``top_fraction``) and, with ``--refine``, plain
   or refined weights, chosen by cross-validation inside ``F``: for every fold ``j`` of
   ``F``, the choice made on ``F`` without ``j`` is scored on ``j``; the pooled dice of each
   option is compared and the first best in :data:`OPTIONS` order wins. A set of one fold
   (K = 2) cannot be cross-validated and keeps the first option (``value``, plain).

The final blend is ``P(all folds)``. The nested estimate scores ``P(all folds but k)`` on
fold ``k`` for every ``k``: every choice it makes, the option included, sees only the other
folds, so the pooled estimate is an honest one of the whole procedure, not the best of
several estimates. The sets of folds this needs (all, each fold left out, each pair left
out) are searched together (:class:`~.sets.FoldSets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..metrics import dice_from_counts
from .candidates import Candidates
from .rule import MODES
from .scorer import Scorer
from .selection import Budget, best_prefix_weights, greedy_paths, refine_weights
from .sets import FoldSets
from .threshold import Choice, choose_threshold, heldout_counts, threshold_tables


@dataclass(frozen=True)
class Option:
    """A choice the procedure makes by cross-validation: threshold mode and refinement."""

    refine: bool
    mode: str

    @property
    def label(self) -> str:
        return self.mode + ("+refine" if self.refine else "")


OPTIONS = tuple(Option(refine, mode) for refine in (False, True) for mode in MODES)


@dataclass
class Nested:
    """Choices on every set of folds, the options picked, and the held-out counts."""

    sets: FoldSets
    choices: dict[bool, list[Choice]]  # refined? -> the choice on each set of folds
    path: list[tuple[int, float]]  # the greedy path on all folds
    picked: list[Option]  # per fold k: the option chosen on the other folds
    final: Option  # the option of the final choice, cross-validated on all folds
    counts: np.ndarray  # (K, 3) held-out TP, FP, FN of the procedure
    option_counts: dict[str, np.ndarray]  # option label -> (K, 3), that option fixed

    @property
    def refined(self) -> bool:
        return self.final.refine

    @property
    def final_choice(self) -> Choice:
        return self.choices[self.final.refine][0]

    def choice_for(self, fold: int) -> tuple[Choice, Option]:
        """The choice scored on ``fold``: made on every other fold, option included."""
        option = self.picked[fold]
        return self.choices[option.refine][self.sets.index(fold)], option

    def pooled(self) -> float:
        return dice_from_counts(*self.counts.sum(axis=0))

    def per_fold(self) -> list[float]:
        return [dice_from_counts(*row) for row in self.counts]

    def option_scores(self) -> dict[str, float]:
        """Each option fixed: the choice on K-1 folds scored on the fold left out, pooled.

        The final option is the best of these, so they are not honest estimates themselves.
        """
        return {label: dice_from_counts(*c.sum(axis=0)) for label, c in self.option_counts.items()}


def nested_search(
    scorer: Scorer, steps: int, refine: bool, grids, budget: Budget | None = None
) -> Nested:
    """Run the procedure on every set of ``scorer.sets``; pick options; held-out counts."""
    cands, sets = scorer.cands, scorer.sets
    paths = greedy_paths(scorer, steps, budget)
    weights = {False: [best_prefix_weights(path, cands.values.shape[0]) for path in paths]}
    if refine:
        weights[True] = refine_weights(scorer, weights[False], budget)
    scorer.release()
    choices = {r: _choices(cands, w, sets, grids) for r, w in weights.items()}
    options = [o for o in OPTIONS if o.refine in choices]
    n_folds = cands.n_folds
    option_counts = {
        o.label: np.array(
            [_heldout(cands, choices[o.refine][sets.index(k)], k, o.mode) for k in range(n_folds)]
        )
        for o in options
    }
    picked = [_pick(cands, sets, choices, options, (k,)) for k in range(n_folds)]
    counts = np.array([option_counts[o.label][k] for k, o in enumerate(picked)])
    final = _pick(cands, sets, choices, options, ())
    return Nested(sets, choices, paths[0], picked, final, counts, option_counts)


def _choices(cands: Candidates, weights: list[np.ndarray], sets: FoldSets, grids) -> list[Choice]:
    """Threshold and postprocessing of each set's weights; sets with equal weights share tables."""
    choices: list[Choice | None] = [None] * len(weights)
    groups: dict[tuple[int, ...], list[int]] = {}
    for s, w in enumerate(weights):
        groups.setdefault(tuple(int(x) for x in w), []).append(s)
    for members in groups.values():  # one table at a time: each is K x n_values x pairs
        w = weights[members[0]]
        tables = threshold_tables(cands, w, grids[0], grids[1], sets)
        for s in members:
            choices[s] = choose_threshold(cands, w, s, grids[0], grids[1], tables, sets)
    return [choice for choice in choices if choice is not None]  # every set was chosen


def _pick(cands, sets: FoldSets, choices, options: list[Option], left_out: tuple) -> Option:
    """The option with the best cross-validated dice on the folds not in ``left_out``."""
    inside = [j for j in range(cands.n_folds) if j not in left_out]
    if len(inside) < 2:
        return options[0]
    best, best_score = options[0], -1.0
    for option in options:
        counts = sum(
            np.array(
                _heldout(cands, choices[option.refine][sets.index(*left_out, j)], j, option.mode)
            )
            for j in inside
        )
        score = dice_from_counts(*counts)  # type: ignore[misc]  # a length-3 array
        if score > best_score + 1e-12:
            best, best_score = option, score
    return best


def _heldout(cands: Candidates, choice: Choice, fold: int, mode: str) -> tuple[int, int, int]:
    return heldout_counts(
        choice,
        fold,
        mode,
        cands.floor * int(choice.weights.sum()),
        int(cands.fold_pixels[fold]),
        int(cands.fold_positives[fold]),
    )
