"""The threshold on the holdout: its own best one, and one chosen there, honestly estimated.

OOF rows each come from one fold model; holdout (and test) rows are the mean of K fold
models, whose probabilities are less spread out, so the best threshold can move. For the
blend's weights and postprocessing (chosen on OOF), :func:`check_holdout` gives

- the holdout's own best threshold and its dice, beside the dice of the threshold rule
  chosen on OOF (``value``: the same sum; ``top_fraction``: the same fraction of pixels);
- with ``crossfit``, the honest estimate of choosing the threshold on the holdout
  (``ek blend --threshold-from holdout``): the holdout is split into random halves
  ``CROSSFIT_REPEATS`` times (seeded); each half's best threshold is scored on the other
  half, the two halves' counts are pooled into one dice per split.

Arrays in, numbers out; the search floor and :func:`~.rule.fraction_threshold` rule apply.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..metrics import dice_from_counts
from .candidates import DEFAULT_FLOOR, build_candidates, regroup
from .sets import FoldSets
from .threshold import (
    Choice,
    applied_threshold,
    choose_threshold,
    heldout_counts,
    threshold_tables,
)

CROSSFIT_REPEATS = 10
CROSSFIT_SEED = 0


@dataclass
class HoldoutCheck:
    """Thresholds and dice of a blend on the holdout (``*_sum``: thresholds on ``S``)."""

    best_threshold_sum: int  # the holdout's own best threshold (optimistic)
    best_dice: float
    best_top_fraction: float  # fraction of holdout pixels at or above it
    rule_threshold_sum: int  # where the OOF choice lands on the holdout
    rule_dice: float  # dice there: an honest holdout score of the OOF threshold
    crossfit: list[float] | None  # per random halving: dice of the holdout-chosen threshold

    @property
    def gap(self) -> float:
        return self.best_dice - self.rule_dice


def check_holdout(
    codes: list[np.ndarray],
    labels: np.ndarray,
    choice: Choice,
    mode: str,
    floor: int = DEFAULT_FLOOR,
    crossfit: bool = False,
    repeats: int = CROSSFIT_REPEATS,
    seed: int = CROSSFIT_SEED,
) -> HoldoutCheck:
    """Best holdout threshold of ``choice``'s weights and postprocessing; its OOF rule's dice.

    Args:
        codes: uint8 ``(M, H, W)`` holdout codes, one per entry of ``choice.weights``.
        labels: uint8 0/1 ``(M, H, W)``.
        choice: The blend chosen on OOF (weights, threshold, top fraction, postprocessing).
        mode: ``value`` or ``top_fraction``: how the OOF threshold is carried over.
        floor: The search floor (uint8 code).
        crossfit: Also estimate a threshold chosen on the holdout by random halvings.
        repeats: Random halvings.
        seed: Seed of the halvings.
    """
    cands = build_candidates(codes, labels, np.zeros(len(labels), dtype=np.int64), floor)
    grids = ((choice.min_pixels,), (choice.min_component,))
    sets = FoldSets.nested(1, depth=1)
    tables = threshold_tables(cands, choice.weights, grids[0], grids[1], sets)
    best = choose_threshold(cands, choice.weights, 0, grids[0], grids[1], tables, sets)
    rule = replace(best, threshold_sum=choice.threshold_sum, top_fraction=choice.top_fraction)
    counts = _counts(cands, rule, 0, mode)
    lowest = cands.floor * int(choice.weights.sum())
    rule_sum = applied_threshold(rule, 0, mode, lowest, int(cands.fold_pixels[0]))
    splits = None
    if crossfit:
        splits = [
            _crossfit_once(cands, choice, grids, mode, halves)
            for halves in random_halves(len(labels), repeats, seed)
        ]
    return HoldoutCheck(
        best.threshold_sum,
        best.dice,
        best.top_fraction,
        rule_sum,
        dice_from_counts(*counts),
        splits,
    )


def random_halves(n_images: int, repeats: int, seed: int) -> list[np.ndarray]:
    """``repeats`` random splits of the images into halves: 0 or 1 per image."""
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(repeats):
        halves = np.zeros(n_images, dtype=np.int64)
        halves[rng.permutation(n_images)[n_images // 2 :]] = 1
        splits.append(halves)
    return splits


def _crossfit_once(cands, choice: Choice, grids, mode: str, halves: np.ndarray) -> float:
    """Choose on one half, score on the other, both ways; the pooled dice."""
    split = regroup(cands, halves)
    sets = FoldSets.nested(2, depth=1)
    tables = threshold_tables(split, choice.weights, grids[0], grids[1], sets)
    total = np.zeros(3, dtype=np.int64)
    for scored in (0, 1):
        chosen = choose_threshold(
            split, choice.weights, sets.index(scored), grids[0], grids[1], tables, sets
        )
        total += np.array(_counts(split, chosen, scored, mode))
    return dice_from_counts(*total)


def _counts(cands, choice: Choice, fold: int, mode: str) -> tuple[int, int, int]:
    lowest = cands.floor * int(choice.weights.sum())
    pixels, positives = int(cands.fold_pixels[fold]), int(cands.fold_positives[fold])
    return heldout_counts(choice, fold, mode, lowest, pixels, positives)
