"""``ek blend --oof`` for several classes, or the ``mean_dice`` metric: the search on arrays.

The procedure ``P(F)`` on a set of folds ``F`` (:func:`search_classes`):

1. weights: Caruana greedy forward selection on the mean Dice over (image, class) pairs
   (:class:`~.mean_dice.MeanDiceScorer`), each step scored at every class's best threshold
   and min-pixels. The weights are shared across classes; with ``per_class_weights`` a
   second option runs one selection per class (each class its own weights);
2. each class's threshold, min-pixels and min-component, chosen jointly and exactly on
   ``F`` (:func:`~.mean_dice.mean_dice_tables`, :func:`~.mean_dice.choose_per_class`);
3. the option (shared or per-class weights) by cross-validation inside ``F``, as
   :mod:`.nested` chooses the threshold mode: shared wins ties, and a set of one fold (K = 2)
   keeps the shared weights.

The final rule is ``P(all folds)``; the nested estimate scores ``P(all folds but k)`` on fold
``k``, every choice (the option included) made without it. The threshold mode is ``value``.
Step 3 needs ``P`` on the sets that leave out a pair of folds; with shared weights only there
is no option to choose, so only the ``K + 1`` sets of depth 1 are searched (the same result,
fewer greedy moves and tables: 6 sets instead of 16 at K = 5).

Metrics: ``mean_dice`` (each pair's dice, ``empty_score`` for a pair empty on both sides).
``global_dice`` with several classes is refused in one line (one class with global dice is
:func:`~.ensemble_search.search`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from ..errors import EkError
from .candidates import DEFAULT_FLOOR, Candidates, build_candidates
from .ensemble_search import MIN_COMPONENT_GRID, MIN_PIXELS_GRID, check_pool, with_zero
from .mean_dice import (
    MeanDiceChoice,
    MeanDiceScorer,
    MeanDiceTables,
    choose_per_class,
    class_candidates,
    heldout_sum,
    mean_dice_tables,
    mean_of,
    nested_mean_dice,
)
from .rule import BlendRule, ClassRule
from .selection import best_prefix_weights, greedy_paths
from .sets import FoldSets
from .sparse import class_of

log = logging.getLogger(__name__)

METRICS = ("global_dice", "mean_dice")
WEIGHT_OPTIONS = ("shared", "per_class")


@dataclass
class ClassSearchResult:
    """The final per-class choice, how it was reached, and the scores the report shows."""

    names: list[str]  # config names
    class_names: list[str]
    choice: MeanDiceChoice  # on all folds: weights (C, n_configs) and each class's choice
    option: str  # "shared" or "per_class" weights
    nested: dict  # per_fold, pooled, per_class, picked (option per fold), options
    per_config: dict[str, dict]  # each config alone: dice, per_fold, nested
    per_fold: list[float]  # the final choice on each fold (optimistic)
    no_postprocess: float  # the final weights' best mean dice without postprocessing
    path: list[tuple[int, float]]  # the shared greedy path on all folds
    floor: int
    empty_score: float

    @property
    def shared(self) -> bool:
        return self.option == "shared"


def search_classes(
    oofs: list[np.ndarray],
    labels: np.ndarray,
    folds: np.ndarray,
    steps: int = 25,
    names: list[str] | None = None,
    class_names: list[str] | None = None,
    metric: str = "mean_dice",
    empty_score: float = 1.0,
    per_class_weights: bool = False,
    floor: int = DEFAULT_FLOOR,
    grids: tuple[tuple[int, ...], tuple[int, ...]] = (MIN_PIXELS_GRID, MIN_COMPONENT_GRID),
) -> ClassSearchResult:
    """Choose weights and each class's threshold and postprocessing (see module docstring).

    Args:
        oofs: uint8 ``(N, C, H, W)`` OOF codes per config (``(N, H, W)``: one class).
        labels: uint8 0/1 shaped as the codes.
        folds: int ``(N,)`` fold of each image, ``0..K-1`` (K >= 2).
        steps: Greedy selection rounds (>= 1).
        names: Config names (default ``config_0``, ...).
        class_names: Class names (default ``class_0``, ...).
        metric: ``mean_dice`` (``global_dice`` is refused: for one class it is
            :func:`~.ensemble_search.search`).
        empty_score: Score of a pair empty in both truth and prediction.
        per_class_weights: Also try one selection per class, kept when cross-validation
            inside each set of folds prefers it.
        floor: uint8 code below which pixels are never predicted.
        grids: Min-pixel and min-component values tried (0 is always tried).
    """
    n_classes = 1 if labels.ndim == 3 else labels.shape[1]
    names = names or [f"config_{i}" for i in range(len(oofs))]
    class_names = class_names or [f"class_{c}" for c in range(n_classes)]
    _check(oofs, labels, folds, steps, metric, class_names)
    grids = (with_zero(grids[0]), with_zero(grids[1]))
    classes = class_candidates(oofs, labels, folds, floor)
    # the sets that leave out a pair of folds serve only the weight option's choice
    # (:func:`_pick`): with one option, nothing reads them, so they are not searched
    sets = FoldSets.nested(classes[0].n_folds, depth=2 if per_class_weights else 1)
    tables = _Tables(classes, grids, empty_score)
    shared_paths = greedy_paths(MeanDiceScorer(classes, sets, empty_score, grids[0]), steps)
    weights = {"shared": [_prefix(p, len(oofs), n_classes) for p in shared_paths]}
    if per_class_weights:
        weights["per_class"] = _per_class_weights(classes, sets, steps, empty_score, grids[0])
    choices = {
        option: [choose_per_class(tables.of(w), sets, s) for s, w in enumerate(rows)]
        for option, rows in weights.items()
    }
    nested, option = _nested(choices, sets, tables.fold_images)
    choice = choices[option][0]
    return ClassSearchResult(
        names,
        class_names,
        choice,
        option,
        nested,
        _per_config(tables, len(oofs), names),
        _per_fold(choice, tables.fold_images),
        _no_postprocess(tables.of(choice.weights)),
        shared_paths[0],
        classes[0].floor,
        float(empty_score),
    )


class _Tables:
    """:func:`mean_dice_tables` of each weight matrix tried, computed once."""

    def __init__(self, classes: list[Candidates], grids, empty_score: float):
        self.classes, self.grids, self.empty_score = classes, grids, empty_score
        self.fold_images = np.bincount(classes[0].folds, minlength=classes[0].n_folds)
        self.cache: dict[bytes, MeanDiceTables] = {}

    def of(self, weights: np.ndarray) -> MeanDiceTables:
        key = np.asarray(weights, dtype=np.int64).tobytes()
        if key not in self.cache:
            pixels, components = self.grids
            self.cache[key] = mean_dice_tables(
                self.classes, weights, pixels, components, self.empty_score
            )
        return self.cache[key]


def _prefix(path, n_configs: int, n_classes: int) -> np.ndarray:
    """The best prefix's counts as ``(C, n_configs)`` shared rows."""
    return np.tile(best_prefix_weights(path, n_configs), (n_classes, 1))


