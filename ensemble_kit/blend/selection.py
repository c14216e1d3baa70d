"""Caruana greedy forward selection with replacement, and the integer weight refinement.

The weights are the integer selection counts, so the blend sum ``S = sum w_i * u_i``
(``u_i`` the uint8 codes) is an exact integer.
"""

from __future__ import annotations

import numpy as np

from .scorer import Scorer

REFINE_SCALE = 4
REFINE_ROUNDS = 30


def greedy_paths(scorer: Scorer, steps: int) -> list[list[tuple[int, float]]]:
    """Caruana forward selection with replacement, run on every set at once.

    Returns:
        Per set (0: all folds, ``k + 1``: without fold k) the ``(config, dice)`` of each step.
    """
    n_configs, n_sets = scorer.cands.values.shape[0], scorer.cands.n_folds + 1
    counts = [np.zeros(n_configs, dtype=np.int64) for _ in range(n_sets)]
    paths: list[list[tuple[int, float]]] = [[] for _ in range(n_sets)]
    for _ in range(steps):
        bases, index = _unique_rows(counts)
        scores = scorer.moves(
            bases, [(b, c, 1) for b in range(len(bases)) for c in range(n_configs)]
        )
        for s in range(n_sets):
            options = [scores[index[s] * n_configs + c][0][s] for c in range(n_configs)]
            best = int(np.argmax(options))
            counts[s] = counts[s] + np.eye(n_configs, dtype=np.int64)[best]
            paths[s].append((best, float(options[best])))
    return paths


def best_prefix_weights(path: list[tuple[int, float]], n_configs: int) -> np.ndarray:
    """Selection counts of the best-scoring prefix of a greedy path (shortest on ties)."""
    stop = int(np.argmax([dice for _, dice in path])) + 1
    return np.bincount([config for config, _ in path[:stop]], minlength=n_configs).astype(np.int64)


def refine_weights(scorer: Scorer, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Integer coordinate search from ``REFINE_SCALE * weights``: +-1 moves while they gain.

    Every set ``s`` refines its own ``weights[s]`` on its own data.
    """
    current = [w * REFINE_SCALE for w in weights]
    score = [scorer.moves([w], [(0, 0, 0)])[0][0][s] for s, w in enumerate(current)]
    active = list(range(len(current)))
    for _ in range(REFINE_ROUNDS):
        if not active:
            break
        bases, index = _unique_rows([current[s] for s in active])
        moves = [
            (b, c, sign)
            for b, w in enumerate(bases)
            for c in range(len(w))
            for sign in (1, -1)
            if w[c] + sign >= 0 and w.sum() + sign > 0
        ]
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


def _unique_rows(rows: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    keys = [tuple(row) for row in rows]
    unique = list(dict.fromkeys(keys))
    return [np.array(key, dtype=np.int64) for key in unique], [unique.index(key) for key in keys]
