"""Shared K-fold splits, written once to ``folds/splits.csv`` and reused by every config.

The training pool (``train`` by default, optionally pooled with ``validation``) is split into
K folds stratified by empty / non-empty mask and by mask size: records are ordered by mask
size (random tie-break from the seed) and dealt out in groups of K, each group shuffled over
the folds, so every fold gets the same mix of empty, small and large masks and every record
lands in exactly one fold. The official ``validation`` split is kept out as a holdout
(fold ``-1``) unless pooled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import EkError
from ..files import digest_file, digest_json, read_json, write_json
from ..layout import Layout
from ..oof import read_ids, write_ids
from ..task import Task, builtin_task, task_path, workdir_task
from .cache import LabelReader
from .images import fit_task, has_masks, list_images, mask_rows, read_masks
from .records import has_labels, list_records

HOLDOUT_FOLD = -1
SIZE_CHUNK = 256  # records per label read: 16 MB at 256 x 256


@dataclass(frozen=True)
class SplitsMeta:
    data_root: str
    n_folds: int
    seed: int
    pool: tuple[str, ...]
    data_digest: str


def assign_folds(mask_sizes: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each record, stratified by mask size (0 = empty); balanced to within one."""
    if n_folds < 2:
        raise EkError(f"--folds must be at least 2, got {n_folds}")
    if len(mask_sizes) < n_folds:
        raise EkError(f"{len(mask_sizes)} pool records cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(mask_sizes)), mask_sizes))
    folds = np.empty(len(mask_sizes), dtype=np.int64)
    for start in range(0, len(order), n_folds):
        group = order[start : start + n_folds]
        folds[group] = rng.permutation(n_folds)[: len(group)]
    return folds


def mask_sizes(layout: Layout, data_root: Path, records: pd.DataFrame) -> np.ndarray:
    """Positive pixels of each record's mask, read in chunks (memory bounded, whatever N)."""
    reader = LabelReader(layout, data_root, records)
    sizes = np.empty(len(records), dtype=np.int64)
    for lo in range(0, len(records), SIZE_CHUNK):
        chunk = reader.read(slice(lo, lo + SIZE_CHUNK))
        sizes[lo : lo + len(chunk)] = np.count_nonzero(chunk.reshape(len(chunk), -1), axis=1)
    return sizes


def image_mask_sizes(task: Task, data_root: Path, records: pd.DataFrame) -> np.ndarray:
    """Positive pixels (all classes) of each image of an image task, read split by split."""
    sizes = np.zeros(len(records), dtype=np.int64)
    for split in pd.unique(records["split"]):
        members = np.flatnonzero(records["split"].to_numpy() == split)
        ids = records["record_id"].to_numpy()[members].tolist()
        rows = mask_rows(task, data_root, str(split))
        for lo in range(0, len(ids), SIZE_CHUNK):
            masks = read_masks(task, data_root, str(split), ids[lo : lo + SIZE_CHUNK], rows)
            counts = np.count_nonzero(masks.reshape(len(masks), -1), axis=1)
            sizes[members[lo : lo + len(masks)]] = counts
    return sizes


def _ids(task: Task, root: Path, split: str) -> list[str]:
    if task.kind == "contrails":
        return list_records(root, split)
    return list_images(task, root, split)


def _present(task: Task, root: Path, split: str) -> bool:
    if task.kind == "contrails":
        return split == "train" or (root / split).is_dir()
    return split == "train" or has_masks(task, root, split)


def data_digest(data_root: Path, splits: tuple[str, ...], task: Task | None = None) -> str:
    """Digest of the record ids of the given splits (what identifies a data set)."""
    root, task = Path(data_root), task or builtin_task("contrails")
    return digest_json({s: _ids(task, root, s) for s in splits if _present(task, root, s)})


def make_splits(
    layout: Layout,
    data_root: Path,
    n_folds: int,
    seed: int = 0,
    pool_validation: bool = False,
    task: Task | None = None,
    force: bool = True,
) -> pd.DataFrame:
    """Build the splits table (``record_id,split,fold``) and write it with its metadata.

    A task other than contrails is written to ``folds/task.yaml`` (size and channels filled in
    from the data) and named, with its digest, in ``splits.json``; contrails writes neither,
    so its files stay as they always were. With ``force=False`` an existing ``splits.csv`` is
    an :class:`EkError` (``ek folds`` without ``--force``): every config's OOF depends on it.
    """
    if layout.splits_csv.is_file() and not force:
        raise EkError(
            f"{layout.splits_csv} exists; every config's OOF depends on it "
            "(use --force to replace it)"
        )
    if n_folds < 1:
        raise EkError(f"--folds {n_folds}: must be at least 1")
    data_root = Path(data_root)
    task = task or builtin_task("contrails")
    if task.kind != "contrails":
        task = fit_task(task, data_root)
    pool: tuple[str, ...] = ("train", "validation") if pool_validation else ("train",)
    if task.kind != "contrails":  # contrails: a missing split is list_records' error
        pool = tuple(s for s in pool if _present(task, data_root, s))
    records = pd.DataFrame(
        [(rid, split) for split in pool for rid in _ids(task, data_root, split)],
        columns=["record_id", "split"],
    )
    if records.empty:
        raise EkError(f"{data_root / task.images.train}: no training records")
    if task.kind == "contrails":
        sizes = mask_sizes(layout, data_root, records)
    else:
        sizes = image_mask_sizes(task, data_root, records)
    records["fold"] = assign_folds(sizes, n_folds, seed)
    holdout = _holdout(task, data_root, pool)
    splits = pd.concat([records, holdout], ignore_index=True)
    _write_splits(layout, splits, data_root, n_folds, seed, pool, task)
    return splits


def _write_splits(
    layout: Layout,
    splits: pd.DataFrame,
    data_root: Path,
    n_folds: int,
    seed: int,
    pool: tuple[str, ...],
    task: Task,
) -> None:
    write_ids(layout.splits_csv, splits)
    digest = data_digest(data_root, ("train", "validation"), task)
    meta = SplitsMeta(str(data_root.resolve()), n_folds, seed, pool, digest)
    extra = {}
    if task.name != "contrails" or task.digest != builtin_task("contrails").digest:
        task.save(task_path(layout))
        extra = {"task": task.name, "task_digest": task.digest}
    elif task_path(layout).is_file():  # --force back to contrails: no stale task file
        task_path(layout).unlink()
    write_json(
        layout.splits_meta,
        {**meta.__dict__, "pool": list(pool), "digest": digest_file(layout.splits_csv), **extra},
    )


def _holdout(task: Task, data_root: Path, pool: tuple[str, ...]) -> pd.DataFrame:
    empty = pd.DataFrame(columns=["record_id", "split", "fold"])
    if "validation" in pool:
        return empty
    if task.kind != "contrails":
        if not has_masks(task, data_root, "validation"):
            return empty
        ids = list_images(task, data_root, "validation")
    elif not (data_root / "validation").is_dir():
        return empty
    else:
        ids = [
            rid
            for rid in list_records(data_root, "validation")
            if has_labels(data_root, "validation", rid)
        ]
    return pd.DataFrame({"record_id": ids, "split": "validation", "fold": HOLDOUT_FOLD})


def read_splits(layout: Layout) -> pd.DataFrame:
    """The splits table, record ids as strings, fold as int."""
    splits = read_ids(layout.splits_csv)
    if list(splits.columns) != ["record_id", "split", "fold"]:
        raise EkError(f"{layout.splits_csv}: expected columns record_id,split,fold")
    splits["fold"] = splits["fold"].astype(int)
    return splits


def read_meta(layout: Layout) -> dict:
    try:
        return read_json(layout.splits_meta)
    except FileNotFoundError:
        raise EkError(f"{layout.splits_meta}: missing; run `ek folds` or `ek cv`") from None


def ensure_splits(
    layout: Layout,
    data_root: Path | None,
    n_folds: int | None,
    seed: int = 0,
    task: Task | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Reuse ``splits.csv`` when it matches (K, data set, task); create it when missing; else
    refuse. ``task`` (``ek cv --task``) is the task of new splits, and must match old ones."""
    if not layout.splits_csv.is_file():
        if data_root is None:
            raise EkError(f"{layout.splits_csv}: missing; pass --data DIR to create it")
        make_splits(layout, data_root, n_folds or 5, seed, task=task)
        return read_splits(layout), read_meta(layout)
    meta = read_meta(layout)
    recorded = workdir_task(layout, meta)
    if task is not None and task.name != recorded.name:
        raise EkError(
            f"{layout.workdir} was made for task {recorded.name}, not {task.name}; "
            f"use a new --workdir for another task"
        )
    if data_root is not None and recorded.kind != "contrails":
        fit_task(recorded, data_root)
    if n_folds is not None and n_folds != meta["n_folds"]:
        raise EkError(
            f"{layout.splits_csv} has {meta['n_folds']} folds, not {n_folds}; use --folds "
            f"{meta['n_folds']}, or start over in a new --workdir (or delete {layout.workdir})"
        )
    if (
        data_root is not None
        and data_digest(Path(data_root), ("train", "validation"), recorded) != meta["data_digest"]
    ):
        raise EkError(
            f"{layout.splits_csv} was made for another data set ({meta['data_root']}); "
            f"use a new --workdir or delete {layout.workdir} to start over"
        )
    if digest_file(layout.splits_csv) != meta.get("digest"):
        raise EkError(
            f"{layout.splits_csv}: changed since it was written; restore it or start over"
        )
    return read_splits(layout), meta
