"""Caruana greedy forward selection with replacement, and the integer weight refinement.

The weights are the integer selection counts, so the blend sum ``S = sum w_i * u_i``
(``u_i`` the uint8 codes) is an exact integer. An optional :class:`Budget` keeps every
ensemble considered within a prediction cost: a config's cost counts once, whatever its
weight, since each config's fold models run once per record however often it was picked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import EkError
from .candidates import Candidates
from .sets import FoldSets

REFINE_SCALE = 4
REFINE_ROUNDS = 30


class MoveScorer(Protocol):
    """What the selection reads of a scorer (:class:`~.scorer.Scorer` for global dice,
    :class:`~.mean_dice.MeanDiceScorer` for mean dice): per move, scores on every set first."""

    cands: Candidates
    sets: FoldSets

    def moves(self, bases: list[np.ndarray], moves: list[tuple[int, int, int]]) -> list[tuple]:
        """Scores of ``bases[b] + sign * e_config`` for each ``(b, config, sign)`` move."""
        ...


@dataclass(frozen=True)
class Budget:
    """Prediction cost of each config (e.g. seconds per record) and the most a blend may cost."""

    costs: np.ndarray  # float (C,)
    limit: float

    def cost(self, weights: np.ndarray) -> float:
        """Summed cost of the configs with a non-zero weight."""
        return float(np.asarray(self.costs)[np.asarray(weights) > 0].sum())

    def allows(self, weights: np.ndarray) -> bool:
        return self.cost(weights) <= self.limit * (1 + 1e-9)

    def check(self, names: list[str]) -> None:
        """Raise when no config alone fits the limit."""
        if len(self.costs) != len(names):
            raise EkError(f"costs: {len(self.costs)} values for {len(names)} configs")
        cheapest = int(np.argmin(self.costs))
        if self.costs[cheapest] > self.limit * (1 + 1e-9):
            raise EkError(
                f"--max-seconds-per-record {self.limit:g}: no config fits; the cheapest, "
                f"'{names[cheapest]}', costs {self.costs[cheapest]:.4g} s per record"
            )


def greedy_paths(
    scorer: MoveScorer, steps: int, budget: Budget | None = None
) -> list[list[tuple[int, float]]]:
    """Caruana forward selection with replacement, run on every set of folds at once.

    Args:
        scorer: Scores weight vectors on every set of ``scorer.sets``.
        steps: Selection rounds.
        budget: When given, a config may be added only while the ensemble's cost fits.

    Returns:
        Per set of folds the ``(config, dice)`` of each step.
    """
    n_configs, n_sets = scorer.cands.values.shape[0], len(scorer.sets)
    counts = [np.zeros(n_configs, dtype=np.int64) for _ in range(n_sets)]
    paths: list[list[tuple[int, float]]] = [[] for _ in range(n_sets)]
    eye = np.eye(n_configs, dtype=np.int64)
    for _ in range(steps):
        bases, index = _unique_rows(counts)
        moves = [
            (b, c, 1)
            for b in range(len(bases))
            for c in range(n_configs)
            if budget is None or budget.allows(bases[b] + eye[c])
        ]
        scores = dict(zip(moves, scorer.moves(bases, moves)))
        for s in range(n_sets):
            options = [
                scores[(index[s], c, 1)][0][s] if (index[s], c, 1) in scores else -np.inf
                for c in range(n_configs)
            ]
            best = int(np.argmax(options))
            counts[s] = counts[s] + eye[best]
            paths[s].append((best, float(options[best])))
    return paths


def best_prefix_weights(path: list[tuple[int, float]], n_configs: int) -> np.ndarray:
    """Selection counts of the best-scoring prefix of a greedy path (shortest on ties)."""
    stop = int(np.argmax([dice for _, dice in path])) + 1
    return np.bincount([config for config, _ in path[:stop]], minlength=n_configs).astype(np.int64)


def refine_weights(
    scorer: MoveScorer, weights: list[np.ndarray], budget: Budget | None = None
) -> list[np.ndarray]:
    """Integer coordinate search from ``REFINE_SCALE * weights``: +-1 moves while they gain.

    Every set ``s`` refines its own ``weights[s]`` on its own data; with a budget, a move
    that brings in a config the budget cannot afford is not tried.
    """
    current = [w * REFINE_SCALE for w in weights]
    score = [scorer.moves([w], [(0, 0, 0)])[0][0][s] for s, w in enumerate(current)]
    active = list(range(len(current)))
    for _ in range(REFINE_ROUNDS):
        if not active:
            break
        bases, index = _unique_rows([current[s] for s in active])
        moves = _refine_moves(bases, budget)
        results = scorer.moves(bases, moves)
        still = []
        for s, b in zip(active, index):
            options = [(results[m][0][s], m) for m, move in enumerate(moves) if move[0] == b]
            gain, m = max(options, key=lambda pair: (pair[0], -pair[1]))
            if gain > score[s] + 1e-12:
                _, c, sign = moves[m]
                current[s] = current[s] + sign * np.eye(len(current[s]), dtype=np.int64)[c]
                score[s] = gain
                still.append(s)
        active = still
    return [w // np.gcd.reduce(w[w > 0]) for w in current]


def _refine_moves(bases: list[np.ndarray], budget: Budget | None) -> list[tuple[int, int, int]]:
    """Every +-1 move of every base that keeps weights >= 0, not all 0, and within budget."""
    moves = []
    for b, w in enumerate(bases):
        for c in range(len(w)):
            for sign in (1, -1):
                step = w + sign * np.eye(len(w), dtype=np.int64)[c]
                if step.min() < 0 or step.sum() == 0:
                    continue
                if sign > 0 and budget is not None and not budget.allows(step):
                    continue
                moves.append((b, c, sign))
    return moves


def _unique_rows(rows: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    keys = [tuple(row) for row in rows]
    unique = list(dict.fromkeys(keys))
    return [np.array(key, dtype=np.int64) for key in unique], [unique.index(key) for key in keys]
