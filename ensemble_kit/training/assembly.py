"""Assembly of a config's folds: fold parts streamed into ``oof.npy`` / ``holdout.npy`` (or
their sparse ``.ekz`` form, ``oof.format``),
then ``summary.json`` (per-fold, pooled OOF and holdout dice, prediction cost, digests).

Runs when every fold of a config is DONE, by whichever process finishes the last fold;
every file is written atomically, so two processes assembling at once leave whole files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import Config, config_digest, tta_list
from ..data.cache import LabelReader
from ..data.splits import HOLDOUT_FOLD
from ..files import digest_file, read_json, write_json
from ..layout import Layout, fold_files
from ..metrics import best_from_counts, dice_from_counts, threshold_sweep
from ..oof import codes_writer, missing_folds, to_codes, write_ids, writes_sparse
from ..sparse_oof import open_codes
from .curves import plot_training_curves
from .provenance import summary_sources
from .status import where_running

log = logging.getLogger(__name__)
ROW_CHUNK = 256


def prediction_cost(folds: list[dict]) -> dict | None:
    """Measured prediction cost of a config: seconds per record with all K fold models.

    The sum over folds of each fold's measured seconds per record (its OOF and holdout
    prediction with the config's TTA, timed while ``ek cv`` predicted them), i.e. what one
    test record costs through every fold model. None when a fold was trained before this
    was measured.
    """
    seconds = [f.get("predict_seconds_per_record") for f in folds]
    if not folds or any(s is None for s in seconds):
        return None
    return {
        "seconds_per_record": float(sum(s for s in seconds if s is not None)),
        "device": ", ".join(sorted({str(f.get("predict_device")) for f in folds})),
    }


def assemble(
    layout: Layout, config: Config, data_root: Path, splits: pd.DataFrame, meta: dict
) -> dict | None:
    """Stream fold parts into ``oof.npy`` / ``holdout.npy`` and write ``summary.json``.

    Returns None (and logs which folds are missing) while any fold is not DONE.
    """
    name = config.name
    pending = missing_folds(layout, name, meta["n_folds"])
    if pending:
        log.warning(
            "%s: OOF not assembled; folds %s are not DONE yet%s",
            name,
            pending,
            where_running(layout, name, pending),
        )
        return None
    pool = splits[splits["fold"] != HOLDOUT_FOLD].reset_index(drop=True)
    holdout = splits[splits["fold"] == HOLDOUT_FOLD].reset_index(drop=True)
    record = _part(layout, name, 0, "oof_part").shape[1:]
    sparse = writes_sparse(config, len(pool), record)
    labels = LabelReader(layout, data_root, pool) if sparse else None
    path = layout.oof_path(name, False)
    with codes_writer(path, (len(pool), *record), sparse, config.oof.floor) as writer:
        for fold in range(meta["n_folds"]):
            rows = np.flatnonzero(pool["fold"].to_numpy() == fold)
            part = _part(layout, name, fold, "oof_part")
            for start in range(0, len(rows), ROW_CHUNK):
                chunk = rows[start : start + ROW_CHUNK]
                _write(writer, chunk, part[start : start + ROW_CHUNK], labels)
    layout.oof_path(name, not sparse).unlink(missing_ok=True)  # a file of the other format
    write_ids(layout.oof_ids(name), pool[["record_id", "fold"]])
    if len(holdout):
        labels = LabelReader(layout, data_root, holdout) if sparse else None
        _assemble_holdout(layout, config, meta["n_folds"], (len(holdout), *record), labels)
        write_ids(layout.holdout_ids(name), holdout[["record_id"]])
    summary = _summary(layout, config, data_root, pool, holdout, meta)
    write_json(layout.summary(name), summary)
    _plot_curves(layout, name, meta["n_folds"])
    return summary


def _part(layout: Layout, name: str, fold: int, file: str):
    """A fold part: ``oof_part`` dense or sparse (whichever the fold wrote), or the float
    ``holdout_part``."""
    files = fold_files(layout.fold_dir(name, fold))
    sparse = files.get(f"{file}_sparse")
    if sparse is not None and sparse.is_file() and not files[file].is_file():
        return open_codes(sparse)
    return np.load(files[file], mmap_mode="r")


def _write(writer, rows, values: np.ndarray, labels: LabelReader | None) -> None:
    if labels is None:
        writer.write(rows, values)
    else:
        writer.write(rows, values, labels.read(rows))


def _assemble_holdout(
    layout: Layout, config: Config, n_folds: int, shape: tuple, labels: LabelReader | None
) -> None:
    name, sparse = config.name, labels is not None
    parts = [_part(layout, name, k, "holdout_part") for k in range(n_folds)]
    path = layout.holdout_path(name, False)
    with codes_writer(path, shape, sparse, config.oof.floor) as writer:
        for start in range(0, shape[0], ROW_CHUNK):
            chunk = np.arange(start, min(start + ROW_CHUNK, shape[0]))
            mean = np.mean([p[chunk].astype(np.float32) for p in parts], axis=0)
            _write(writer, chunk, to_codes(mean), labels)
    layout.holdout_path(name, not sparse).unlink(missing_ok=True)


def _dice_of(
    labels: LabelReader,
    codes: np.ndarray,
    positions: np.ndarray | None = None,
    threshold: int | None = None,
):
    """Best-threshold dice (or dice at ``threshold``) of uint8 codes against labels, chunked.

    ``positions`` picks rows of both (default: all of them).
    """
    positions = np.arange(len(codes)) if positions is None else positions
    counts: Any = None
    for start in range(0, len(positions), ROW_CHUNK):
        chunk = positions[start : start + ROW_CHUNK]
        part = threshold_sweep(np.asarray(codes[chunk]), labels.read(chunk))
        counts = part if counts is None else tuple(a + b for a, b in zip(counts, part))
    if threshold is None:
        threshold, dice = best_from_counts(*counts)
        return dice, threshold
    if threshold >= len(counts[0]):
        return dice_from_counts(0, 0, counts[0][0] + counts[2][0]), threshold
    return dice_from_counts(*(c[threshold] for c in counts)), threshold


def _summary(layout: Layout, config: Config, data_root: Path, pool, holdout, meta) -> dict:
    oof = open_codes(layout.oof_npy(config.name))
    pool_labels = LabelReader(layout, data_root, pool)
    per_fold = []
    for fold in range(meta["n_folds"]):
        rows = np.flatnonzero(pool["fold"].to_numpy() == fold)
        dice, threshold = _dice_of(pool_labels, oof, rows)
        done = fold_files(layout.fold_dir(config.name, fold))["done"]
        per_fold.append(
            {
                "fold": fold,
                "dice": dice,
                "threshold": threshold / 255,
                **{k: v for k, v in read_json(done).items() if k not in ("fold", "sources")},
            }
        )
    oof_dice, oof_threshold = _dice_of(pool_labels, oof)
    summary = {
        "name": config.name,
        "n_folds": meta["n_folds"],
        "folds": per_fold,
        "oof_dice": oof_dice,
        "oof_threshold": oof_threshold / 255,
        "holdout_dice": None,
        "holdout_dice_at_oof_threshold": None,
        "tta": list(tta_list(config)),
        "splits_digest": digest_file(layout.splits_csv),
        "config_digest": config_digest(config),
        "data_digest": meta["data_digest"],
        "sources": summary_sources(layout, data_root, config.name, meta["n_folds"], holdout),
        "seconds": sum(f.get("seconds_total", 0.0) for f in per_fold),
        "prediction_cost": prediction_cost(per_fold),
    }
    if len(holdout):
        codes = open_codes(layout.holdout_npy(config.name))
        holdout_labels = LabelReader(layout, data_root, holdout)
        summary["holdout_dice"] = _dice_of(holdout_labels, codes)[0]
        summary["holdout_dice_at_oof_threshold"] = _dice_of(
            holdout_labels, codes, threshold=oof_threshold
        )[0]
    log.info(
        "%s: OOF dice %.4f (threshold %.3f), holdout dice %s",
        config.name,
        oof_dice,
        oof_threshold / 255,
        "-" if len(holdout) == 0 else f"{summary['holdout_dice_at_oof_threshold']:.4f}",
    )
    return summary


def _plot_curves(layout: Layout, name: str, n_folds: int) -> None:
    metrics = {
        k: pd.read_csv(fold_files(layout.fold_dir(name, k))["metrics"]) for k in range(n_folds)
    }
    plot_training_curves(metrics, layout.curves_png(name))