def _per_class_weights(classes, sets, steps, empty_score, pixel_grid) -> list[np.ndarray]:
    """One Caruana selection per class: ``(C, n_configs)`` weights on every set."""
    n_configs = classes[0].values.shape[0]
    per_class = [
        greedy_paths(MeanDiceScorer([cands], sets, empty_score, pixel_grid), steps)
        for cands in classes
    ]
    return [
        np.stack([best_prefix_weights(paths[s], n_configs) for paths in per_class])
        for s in range(len(sets))
    ]


def _nested(choices: dict[str, list[MeanDiceChoice]], sets: FoldSets, fold_images):
    """Nested estimate with the weight option chosen by cross-validation inside each set."""
    k_folds = sets.n_folds
    picked = [
        _pick(choices, sets, [j for j in range(k_folds) if j != k], k) for k in range(k_folds)
    ]
    fold_choices = [choices[picked[k]][sets.index(k)] for k in range(k_folds)]
    per_fold = [
        float(mean_of(heldout_sum(fold_choices[k], k), len(fold_choices[k].classes) * n))
        for k, n in enumerate(fold_images)
    ]
    pooled = float(
        mean_of(
            sum(heldout_sum(c, k) for k, c in enumerate(fold_choices)),
            len(fold_choices[0].classes) * int(np.sum(fold_images)),
        )
    )
    per_class = [
        float(
            mean_of(
                sum(int(c.classes[i].fold_sums[k]) for k, c in enumerate(fold_choices)),
                int(np.sum(fold_images)),
            )
        )
        for i in range(len(fold_choices[0].classes))
    ]
    options = {
        option: nested_mean_dice(rows, sets, fold_images)[0] for option, rows in choices.items()
    }
    final = _pick(choices, sets, list(range(k_folds)))
    nested = {"per_fold": per_fold, "pooled": pooled, "per_class": per_class}
    return nested | {"picked": picked, "options": options}, final


