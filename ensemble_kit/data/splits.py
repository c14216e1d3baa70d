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
from ..layout import Layout, split_dir
from ..oof import read_ids, write_ids
from .cache import LabelReader
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


def data_digest(data_root: Path, splits: tuple[str, ...]) -> str:
    """Digest of the record ids of the given splits (what identifies a data set)."""
    root = Path(data_root)
    return digest_json(
        {s: list_records(root, s) for s in splits if s == "train" or (root / s).is_dir()}
    )


def make_splits(
    layout: Layout,
    data_root: Path,
    n_folds: int,
    seed: int = 0,
    pool_validation: bool = False,
    force: bool = True,
) -> pd.DataFrame:
    """Build the splits table (``record_id,split,fold``) and write it with its metadata.

    With ``force=False`` an existing ``splits.csv`` is an :class:`EkError` (``ek folds``
    without ``--force``): every config's OOF depends on it.
    """
    if layout.splits_csv.is_file() and not force:
        raise EkError(
            f"{layout.splits_csv} exists; every config's OOF depends on it "
            "(use --force to replace it)"
        )
    if n_folds < 1:
        raise EkError(f"--folds {n_folds}: must be at least 1")
    data_root = Path(data_root)
    pool = ("train", "validation") if pool_validation else ("train",)
    records = pd.DataFrame(
        [(rid, split) for split in pool for rid in list_records(data_root, split)],
        columns=["record_id", "split"],
    )
    if records.empty:
        raise EkError(f"{data_root / 'train'}: no training records")
    sizes = mask_sizes(layout, data_root, records)
    records["fold"] = assign_folds(sizes, n_folds, seed)
    holdout = _holdout(data_root, pool)
    splits = pd.concat([records, holdout], ignore_index=True)
    write_ids(layout.splits_csv, splits)
    meta = SplitsMeta(
        str(data_root.resolve()),
        n_folds,
        seed,
        pool,
        data_digest(data_root, ("train", "validation")),
    )
    write_json(
        layout.splits_meta,
        {**meta.__dict__, "pool": list(pool), "digest": digest_file(layout.splits_csv)},
    )
    return splits


def _holdout(data_root: Path, pool: tuple[str, ...]) -> pd.DataFrame:
    if "validation" in pool or not split_dir(data_root, "validation").is_dir():
        return pd.DataFrame(columns=["record_id", "split", "fold"])
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
    layout: Layout, data_root: Path | None, n_folds: int | None, seed: int = 0
) -> tuple[pd.DataFrame, dict]:
    """Reuse ``splits.csv`` when it matches (K, data set); create it when missing; else refuse."""
    if not layout.splits_csv.is_file():
        if data_root is None:
            raise EkError(f"{layout.splits_csv}: missing; pass --data DIR to create it")
        make_splits(layout, data_root, n_folds or 5, seed)
        return read_splits(layout), read_meta(layout)
    meta = read_meta(layout)
    if n_folds is not None and n_folds != meta["n_folds"]:
        raise EkError(
            f"{layout.splits_csv} has {meta['n_folds']} folds, not {n_folds}; use --folds "
            f"{meta['n_folds']}, or start over in a new --workdir (or delete {layout.workdir})"
        )
    if (
        data_root is not None
        and data_digest(Path(data_root), ("train", "validation")) != meta["data_digest"]
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
