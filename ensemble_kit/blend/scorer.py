"""Best-threshold dice of integer weight vectors on every set of folds of a nested search."""

from __future__ import annotations

import numba
import numpy as np

from .candidates import Candidates
from .kernels import score_moves, weighted_sum
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
        self.sums: dict[
            tuple[int, ...], np.ndarray
        ] = {}  # recent blend sums, reused by the next step
        self.scratch: np.ndarray | None = None

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
        """Drop the cached blend sums and scratch: the selection is done, the threshold search
        computes its own sums (at 20,529 x 10 this frees ~1 GB before the threshold tables)."""
        self.sums.clear()
        self.scratch = None

    def _scratch(self, n_values: int) -> np.ndarray:
        size = self.cands.n_folds * n_values * 2
        if self.scratch is None or self.scratch.shape[1] < size:
            self.scratch = np.zeros((numba.get_num_threads(), 2 * size), dtype=np.int64)
        return self.scratch

    def blend_sums(self, weights: np.ndarray) -> np.ndarray:
        """``S`` of the candidate pixels: from a cached parent one config away, else in full."""
        key = tuple(int(w) for w in weights)
        if key not in self.sums:
            parents = [
                (c, key[:c] + (key[c] - 1,) + key[c + 1 :]) for c in range(len(key)) if key[c] > 0
            ]
            found = [(c, parent) for c, parent in parents if parent in self.sums]
            if found:
                c, parent = found[0]
                self.sums[key] = self.sums[parent] + self.cands.values[c]
            else:
                self.sums[key] = weighted_sum(
                    self.cands.values, np.asarray(weights, dtype=np.int64)
                )
            while len(self.sums) > 2 * len(self.sets):  # this step's bases and their parents
                self.sums.pop(next(iter(self.sums)))
        return self.sums[key]

    def _evaluate(self, bases, keys, moves) -> None:
        cands = self.cands
        used = sorted({b for b, _, _ in moves})
        base_sums = np.stack([self.blend_sums(bases[b]) for b in used])
        move_base = np.array([used.index(b) for b, _, _ in moves], dtype=np.int64)
        move_config, move_sign = (np.array(col, dtype=np.int64) for col in list(zip(*moves))[1:])
        totals = np.array([sum(key) for key in keys], dtype=np.int64)
        n_values = 255 * int(totals.max()) + 1
        dice, thresholds = score_moves(
            base_sums,
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
            self._scratch(n_values),
        )
        for i, key in enumerate(keys):
            self.cache[key] = (dice[i], thresholds[i])