def _pick(choices, sets: FoldSets, inside: list[int], left_out: int | None = None) -> str:
    """The option whose choices, each made without one fold of ``inside``, score best on it."""
    if len(choices) == 1 or len(inside) < 2:
        return "shared"
    scores = {}
    for option, rows in choices.items():
        scored = [rows[sets.index(*([j] if left_out is None else [left_out, j]))] for j in inside]
        scores[option] = sum(heldout_sum(c, j) for c, j in zip(scored, inside))
    return max(WEIGHT_OPTIONS, key=lambda option: (scores.get(option, -1), option == "shared"))


def _per_config(tables: _Tables, n_configs: int, names: list[str]) -> dict[str, dict]:
    """Each config alone, each class at its best choice: pooled, per-fold and nested."""
    sets = FoldSets.nested(len(tables.fold_images), depth=1)
    scores = {}
    for i, name in enumerate(names):
        table = tables.of(np.eye(n_configs, dtype=np.int64)[i])
        choices = [choose_per_class(table, sets, s) for s in range(len(sets))]
        scores[name] = {
            "dice": choices[0].dice,
            "per_fold": _per_fold(choices[0], tables.fold_images),
            "nested": nested_mean_dice(choices, sets, tables.fold_images)[0],
        }
    return scores


def _per_fold(choice: MeanDiceChoice, fold_images) -> list[float]:
    n_classes = len(choice.classes)
    return [
        float(mean_of(heldout_sum(choice, k), n_classes * n)) for k, n in enumerate(fold_images)
    ]


def _no_postprocess(tables: MeanDiceTables) -> float:
    plain = replace(tables, sums=tables.sums[:, :1, :1], grids=((0,), (0,)))
    return choose_per_class(plain, FoldSets.nested(len(tables.fold_images), depth=1), 0).dice


def class_rule_of(result: ClassSearchResult, one_class: bool = False) -> BlendRule:
    """The rule a per-class search chose (``value`` mode).

    Args:
        result: The search.
        one_class: The OOF was ``(N, H, W)``: return the plain one-class rule.
    """
    rows = result.choice.weights
    shared = _named(result.names, rows[0])
    classes = tuple(
        ClassRule(
            name=name,
            threshold_sum=choice.threshold_sum,
            min_pixels=choice.min_pixels,
            min_component=choice.min_component,
            weights=None if result.shared else _named(result.names, rows[c]),
        )
        for c, (name, choice) in enumerate(zip(result.class_names, result.choice.classes))
    )
    if not result.shared:
        shared = _named(result.names, rows.sum(axis=0))  # every member: what submit loads
    rule = BlendRule(weights=shared, floor=int(result.floor), classes=classes)
    return rule.class_rule(0) if one_class else rule


def _named(names: list[str], weights: np.ndarray) -> dict[str, int]:
    return {name: int(w) for name, w in zip(names, weights) if w > 0}


def _check(oofs, labels, folds, steps, metric, class_names) -> None:
    if metric not in METRICS:
        raise EkError(f"metric: {metric!r} is not one of {METRICS}")
    if metric == "global_dice":  # one class: ensemble_search.search; several: not supported
        raise EkError("metric: global_dice with several classes is not supported; use mean_dice")
    if steps < 1:
        raise EkError(f"steps: {steps}; the greedy selection needs at least 1 round")
    check_pool(oofs, labels, folds)
    n_classes = 1 if labels.ndim == 3 else labels.shape[1]
    if len(class_names) != n_classes:
        raise EkError(f"class_names: {len(class_names)} names for {n_classes} classes")


