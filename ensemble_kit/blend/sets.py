"""The sets of folds a nested search chooses on.

Set 0 holds every fold, set ``k + 1`` every fold but ``k``; with three folds or more, the sets
that leave out a pair of folds follow. The pair sets let every choice the search makes on a
K-1-fold set (threshold mode, refinement) be made by cross-validation inside that set, so the
fold left out of it is never looked at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FoldSets:
    """Sets of folds, each given by the (at most two) folds it leaves out."""

    n_folds: int
    excluded: np.ndarray  # int64 (n_sets, 2): folds left out of each set, -1 for none
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for s, row in enumerate(self.excluded):
            self._index[frozenset(int(k) for k in row if k >= 0)] = s

    @classmethod
    def nested(cls, n_folds: int, depth: int = 2) -> FoldSets:
        """All folds, each fold left out and, when ``depth == 2`` and K >= 3, each pair left out."""
        rows = [(-1, -1)] + [(k, -1) for k in range(n_folds)]
        if depth >= 2 and n_folds >= 3:
            rows += [(k, j) for k in range(n_folds) for j in range(k + 1, n_folds)]
        return cls(n_folds, np.array(rows, dtype=np.int64).reshape(-1, 2))

    def __len__(self) -> int:
        return len(self.excluded)

    def index(self, *left_out: int) -> int:
        """The set that leaves out exactly these folds."""
        return self._index[frozenset(left_out)]

    def members(self, set_index: int) -> np.ndarray:
        """bool ``(K,)``: the folds in a set."""
        keep = np.ones(self.n_folds, dtype=bool)
        keep[[k for k in self.excluded[set_index] if k >= 0]] = False
        return keep
