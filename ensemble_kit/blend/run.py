"""``ek blend --oof`` on a workdir: read OOF pool and labels, search, write blend.json, report."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.cache import LabelReader
from ..data.sources import changed_sources
from ..errors import EkError
from ..files import atomic_path, digest_json, exclusive_lock, staged_folder
from ..layout import Layout
from ..metrics import dice_from_counts
from ..oof import read_ids, read_oof
from ..task import workdir_task
from . import report
from .class_search import (
    METRICS,
    class_rule_of,
    class_score_fields,
    holdout_thresholds,
    pair_dice_mean,
    search_classes,
)
from .ensemble_search import SearchResult, search
from .gallery import write_gallery
from .holdout import CROSSFIT_SEED, check_holdout
from .rule import THRESHOLD_SOURCES, BlendFile, BlendRule
from .sparse import floor_pool
from .verify import member_digest

log = logging.getLogger(__name__)


GAP_WARNING = 0.005  # holdout's best dice above the OOF threshold's: warn past this
PROJECTED_RECORDS = 2000  # about the hidden test set's size


def run_blend(
    layout,
    data_root: Path | None = None,
    configs: list[str] | None = None,
    steps: int = 25,
    refine: bool = False,
    max_seconds_per_record: float | None = None,
    threshold_from: str = "oof",
    *,
    metric: str | None = None,
    empty_score: float | None = None,
    class_names: list[str] | None = None,
    per_class_weights: bool = False,
    labels: np.ndarray | None = None,
    holdout_labels: np.ndarray | None = None,
) -> BlendFile:
    """``ek blend --oof``: search on every finished config's OOF, write blend.json and a report.

    OOF of several classes (uint8 ``(N, C, H, W)``), or ``metric="mean_dice"``, take the
    per-class search (:mod:`.class_search`): shared weights (per-class weights as an option),
    each class's threshold, min-pixels and min-component.

    Args:
        layout: The workdir :class:`~ensemble_kit.layout.Layout`.
        data_root: Kaggle data folder with the labels; default: ``splits.json``'s data_root.
        configs: Config names to pool; default every config with a ``summary.json``.
        steps: Greedy selection rounds (>= 1).
        refine: Try an integer coordinate refinement of the weights.
        max_seconds_per_record: Only ensembles whose summed prediction cost (each blended
            config's ``prediction_cost`` in its summary.json) fits; None: no limit.
        threshold_from: ``oof`` (default) or ``holdout``: where the threshold (and top
            fraction) is chosen; weights and postprocessing always come from OOF.
        metric: ``global_dice`` or ``mean_dice``; None: the workdir task's (``folds/task.yaml``;
            contrails: global dice) for one class, mean dice for several.
        empty_score: Score of a pair empty in both truth and prediction (mean dice); None:
            the task's.
        class_names: Class names; None: the task's when the OOF has its classes.
        per_class_weights: Also try one weight selection per class (mean dice), kept when
            the nested cross-validation prefers it.
        labels: uint8 labels of the OOF records in OOF order; default: read from the data
            (the task's label cache).
        holdout_labels: The same for the holdout records.

    Returns:
        The :class:`~.rule.BlendFile` written to ``layout.blend_json``: the rule, its scores,
        cost and digests.
    """
    if steps < 1:
        raise EkError(f"--steps {steps}: the greedy selection needs at least 1 round")
    task = workdir_task(layout)
    empty = task.empty_score if empty_score is None else empty_score
    names = class_names or (list(task.classes) if task.n_classes > 1 else None)
    classes = ClassOptions(metric, empty, names, per_class_weights, task.metric)
    with exclusive_lock(layout.blend_lock, "ek blend"):
        return _run_blend_locked(
            layout, data_root, configs, steps, refine, max_seconds_per_record, threshold_from,
            classes, labels, holdout_labels,
        )  # fmt: skip


def _run_blend_locked(
    layout, data_root, configs, steps, refine, max_seconds_per_record, threshold_from,
    classes, labels, holdout_labels,
) -> BlendFile:  # fmt: skip
    pool = _read_pool(layout, configs)
    _check_threshold_source(layout, pool[0], threshold_from)
    costs = _read_costs(layout, pool, required=max_seconds_per_record is not None)
    splits = _read_splits(layout)
    data_root = Path(data_root) if data_root is not None else _splits_data_root(layout)
    _check_sources(layout, pool, data_root)
    first = pool[0]
    metric = classes.metric or (classes.task_metric if first.probs.ndim == 3 else "mean_dice")
    if first.probs.ndim == 4 or metric == "mean_dice":
        if refine:
            log.warning("blend: --refine is not searched per class; the greedy weights are kept")
        options = replace(classes, metric=metric or "mean_dice")
        inputs = (labels, holdout_labels, costs, max_seconds_per_record)
        return _run_class_blend(
            layout, data_root, pool, splits, steps, threshold_from, options, inputs
        )
    if metric not in (None, "global_dice"):
        raise EkError(f"metric: {metric!r} is not one of {METRICS}")
    if labels is None:
        labels = _load_labels(layout, data_root, first.ids, splits)
    log.info("blend: %d configs, %d OOF records", len(pool), len(first.ids))
    known = (
        None
        if any(c is None for c in costs.values())
        else np.array([costs[o.name] for o in pool], dtype=np.float64)
    )
    result = search(
        [o.probs for o in pool],
        labels,
        first.folds,
        steps,
        refine,
        [o.name for o in pool],
        costs=known,
        max_cost=max_seconds_per_record,
    )
    rule = rule_of(result)
    scores = score_fields(result, first.folds)
    cost = _cost_fields(pool, costs, rule, max_seconds_per_record)
    rule = _holdout_scores(
        layout, data_root, rule, scores, result, pool, splits, threshold_from, holdout_labels
    )
    blend = BlendFile(rule, scores, cost, _digests(layout, pool))
    write_blend_outputs(
        layout, blend, lambda staged: _write_report(staged, data_root, blend, result, pool, labels)
    )
    log.info("blend: wrote %s (nested dice %.4f)", layout.blend_json, scores["nested"]["pooled"])
    return blend


@dataclass(frozen=True)
class StagedBlendLayout(Layout):
    """The workdir's layout with the blend's report folder and ``blend.json`` at staged
    paths, so the report and gallery are written where :func:`write_blend_outputs` says."""

    report_dir: Path = Path()
    blend_file: Path = Path()

    @property
    def blend_report_dir(self) -> Path:
        return self.report_dir

    @property
    def blend_json(self) -> Path:
        return self.blend_file


def write_blend_outputs(layout: Layout, blend: BlendFile, write_report) -> None:
    """Write ``blend.json`` and the report folder so a kill never pairs one with the other's
    predecessor: ``write_report(staged_layout)`` fills a staged ``blend/`` (report, plots,
    gallery; ``blend.json`` at a temporary name), the folder is swapped in, and ``blend.json``
    is renamed into place last, so ``ek submit`` never uses a blend whose report is missing.
    """
    with atomic_path(layout.blend_json) as blend_tmp:
        blend.save(blend_tmp)
        with staged_folder(layout.blend_report_dir) as report_dir:
            write_report(StagedBlendLayout(layout.workdir, report_dir, blend_tmp))


def _write_report(staged: Layout, data_root, blend: BlendFile, result, pool, labels) -> None:
    report.write_blend_report(staged.blend_report_dir, blend, result.curves)
    write_gallery(staged, data_root, blend.rule, pool, labels)


def skipped_configs(layout: Layout) -> list[str]:
    """One line per config folder ``ek blend`` skips (no ``summary.json``), saying why."""
    lines = []
    for name in layout.config_names():
        if layout.summary(name).is_file():
            continue
        folds = sorted(layout.config_dir(name).glob("fold_*"))
        done = sum((fold / "DONE").is_file() for fold in folds)
        lines.append(
            f"skipped {name}: no summary.json ({done} of {len(folds) or '?'} folds done); "
            "finish it with ek cv"
        )
    return lines


@dataclass(frozen=True)
class ClassOptions:
    """The task's side of a per-class blend: metric, empty score, class names, weights."""

    metric: str | None = "mean_dice"
    empty_score: float = 1.0
    class_names: list[str] | None = None
    per_class_weights: bool = False
    task_metric: str = "global_dice"  # the workdir task's, where ``metric`` is None


def _run_class_blend(
    layout, data_root, pool, splits, steps, threshold_from, options: ClassOptions, inputs
) -> BlendFile:
    """The per-class ``ek blend --oof``: search, rule, holdout, blend.json and report."""
    labels, holdout_labels, costs, limit = inputs
    metric = options.metric or "mean_dice"
    first = pool[0]
    if limit is not None:
        raise EkError("--max-seconds-per-record: not supported yet with several classes")
    if labels is None:
        labels = _class_labels(layout, data_root, first, first.ids, splits)
    log.info("blend: %d configs, %d OOF records, per class", len(pool), len(first.ids))
    result = search_classes(
        [o.probs for o in pool],
        labels,
        first.folds,
        steps,
        [o.name for o in pool],
        options.class_names,
        metric,
        options.empty_score,
        options.per_class_weights,
    )
    rule = class_rule_of(result, one_class=first.probs.ndim == 3)
    scores = class_score_fields(result, first.folds, metric)
    chosen = [o for o in pool if o.name in rule.members]
    if chosen[0].holdout is not None and chosen[0].holdout_ids:
        if holdout_labels is None:
            holdout_labels = _class_labels(layout, data_root, first, first.holdout_ids, splits)
        codes = {o.name: o.holdout for o in chosen}
        if threshold_from == "holdout":
            rule = holdout_thresholds(rule, codes, holdout_labels, options.empty_score)
        _class_holdout(scores, rule, codes, holdout_labels, options.empty_score)
    blend = BlendFile(rule, scores, _cost_fields(pool, costs, rule, limit), _digests(layout, pool))
    write_blend_outputs(
        layout, blend, lambda staged: report.write_class_report(staged.blend_report_dir, blend)
    )
    log.info("blend: no gallery for several classes or mean dice (not drawn yet)")
    log.info("blend: wrote %s (nested mean dice %.4f)", layout.blend_json, result.nested["pooled"])
    return blend


def _class_labels(layout, data_root, first, ids, splits) -> np.ndarray:
    labels = _load_labels(layout, data_root, ids, splits)
    if labels.shape[1:] != first.probs.shape[1:]:
        raise EkError(
            f"{layout.oof_npy(first.name)}: records of shape {first.probs.shape[1:]}, but the "
            f"task's labels are {labels.shape[1:]}; rerun ek cv for this task"
        )
    return labels


def _class_holdout(scores: dict, rule: BlendRule, codes, labels, empty_score: float) -> None:
    """The task metric of the rule on the holdout, applied as ``ek submit`` applies it."""
    mean, per_class = pair_dice_mean(rule, codes, labels, empty_score)
    scores["holdout"] = mean
    applied = [c.threshold_sum for c in rule.classes] or [rule.threshold_sum]
    for name, dice, threshold in zip(scores["per_class"], per_class, applied):
        scores["per_class"][name]["holdout"] = dice
        scores["per_class"][name]["threshold_sum_applied"] = threshold


def rule_of(result: SearchResult) -> BlendRule:
    """The rule a search chose on OOF."""
    choice = result.choice
    return BlendRule(
        weights={name: int(w) for name, w in zip(result.names, choice.weights) if w > 0},
        mode=result.mode,
        threshold_sum=int(choice.threshold_sum),
        top_fraction=choice.top_fraction if result.mode == "top_fraction" else None,
        floor=int(result.floor),
        min_pixels=int(choice.min_pixels),
        min_component=int(choice.min_component),
        threshold_from="oof",
    )


def score_fields(result: SearchResult, folds: np.ndarray) -> dict[str, Any]:
    """The ``scores`` section of ``blend.json``: how the OOF choice scored, and how it was
    reached (the holdout fields are filled later, when there is a holdout)."""
    choice, names, nested = result.choice, result.names, result.nested
    options = nested.option_scores()
    suffix = "+refine" if nested.refined else ""
    scores = {
        "per_config": result.per_config,
        "blend_oof": choice.dice,
        "blend_oof_per_fold": result.per_fold,
        "blend_oof_no_postprocess": float(choice.table[0, 0]),
        "nested": {
            "per_fold": nested.per_fold(),
            "pooled": nested.pooled(),
            "picked": [o.label for o in nested.picked],
            "options": options,
            "value": options["value" + suffix],
            "top_fraction": options["top_fraction" + suffix],
        },
        "holdout": None,
        "holdout_threshold": None,
        "holdout_crossfit": None,
        "best_single": max(result.per_config, key=lambda n: result.per_config[n]["nested"]),
        "selection_path": [
            {"step": i + 1, "config": names[c], "dice": d} for i, (c, d) in enumerate(nested.path)
        ],
        "min_pixels_curve": {
            str(n): float(d) for n, d in zip(choice.grids[0], choice.table.max(axis=1))
        },
        "refined": nested.refined,
        "oof_threshold": result.threshold,
        "oof_threshold_sum": int(choice.threshold_sum),
        "oof_top_fraction": choice.top_fraction,
        "search_floor": result.floor / 255.0,
        "n_records": int(len(folds)),
    }
    return scores


def _check_sources(layout, pool, data_root: Path) -> None:
    """Refuse OOF whose data files (a summary's ``sources``) changed since ``ek cv``."""
    memo: dict = {}
    for oof in pool:
        changed = changed_sources(data_root, oof.summary.get("sources") or {}, memo)
        if changed:
            raise EkError(
                f"stale OOF: {layout.summary(oof.name)} was made before {changed[0]} changed; "
                "rerun ek cv (it says what has to be retrained)"
            )


def _check_threshold_source(layout, first, threshold_from: str) -> None:
    if threshold_from not in THRESHOLD_SOURCES:
        raise EkError(f"--threshold-from {threshold_from}: expected one of {THRESHOLD_SOURCES}")
    if threshold_from == "holdout" and (first.holdout is None or not first.holdout_ids):
        raise EkError(
            f"{layout.holdout_npy(first.name)}: --threshold-from holdout needs holdout "
            "predictions (splits made with --pool-validation have none)"
        )


def _read_costs(layout, pool, required: bool) -> dict[str, float | None]:
    """Each config's measured seconds per record (all folds, its TTA), from summary.json."""
    costs = {}
    for oof in pool:
        cost = (oof.summary.get("prediction_cost") or {}).get("seconds_per_record")
        if cost is None and required:
            raise EkError(
                f"{layout.summary(oof.name)}: no prediction_cost (its folds were trained by an "
                "older ek cv); retrain them, or blend without --max-seconds-per-record"
            )
        costs[oof.name] = None if cost is None else float(cost)
    return costs


def _cost_fields(pool, costs: dict, rule: BlendRule, limit: float | None) -> dict:
    chosen = [costs[name] for name in rule.weights]
    total = None if any(c is None for c in chosen) else float(sum(chosen))
    return {
        "seconds_per_record": total,
        "seconds_for_2000_records": None if total is None else total * PROJECTED_RECORDS,
        "max_seconds_per_record": limit,
        "per_config": costs,
        "devices": {o.name: (o.summary.get("prediction_cost") or {}).get("device") for o in pool},
    }


def _holdout_scores(
    layout, data_root, rule: BlendRule, scores: dict, result, pool, splits, threshold_from, labels
) -> BlendRule:
    """Fill the holdout scores; returns the rule, with the holdout's threshold when
    ``threshold_from == "holdout"``."""
    chosen = [o for o in pool if o.name in rule.weights]
    if any(o.holdout is None for o in chosen) or not chosen[0].holdout_ids:
        return rule
    if labels is None:
        labels = _load_labels(layout, data_root, chosen[0].holdout_ids, splits)
    check = check_holdout(
        [o.holdout for o in chosen],
        labels,
        _chosen_only(result, rule),
        result.mode,
        result.floor,
        crossfit=threshold_from == "holdout",
    )
    scores["holdout_threshold"] = {
        "best_threshold": check.best_threshold_sum / (255.0 * rule.weight_total),
        "best_threshold_sum": check.best_threshold_sum,
        "best_top_fraction": check.best_top_fraction,
        "best_dice": check.best_dice,
        "dice_at_oof_threshold": check.rule_dice,
        "oof_threshold_sum_applied": check.rule_threshold_sum,
        "gap": check.gap,
        "warning": check.gap > GAP_WARNING,
        "warning_above": GAP_WARNING,
    }
    if check.gap > GAP_WARNING:
        log.warning(
            "blend: the holdout's best threshold scores %.4f, the OOF threshold %.4f "
            "(gap %.4f > %.3f)%s",
            check.best_dice,
            check.rule_dice,
            check.gap,
            GAP_WARNING,
            "; consider --threshold-from holdout" if threshold_from == "oof" else "",
        )
    if threshold_from == "holdout":
        rule = _use_holdout_threshold(rule, scores, check)
    scores["holdout"] = holdout_dice(rule, {o.name: o.holdout for o in chosen}, labels)
    return rule


def _chosen_only(result: SearchResult, rule: BlendRule):
    keep = [result.names.index(name) for name in rule.weights]
    return replace(result.choice, weights=result.choice.weights[keep])


def _use_holdout_threshold(rule: BlendRule, scores: dict, check) -> BlendRule:
    splits = np.array(check.crossfit)
    scores["holdout_crossfit"] = {
        "mean": float(splits.mean()),
        "std": float(splits.std(ddof=1)) if len(splits) > 1 else 0.0,
        "per_split": [float(d) for d in splits],
        "seed": CROSSFIT_SEED,
    }
    return replace(
        rule,
        threshold_from="holdout",
        threshold_sum=int(check.best_threshold_sum),
        top_fraction=check.best_top_fraction if rule.mode == "top_fraction" else None,
    )


def _digests(layout, pool) -> dict:
    return {
        "splits": pool[0].summary.get("splits_digest"),
        "sources": {o.name: digest_json(o.summary.get("sources")) for o in pool},
        "oof": {o.name: member_digest(layout.oof_npy(o.name)) for o in pool},
        "holdout": {
            o.name: member_digest(layout.holdout_npy(o.name)) for o in pool if o.holdout is not None
        },
    }


def _read_pool(layout, configs: list[str] | None) -> list:
    if configs is None:
        for line in skipped_configs(layout):
            log.warning("blend: %s", line)
        workdir = layout.workdir
        names = (
            sorted(p.name for p in workdir.iterdir() if layout.summary(p.name).is_file())
            if workdir.is_dir()
            else []
        )
    else:
        names = list(configs)
    if not names:
        raise EkError(
            f"{layout.workdir}: no finished configs (no <config>/summary.json); run `ek cv` first"
        )
    pool = [read_oof(layout, name) for name in names]
    first = pool[0]
    for other in pool[1:]:
        _check_same(layout, first, other)
    return floor_pool(pool)


def _check_same(layout, first, other) -> None:
    if other.summary.get("splits_digest") != first.summary.get("splits_digest"):
        raise EkError(
            f"{layout.summary(other.name)}: different splits from '{first.name}' "
            "(splits_digest differs); rerun ek cv on the same splits"
        )
    if other.ids != first.ids or not np.array_equal(other.folds, first.folds):
        raise EkError(
            f"{layout.oof_ids(other.name)}: record ids or folds differ from '{first.name}'"
        )
    if other.probs.shape != first.probs.shape:
        raise EkError(
            f"{layout.oof_npy(other.name)}: shape {other.probs.shape} differs from "
            f"'{first.name}' {first.probs.shape}"
        )
    if (other.holdout is None) != (first.holdout is None) or other.holdout_ids != first.holdout_ids:
        raise EkError(
            f"{layout.holdout_ids(other.name)}: holdout records differ from '{first.name}'"
        )


def _read_splits(layout) -> dict[str, str]:
    splits = read_ids(layout.splits_csv)
    if not {"record_id", "split"} <= set(splits.columns):
        raise EkError(f"{layout.splits_csv}: expected columns record_id,split,fold")
    return dict(zip(splits["record_id"], splits["split"]))


def _splits_data_root(layout) -> Path:
    path = layout.splits_meta
    try:
        return Path(json.loads(path.read_text())["data_root"])
    except FileNotFoundError:
        raise EkError(f"{path}: missing; pass --data or rerun `ek cv`") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise EkError(f"{path}: no data_root; pass --data") from None


def _load_labels(layout, data_root: Path, ids: list[str], splits: dict[str, str]) -> np.ndarray:
    """Labels of ``ids`` in that order as a read-only, file-backed uint8 memmap, ``(N, H, W)``
    (``(N, C, H, W)`` for several classes).

    Never a byte per pixel in this process's anonymous memory (1.35 GB at 20,529 records):
    the split's label cache itself when ``ids`` are its rows in order, else a copy written
    chunk by chunk to an unlinked temporary file beside the cache.
    """
    missing = [rid for rid in ids if rid not in splits]
    if missing:
        raise EkError(
            f"{layout.splits_csv}: records {missing[:3]} of the OOF are not in the splits"
        )
    records = pd.DataFrame({"record_id": ids, "split": [splits[rid] for rid in ids]})
    reader = LabelReader(layout, data_root, records)
    if len(reader.arrays) == 1 and np.array_equal(reader.rows, np.arange(len(ids))):
        (cache,) = reader.arrays.values()
        if len(cache) == len(ids):
            return cache
    return _labels_copy(layout, reader, len(ids))


def _labels_copy(layout, reader: LabelReader, n_rows: int, chunk: int = 256) -> np.ndarray:
    side = next(iter(reader.arrays.values())).shape[1:]
    layout.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=layout.cache_dir, suffix=".npy") as handle:
        copy = np.lib.format.open_memmap(handle.name, "w+", np.uint8, (n_rows, *side))
        for lo in range(0, n_rows, chunk):
            copy[lo : lo + chunk] = reader.read(slice(lo, lo + chunk))
        copy.flush()
        del copy
        # the mapping keeps the unlinked file alive until the last view of it is gone
        return np.load(handle.name, mmap_mode="r")


def holdout_dice(
    rule: BlendRule, codes: dict[str, np.ndarray], labels: np.ndarray, batch: int = 256
) -> float:
    """Global dice of the rule on a set, applied batch by batch as ``ek submit`` applies it:
    the threshold from the whole set's histogram, then :meth:`BlendRule.apply` per batch.

    Honest with ``threshold_from == "oof"`` (no choice looked at the holdout).
    """
    batches = [slice(lo, lo + batch) for lo in range(0, len(labels), batch)]
    histogram = None
    if rule.mode == "top_fraction":
        histogram = np.sum([rule.histogram(_rows(codes, b)) for b in batches], axis=0)
    threshold = rule.threshold_for(histogram)
    tp = n_pred = 0
    for b in batches:
        predicted = rule.apply(_rows(codes, b), threshold)
        tp += int(np.count_nonzero(predicted & (labels[b] > 0)))
        n_pred += int(np.count_nonzero(predicted))
    n_true = int(np.count_nonzero(labels))
    return dice_from_counts(tp, n_pred - tp, n_true - tp)


def _rows(codes: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    return {name: np.asarray(member[rows]) for name, member in codes.items()}
