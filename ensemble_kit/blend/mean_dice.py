"""Mean Dice over (image, class) pairs in the blend search: exact per-class choices.

The metric: each (image, class) pair scores its dice, ``empty_score`` when it is empty in both
truth and prediction, and a set of folds scores the mean over all its pairs. Pixels the
sparse candidates dropped are predicted 0, but their positives count (each pair's positives
come from :attr:`Candidates.image_positives`).

Classes are independent under this metric: the mean over all pairs is the mean over classes
of each class's mean over images, so choosing each class's threshold and postprocessing on
its own is exact. For one pair, as the threshold ``t`` on the blend sum falls, its counts
change only at its candidates' values, so its dice is a step function of ``t``; the kernels
add each step to a difference array over the ``255 * sum(w) + 1`` thresholds, per (class,
fold), and a suffix sum gives every threshold's summed dice on every set of folds at once.
Dice values are fixed-point integers (:data:`~.kernels.MEAN_DICE_SCALE`), so sums are exact.

Arrays in, choices out: :class:`MeanDiceScorer` scores weight vectors for Caruana selection
(:func:`~.selection.greedy_paths`), :func:`mean_dice_tables` and :func:`choose_per_class`
choose each class's threshold jointly with min-pixels and min-component on a set of folds,
and :func:`heldout_sum` scores a choice on a fold it did not see (the nested estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from ..errors import EkError
from .candidates import DEFAULT_FLOOR, Candidates, build_candidates
from .kernels import (
    MEAN_DICE_SCALE,
    mean_dice_fold_sums,
    score_mean_dice_moves,
    suffix_sums,
)
from .sets import FoldSets
from .sparse import class_of
from .threshold import RankedChunk, ranked_chunks


def empty_fixed(empty_score: float) -> int:
    """The fixed-point score of a pair empty on both sides (``0 <= empty_score <= 1``)."""
    if not 0.0 <= float(empty_score) <= 1.0:
        raise EkError(f"empty_score: {empty_score}; must lie between 0 and 1")
    return int(round(float(empty_score) * MEAN_DICE_SCALE))


def class_candidates(
    oofs: list[np.ndarray], labels: np.ndarray, folds: np.ndarray, floor: int = DEFAULT_FLOOR
) -> list[Candidates]:
    """One :class:`Candidates` per class of ``(N, C, H, W)`` OOF codes and labels.

    ``(N, H, W)`` arrays are one class. Every class shares the folds, so sets of folds hold
    the same images in every class.
    """
    if labels.ndim == 3:
        return [build_candidates(oofs, labels, folds, floor)]
    return [
        build_candidates([class_of(oof, c) for oof in oofs], class_of(labels, c), folds, floor)
        for c in range(labels.shape[1])
    ]


@dataclass
class Pairs:
    """The candidates of every class stacked: one pair per (class, image), class-major."""

    values: np.ndarray  # uint8 (n_configs, P) codes of every class's candidates
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # labels, start, positives, group
    n_classes: int
    n_folds: int
    floor: int
    fold_images: np.ndarray  # int64 (K,) images per fold (the same in every class)

    @classmethod
    def stack(cls, classes: list[Candidates]) -> Pairs:
        """Stack per-class candidates; the group of a pair is ``class * K + fold``."""
        first = classes[0]
        for c, cands in enumerate(classes):
            if not np.array_equal(cands.folds, first.folds) or cands.floor != first.floor:
                raise EkError(f"class {c}: candidates on other folds or floor than class 0")
        counts = np.concatenate([np.diff(cands.image_start) for cands in classes])
        groups = [c * first.n_folds + cands.folds for c, cands in enumerate(classes)]
        arrays = (
            np.concatenate([cands.labels for cands in classes]),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            np.concatenate([cands.image_positives for cands in classes]).astype(np.int64),
            np.concatenate(groups).astype(np.int64),
        )
        values = np.concatenate([cands.values for cands in classes], axis=1)
        fold_images = np.bincount(first.folds, minlength=first.n_folds).astype(np.int64)
        return cls(values, arrays, len(classes), first.n_folds, first.floor, fold_images)


def set_images(sets: FoldSets, fold_images: np.ndarray) -> np.ndarray:
    """int64 ``(n_sets,)``: the images in each set of folds."""
    return np.array([fold_images[sets.members(s)].sum() for s in range(len(sets))], np.int64)


def mean_of(fixed_sums, n_pairs, empty_score: float = 1.0):
    """Mean dice of summed fixed-point dice over ``n_pairs`` pairs (``empty_score`` if none)."""
    n_pairs = np.asarray(n_pairs, dtype=np.float64)
    mean = np.asarray(fixed_sums, dtype=np.float64) / (MEAN_DICE_SCALE * np.maximum(n_pairs, 1))
    return np.where(n_pairs > 0, mean, float(empty_score))


class MeanDiceScorer:
    """Mean dice of integer weight vectors at each class's best threshold, on every set.

    The interface of :class:`~.scorer.Scorer`: ``moves(bases, moves)`` gives, per move, the
    score on every set of folds first (what :func:`~.selection.greedy_paths` and
    :func:`~.selection.refine_weights` read), then each class's best threshold and
    min-pixels (``(C, n_sets)`` each). The weights are shared across classes; for per-class
    weights give each class its own scorer (``MeanDiceScorer([class_cands[c]], ...)``): each
    then scores its class's mean dice, and the mean over classes is the mean of those.

    Args:
        classes: One :class:`Candidates` per class, on the same folds.
        sets: Sets of folds scored (default :meth:`FoldSets.nested`).
        empty_score: Score of a pair empty in both truth and prediction.
        pixel_grid: Min-pixel values searched jointly with each class's threshold (a pair's
            mask is dropped when it has fewer pixels); ``(0,)`` searches the threshold alone.
    """

    def __init__(
        self,
        classes: list[Candidates],
        sets: FoldSets | None = None,
        empty_score: float = 1.0,
        pixel_grid: tuple[int, ...] = (0,),
    ):
        self.classes = classes
        self.cands = classes[0]  # what the selection reads: the number of configs
        self.pairs = Pairs.stack(classes)
        self.sets = sets or FoldSets.nested(self.pairs.n_folds)
        self.empty_score = float(empty_score)
        self.empty_fixed = empty_fixed(empty_score)
        self.pixel_grid = np.array(sorted({0, *map(int, pixel_grid)}), dtype=np.int64)
        self.n_pairs = self.pairs.n_classes * set_images(self.sets, self.pairs.fold_images)
        self.cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def moves(self, bases: list[np.ndarray], moves: list[tuple[int, int, int]]) -> list[tuple]:
        """Scores of ``bases[b] + sign * e_config`` for each ``(b, config, sign)`` move."""
        keys = [
            tuple(int(w) for w in bases[b] + sign * np.eye(len(bases[b]), dtype=np.int64)[c])
            for b, c, sign in moves
        ]
        todo = [key for key in dict.fromkeys(keys) if key not in self.cache]
        if todo:
            self._evaluate(todo)
        return [self.cache[key] for key in keys]

    def score(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean dice (n_sets,), thresholds (C, n_sets), min_pixels (C, n_sets))``."""
        return self.moves([np.asarray(weights, dtype=np.int64)], [(0, 0, 0)])[0]

    def release(self) -> None:
        """Nothing to free: present so the scorer stands in for :class:`~.scorer.Scorer`."""

    def _evaluate(self, keys) -> None:
        pairs = self.pairs
        move_weights = np.array(keys, dtype=np.int64).reshape(len(keys), -1)
        totals = move_weights.sum(axis=1)
        sums, thresholds, caps = score_mean_dice_moves(
            move_weights,
            pairs.values,
            pairs.floor * totals,
            pairs.arrays,
            self.pixel_grid,
            pairs.n_classes * pairs.n_folds,
            pairs.n_folds,
            self.sets.excluded,
            255 * int(totals.max()) + 1,
            self.empty_fixed,
            numba.get_num_threads(),
        )
        dice = mean_of(sums.sum(axis=1), self.n_pairs, self.empty_score)
        for i, key in enumerate(keys):
            self.cache[key] = (dice[i], thresholds[i], self.pixel_grid[caps[i]])