def pair_dice_mean(
    rule: BlendRule,
    codes: dict[str, np.ndarray],
    labels: np.ndarray,
    empty_score: float = 1.0,
    batch: int = 256,
) -> tuple[float, list[float]]:
    """Mean dice over (image, class) pairs of the rule on a set, applied batch by batch as
    ``ek submit`` applies it (``value`` mode: each class's stored threshold).

    Returns:
        ``(mean over every pair, each class's mean over its images)``.
    """
    n_classes = 1 if labels.ndim == 3 else labels.shape[1]
    totals = np.zeros(n_classes)
    for lo in range(0, len(labels), batch):
        rows = slice(lo, lo + batch)
        predicted = rule.apply({n: np.asarray(c[rows]) for n, c in codes.items()})
        truth = np.asarray(labels[rows]) > 0
        if labels.ndim == 3:
            predicted, truth = predicted[:, None], truth[:, None]
        axes = (2, 3)
        tp = np.count_nonzero(predicted & truth, axis=axes)
        both = np.count_nonzero(predicted, axis=axes) + np.count_nonzero(truth, axis=axes)
        dice = np.where(both > 0, 2.0 * tp / np.maximum(both, 1), float(empty_score))
        totals += dice.sum(axis=0)
    per_class = totals / max(len(labels), 1)
    return float(per_class.mean()), [float(d) for d in per_class]


def holdout_thresholds(
    rule: BlendRule, codes: dict[str, np.ndarray], labels: np.ndarray, empty_score: float = 1.0
) -> BlendRule:
    """``--threshold-from holdout``: each class's threshold chosen on the holdout (one set of
    one fold), exact; weights and postprocessing stay the OOF's.

    Args:
        rule: The rule chosen on OOF (one class, or several).
        codes: Member name -> uint8 holdout codes, shaped as ``labels``.
        labels: uint8 ``(N, C, H, W)`` holdout labels (``(N, H, W)`` for a one-class rule).
        empty_score: Score of a pair empty in both truth and prediction.
    """
    if not rule.classes:
        own = ClassRule("mask", rule.threshold_sum, None, rule.min_pixels, rule.min_component)
        wrapped = replace(rule, classes=(own,))
        chosen = holdout_thresholds(
            wrapped,
            {n: np.asarray(c)[:, None] for n, c in codes.items()},
            np.asarray(labels)[:, None],
            empty_score,
        )
        return replace(
            rule, threshold_sum=chosen.classes[0].threshold_sum, threshold_from="holdout"
        )
    single = FoldSets.nested(1)
    classes = []
    for c, own in enumerate(rule.classes):
        weights = rule.class_rule(c).weights
        cands = build_candidates(
            [class_of(codes[name], c) for name in weights],
            class_of(labels, c),
            np.zeros(len(labels), dtype=np.int64),
            rule.floor,
        )
        grids = ((own.min_pixels,), (own.min_component,))
        tables = mean_dice_tables([cands], np.array(list(weights.values())), *grids, empty_score)
        threshold = choose_per_class(tables, single, 0).classes[0].threshold_sum
        classes.append(replace(own, threshold_sum=threshold))
    return replace(rule, classes=tuple(classes), threshold_from="holdout")


def class_score_fields(result: ClassSearchResult, folds: np.ndarray, metric: str) -> dict:
    """The ``scores`` section of ``blend.json`` for a per-class search (the holdout fields
    are filled later, when there is a holdout)."""
    choice = result.choice
    per_class = {
        name: {
            "dice": c.dice,
            "nested": result.nested["per_class"][i],
            "threshold": c.threshold_sum / (255.0 * int(choice.weights[i].sum())),
            "threshold_sum": c.threshold_sum,
            "min_pixels": c.min_pixels,
            "min_component": c.min_component,
            "holdout": None,
        }
        for i, (name, c) in enumerate(zip(result.class_names, choice.classes))
    }
    return {
        "metric": metric,
        "empty_score": result.empty_score,
        "weights": result.option,
        "per_class": per_class,
        "per_config": result.per_config,
        "blend_oof": choice.dice,
        "blend_oof_per_fold": result.per_fold,
        "blend_oof_no_postprocess": result.no_postprocess,
        "nested": result.nested,
        "holdout": None,
        "best_single": max(result.per_config, key=lambda n: result.per_config[n]["nested"]),
        "selection_path": [
            {"step": i + 1, "config": result.names[c], "dice": d}
            for i, (c, d) in enumerate(result.path)
        ],
        "search_floor": result.floor / 255.0,
        "n_records": int(len(folds)),
    }
