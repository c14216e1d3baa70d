"""Best-threshold dice of integer weight vectors on every set of folds of a nested search."""

from __future__ import annotations

import numba
import numpy as np

from .candidates import Candidates
from .kernels import score_moves
from .sets import FoldSets


class Scorer:
    """Best-threshold dice of integer weight vectors on every set, memoised by weights.

    Every set of folds (:class:`~.sets.FoldSets`: all folds, each fold left out, each pair
    left out) is scored in one pass, so the greedy runs of a nested search share every
    evaluation they have in common.
    """

    def __init__(self, cands: Candidates, sets: FoldSets | None = None):
        self.cands = cands
        self.sets = sets or FoldSets.nested(cands.n_folds)
        self.cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def moves(self, bases: list[np.ndarray], moves: list[tuple[int, int, int]]) -> list[tuple]:
        """Scores of ``bases[b] + sign * e_config`` for each ``(b, config, sign)`` move."""
        keys = [
            tuple(bases[b] + sign * np.eye(len(bases[b]), dtype=np.int64)[c])
            for b, c, sign in moves
        ]
        todo = {key: move for key, move in zip(keys, moves) if key not in self.cache}
        if todo:
            self._evaluate(bases, list(todo), list(todo.values()))
        return [self.cache[key] for key in keys]

    def release(self) -> None:
        """Nothing to free (blend sums are computed block by block inside the kernel): present
        so that every scorer offers it."""

    def _evaluate(self, bases, keys, moves) -> None:
        cands = self.cands
        used = sorted({b for b, _, _ in moves})
        base_weights = np.stack([np.asarray(bases[b], dtype=np.int64) for b in used])
        move_base = np.array([used.index(b) for b, _, _ in moves], dtype=np.int64)
        move_config, move_sign = (np.array(col, dtype=np.int64) for col in list(zip(*moves))[1:])
        totals = np.array([sum(key) for key in keys], dtype=np.int64)
        n_values = 255 * int(totals.max()) + 1
        dice, thresholds = score_moves(
            base_weights,
            cands.values,
            move_base,
            move_config,
            move_sign,
            cands.floor * totals,
            cands.labels,
            cands.pixel_fold,
            cands.fold_positives,
            self.sets.excluded,
            n_values,
            numba.get_num_threads(),
        )
        for i, key in enumerate(keys):
            self.cache[key] = (dice[i], thresholds[i])