@dataclass
class MeanDiceTables:
    """Every class's summed fixed-point dice per (min-pixels, min-component, fold, threshold)."""

    sums: np.ndarray  # int64 (C, A, B, K, T); thresholds past a class's n_values are unused
    weights: np.ndarray  # int64 (C, n_configs)
    lowest: np.ndarray  # int64 (C,) the floor of each class's sum: floor * sum(weights)
    n_values: np.ndarray  # int64 (C,) 255 * sum(weights) + 1: the "predict nothing" threshold
    grids: tuple[tuple[int, ...], tuple[int, ...]]  # the (min_pixels, min_component) tried
    fold_images: np.ndarray  # int64 (K,)
    empty_score: float


def class_weights(weights: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 ``(C, n_configs)``: shared ``(n_configs,)`` weights repeated, or per-class rows."""
    weights = np.asarray(weights, dtype=np.int64)
    rows = np.tile(weights, (n_classes, 1)) if weights.ndim == 1 else weights
    if rows.shape[0] != n_classes or (rows < 0).any() or (rows.sum(axis=1) == 0).any():
        raise EkError(f"weights {weights.tolist()}: need >= 0, not all 0, for {n_classes} classes")
    return rows


def mean_dice_tables(
    classes: list[Candidates],
    weights: np.ndarray,
    pixel_grid=(0,),
    component_grid=(0,),
    empty_score: float = 1.0,
) -> MeanDiceTables:
    """Each class's dice of every (min-pixels, min-component) pair at every threshold, per fold.

    Args:
        classes: One :class:`Candidates` per class, on the same folds.
        weights: int ``(n_configs,)`` shared by every class, or ``(C, n_configs)`` per class.
        pixel_grid: Min-pixel values (a pair's mask is dropped below that many pixels).
        component_grid: Min-component values (8-connected components below that size are
            dropped, after min-pixels).
        empty_score: Score of a pair empty in both truth and prediction.
    """
    rows = class_weights(weights, len(classes))
    grids = (tuple(int(n) for n in pixel_grid), tuple(int(m) for m in component_grid))
    n_values = 255 * rows.sum(axis=1) + 1
    sums = np.zeros(
        (len(classes), len(grids[0]), len(grids[1]), classes[0].n_folds, int(n_values.max()) + 1),
        dtype=np.int64,
    )
    fixed = empty_fixed(empty_score)
    for c, cands in enumerate(classes):
        sums[c, ..., : n_values[c] + 1] = _class_sums(cands, rows[c], grids, fixed)
    fold_images = np.bincount(classes[0].folds, minlength=classes[0].n_folds).astype(np.int64)
    lowest = classes[0].floor * rows.sum(axis=1)
    return MeanDiceTables(sums, rows, lowest, n_values, grids, fold_images, float(empty_score))


def _class_sums(cands: Candidates, weights: np.ndarray, grids, fixed: int) -> np.ndarray:
    """int64 ``(A, B, K, n_values + 1)`` summed fixed-point dice of one class.

    A chunk of images at a time (:func:`~.threshold.ranked_chunks`): the per-pixel state
    (blend sums, order, neighbour table, component levels) is one chunk's; the per-fold
    differences add up across chunks.
    """
    total = int(weights.sum())
    n_values = 255 * total + 1
    delta = np.zeros((len(grids[0]), len(grids[1]), cands.n_folds, n_values + 1), np.int64)
    for chunk in ranked_chunks(cands, weights, grids):
        delta += _chunk_deltas(cands, chunk, grids[1], total, fixed)
    return suffix_sums(delta)


def _chunk_deltas(
    cands: Candidates, chunk: RankedChunk, component_grid, total: int, fixed: int
) -> np.ndarray:
    """:func:`_class_sums`' differences for one chunk's images (a pair's dice does not
    depend on the order of its pixels)."""
    lo, hi = chunk.images
    labels, sums, kept = chunk.take(cands.labels), chunk.sums, chunk.kept
    out = np.empty((len(chunk.cuts), len(component_grid), cands.n_folds, 255 * total + 2), np.int64)
    for j, size in enumerate(component_grid):
        levels = (
            sums if kept is None or size <= 1 else np.minimum(sums, kept[chunk.sizes.index(size)])
        )
        out[:, j] = mean_dice_fold_sums(
            levels,
            labels,
            chunk.image_start,
            cands.image_positives[lo:hi],
            cands.folds[lo:hi],
            chunk.cuts,
            cands.n_folds,
            cands.floor * total,
            255 * total + 1,
            fixed,
            numba.get_num_threads(),
        )
    return out


@dataclass
class ClassChoice:
    """One class's threshold and postprocessing, chosen on one set of folds."""

    threshold_sum: int
    min_pixels: int
    min_component: int
    dice: float  # the class's mean dice over the set's images
    fold_sums: np.ndarray  # int64 (K,) summed fixed-point dice of each fold at this choice


@dataclass
class MeanDiceChoice:
    """Weights and every class's choice on one set; ``dice`` is the mean over its pairs."""

    weights: np.ndarray  # int64 (C, n_configs)
    classes: list[ClassChoice]
    dice: float


def choose_per_class(tables: MeanDiceTables, sets: FoldSets, set_index: int) -> MeanDiceChoice:
    """Each class's best (threshold, min-pixels, min-component) on one set of folds.

    Exact over every threshold ``>= floor * sum(w)``; ties go to the first postprocessing
    pair in grid order (so a value is kept only when it strictly improves), then to the
    smallest threshold.
    """
    members = sets.members(set_index)
    n_images = int(tables.fold_images[members].sum())
    classes = []
    for c in range(len(tables.sums)):
        lowest, top = int(tables.lowest[c]), int(tables.n_values[c]) + 1
        in_set = tables.sums[c][:, :, members].sum(axis=2)[:, :, lowest:top]
        a, b, t = np.unravel_index(int(np.argmax(in_set)), in_set.shape)
        fold_sums = tables.sums[c, a, b, :, lowest + t]
        classes.append(
            ClassChoice(
                int(lowest + t),
                tables.grids[0][a],
                tables.grids[1][b],
                float(mean_of(in_set[a, b, t], n_images, tables.empty_score)),
                fold_sums.copy(),
            )
        )
    total = sum(int(choice.fold_sums[members].sum()) for choice in classes)
    dice = float(mean_of(total, n_images * len(classes), tables.empty_score))
    return MeanDiceChoice(tables.weights, classes, dice)


def heldout_sum(choice: MeanDiceChoice, fold: int) -> int:
    """Summed fixed-point dice of a choice over every pair of ``fold`` (all classes).

    Pooled over folds and divided by :data:`~.kernels.MEAN_DICE_SCALE` times the pairs
    (:func:`mean_of`), this is the nested estimate of mean dice.
    """
    return sum(int(c.fold_sums[fold]) for c in choice.classes)


def nested_mean_dice(
    choices: list[MeanDiceChoice], sets: FoldSets, fold_images: np.ndarray
) -> tuple[float, list[float]]:
    """The nested estimate: on each fold ``k``, the choice made on the set without ``k``.

    Args:
        choices: The choice on each set of ``sets`` (index ``s`` made on set ``s``).
        sets: The sets of folds (:meth:`FoldSets.nested`).
        fold_images: int ``(K,)`` images per fold (:attr:`MeanDiceTables.fold_images`).

    Returns:
        ``(pooled, per_fold)``: the mean dice over every pair of every fold, each pair scored
        by a choice that did not see it, and the same per fold.
    """
    n_classes = len(choices[0].classes)
    sums = [heldout_sum(choices[sets.index(k)], k) for k in range(sets.n_folds)]
    per_fold = [float(mean_of(total, n_classes * fold_images[k])) for k, total in enumerate(sums)]
    return float(mean_of(sum(sums), n_classes * int(np.sum(fold_images)))), per_fold
