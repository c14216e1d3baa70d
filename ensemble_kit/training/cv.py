"""``ek cv``: K fold models per config, out-of-fold and holdout probabilities, summaries.

Per fold: train (resumable), then predict the fold's validation records and the holdout
with the config's TTA into ``fold_<i>/oof_part.npy`` / ``holdout_part.npy``, then write
``DONE``. When every fold is DONE the parts are streamed into ``oof.npy`` and
``holdout.npy`` (see :mod:`ensemble_kit.oof`) and ``summary.json`` is written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import Config, config_digest, dump_config, load_config, seed_members, tta_list
from ..data.cache import LabelReader, ensure_inputs, ensure_labels
from ..data.loader import ArraySet, batches, to_float
from ..data.splits import HOLDOUT_FOLD, ensure_splits
from ..errors import EkError
from ..files import atomic_path, digest_file, write_json, write_text
from ..inference.checkpoints import load_fold_model
from ..inference.tta import predict_inputs
from ..layout import Layout, fold_files
from ..metrics import best_from_counts, dice_from_counts, threshold_sweep
from ..oof import ArrayWriter, missing_folds, to_uint8, write_ids
from ..report import plot_training_curves
from ..runtime import resolve_device
from .backends import run_jobs
from .pseudo import pseudo_set, read_pseudo
from .trainer import train_fold, write_done

log = logging.getLogger(__name__)
ROW_CHUNK = 256


@dataclass(frozen=True)
class CvRequest:
    """What ``ek cv`` was asked to do."""

    config_paths: tuple[Path, ...]
    layout: Layout
    data_root: Path | None = None
    n_folds: int | None = None
    folds: tuple[int, ...] = ()
    epochs: int | None = None
    device: str | None = None
    backend: str = "local"
    seed: int = 0


@dataclass(frozen=True)
class FoldJob:
    config: Config
    layout: Layout
    data_root: Path
    fold: int
    device: str | None


def run_cv(request: CvRequest) -> dict[str, dict | None]:
    """Train the requested folds of every config; assemble OOF of configs whose folds are DONE."""
    configs = [
        member
        for path in request.config_paths
        for member in seed_members(_with_epochs(load_config(path), request.epochs))
    ]
    _check_unique_names(configs, request.config_paths)
    splits, meta = ensure_splits(request.layout, request.data_root, request.n_folds, request.seed)
    data_root = Path(request.data_root or meta["data_root"])
    folds = request.folds or tuple(range(meta["n_folds"]))
    for fold in folds:
        if not 0 <= fold < meta["n_folds"]:
            raise EkError(f"--fold {fold}: folds are 0..{meta['n_folds'] - 1}")
    jobs = [
        FoldJob(c, request.layout, data_root, f, request.device) for c in configs for f in folds
    ]
    for config in configs:
        _claim_config_dir(request.layout, config)
        if config.label.pseudo:
            read_pseudo(request.layout, config.label.pseudo)  # fail before any fold trains
    pending = [
        j
        for j in jobs
        if not fold_files(request.layout.fold_dir(j.config.name, j.fold))["done"].is_file()
    ]
    run_jobs(pending, run_fold, request.backend)
    return {c.name: assemble(request.layout, c, data_root, splits, meta) for c in configs}


def _with_epochs(config: Config, epochs: int | None) -> Config:
    if epochs is None:
        return config
    return replace(config, train=replace(config.train, epochs=epochs))


def _check_unique_names(configs: list[Config], paths) -> None:
    names = [c.name for c in configs]
    for name in set(names):
        if names.count(name) > 1:
            raise EkError(
                f"two configs are named '{name}' ({', '.join(map(str, paths))}); "
                "give each a unique name"
            )


def _claim_config_dir(layout: Layout, config: Config) -> None:
    """Write the resolved config once; refuse a changed config over existing fold models."""
    path = layout.config_dir(config.name) / "config.yaml"
    if path.is_file():
        saved = load_config(path)
        if config_digest(saved) != config_digest(config):
            raise EkError(
                f"{path}: config '{config.name}' changed since its folds were trained; "
                f"rename it, or delete {path.parent} to retrain"
            )
        return
    write_text(path, dump_config(config))


def fold_sets(layout: Layout, data_root: Path, config: Config, splits: pd.DataFrame, fold: int):
    """Training, validation and holdout ArraySets of one fold."""
    sources, lookup = [], {}
    for split in pd.unique(splits["split"]):
        inputs = ensure_inputs(layout, data_root, split, config.input)
        labels = ensure_labels(layout, data_root, split)
        lookup[split] = (len(sources), inputs.index_of, labels.index_of)
        sources.append((inputs.arrays["inputs"], labels.arrays["labels"], labels.arrays["soft"]))

    def member_set(rows: pd.DataFrame, soft: bool) -> ArraySet:
        pairs = [(s[0], s[2] if soft else s[1]) for s in sources]
        index = np.zeros((len(rows), 2), dtype=np.int64)
        for split, group in rows.groupby("split", sort=False):
            source, input_index, label_index = lookup[split]
            ids = group["record_id"].tolist()
            input_rows = input_index(ids)
            if not np.array_equal(input_rows, label_index(ids)):
                raise EkError(f"{layout.cache_dir}: input and label caches disagree for '{split}'")
            index[rows.index.get_indexer(group.index)] = np.c_[
                np.full(len(ids), source), input_rows
            ]
        return ArraySet(tuple(pairs), index, soft=soft)

    pool = splits[splits["fold"] != HOLDOUT_FOLD]
    train = pool[pool["fold"] != fold].reset_index(drop=True)
    val = pool[pool["fold"] == fold].reset_index(drop=True)
    holdout = splits[splits["fold"] == HOLDOUT_FOLD].reset_index(drop=True)
    return member_set(train, config.label.soft), member_set(val, False), member_set(holdout, False)


def predict_set(
    models: list[torch.nn.Module],
    config: Config,
    arrays: ArraySet,
    device: torch.device,
    batch_size: int,
):
    """Yield ``(rows, probabilities float32 (B, H, W))`` for an ArraySet."""
    start = 0
    for inputs, _ in batches(arrays, batch_size):
        x = to_float(inputs.to(device))
        yield slice(start, start + len(x)), predict_inputs(models, config, x)
        start += len(x)


def run_fold(job: FoldJob) -> dict:
    """Train one fold, write its OOF and holdout parts, then its DONE marker."""
    layout, config, fold = job.layout, job.config, job.fold
    splits, _ = ensure_splits(layout, None, None)
    device = resolve_device(job.device)
    train, val, holdout = fold_sets(layout, job.data_root, config, splits, fold)
    if len(val) == 0 or len(train) == 0:
        raise EkError(f"{layout.splits_csv}: fold {fold} has no training or no validation records")
    fold_dir = layout.fold_dir(config.name, fold)
    lock = fold_files(fold_dir)["running"]
    fold_dir.mkdir(parents=True, exist_ok=True)
    write_text(lock, str(os.getpid()))
    started = time.perf_counter()
    try:
        pseudo = (
            pseudo_set(layout, job.data_root, config, splits, fold) if config.label.pseudo else None
        )
        summary = train_fold(config, fold_dir, fold, train, val, device, pseudo)
        _write_parts(config, fold_dir, val, holdout, device)
        summary["seconds_total"] = time.perf_counter() - started
        write_done(fold_dir, summary)
    finally:
        lock.unlink(missing_ok=True)
    log.info(
        "%s fold %d: best epoch %d, dice %.4f, %.0f s",
        config.name,
        fold,
        summary["best_epoch"],
        summary["best_dice"],
        summary["seconds_total"],
    )
    return summary


def _write_parts(config: Config, fold_dir: Path, val: ArraySet, holdout: ArraySet, device) -> None:
    model = load_fold_model(config, fold_dir, device)
    batch = max(1, config.train.batch_size)
    side = val.sources[0][0].shape[-1]
    with ArrayWriter(fold_files(fold_dir)["oof_part"], (len(val), side, side)) as writer:
        for rows, probs in predict_set([model], config, val, device, batch):
            writer.write(rows, to_uint8(probs))
    if len(holdout):
        with atomic_path(fold_files(fold_dir)["holdout_part"]) as tmp:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.float32, shape=(len(holdout), side, side)
            )
            for rows, probs in predict_set([model], config, holdout, device, batch):
                out[rows] = probs
            out.flush()
            del out


def assemble(
    layout: Layout, config: Config, data_root: Path, splits: pd.DataFrame, meta: dict
) -> dict | None:
    """Stream fold parts into ``oof.npy`` / ``holdout.npy`` and write ``summary.json``.

    Returns None (and logs which folds are missing) while any fold is not DONE.
    """
    name = config.name
    pending = missing_folds(layout, name, meta["n_folds"])
    if pending:
        log.warning("%s: OOF not assembled; folds %s are not DONE yet", name, pending)
        return None
    pool = splits[splits["fold"] != HOLDOUT_FOLD].reset_index(drop=True)
    holdout = splits[splits["fold"] == HOLDOUT_FOLD].reset_index(drop=True)
    side = _part(layout, name, 0, "oof_part").shape[-1]
    with ArrayWriter(layout.oof_npy(name), (len(pool), side, side)) as writer:
        for fold in range(meta["n_folds"]):
            rows = np.flatnonzero(pool["fold"].to_numpy() == fold)
            part = _part(layout, name, fold, "oof_part")
            for start in range(0, len(rows), ROW_CHUNK):
                writer.write(rows[start : start + ROW_CHUNK], part[start : start + ROW_CHUNK])
    write_ids(layout.oof_ids(name), pool[["record_id", "fold"]])
    if len(holdout):
        _assemble_holdout(layout, name, meta["n_folds"], len(holdout), side)
        write_ids(layout.holdout_ids(name), holdout[["record_id"]])
    summary = _summary(layout, config, data_root, pool, holdout, meta)
    write_json(layout.summary(name), summary)
    _plot_curves(layout, name, meta["n_folds"])
    return summary


def _part(layout: Layout, name: str, fold: int, file: str) -> np.ndarray:
    return np.load(fold_files(layout.fold_dir(name, fold))[file], mmap_mode="r")


def _assemble_holdout(layout: Layout, name: str, n_folds: int, n_rows: int, side: int) -> None:
    parts = [_part(layout, name, k, "holdout_part") for k in range(n_folds)]
    with ArrayWriter(layout.holdout_npy(name), (n_rows, side, side)) as writer:
        for start in range(0, n_rows, ROW_CHUNK):
            chunk = slice(start, min(start + ROW_CHUNK, n_rows))
            mean = np.mean([p[chunk].astype(np.float32) for p in parts], axis=0)
            writer.write(chunk, to_uint8(mean))


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
    counts = None
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
    oof = np.load(layout.oof_npy(config.name), mmap_mode="r")
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
                **{k: v for k, v in json.loads(done.read_text()).items() if k != "fold"},
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
        "seconds": sum(f.get("seconds_total", 0.0) for f in per_fold),
    }
    if len(holdout):
        codes = np.load(layout.holdout_npy(config.name), mmap_mode="r")
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
        summary["holdout_dice_at_oof_threshold"],
    )
    return summary


def _plot_curves(layout: Layout, name: str, n_folds: int) -> None:
    metrics = {
        k: pd.read_csv(fold_files(layout.fold_dir(name, k))["metrics"]) for k in range(n_folds)
    }
    plot_training_curves(metrics, layout.curves_png(name))
