"""What a cache entry was built from: the size and ``mtime_ns`` of every file it read.

A fingerprint costs one ``stat`` per file (no reads), so it is taken whenever a cache is
opened; a cache, a fold's ``DONE`` and a config's ``summary.json`` record it, and a later
step compares it with the files as they are now. A file rewritten with the same size within
the file system's timestamp granularity goes unnoticed (as with ``make`` or ``rsync``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import InputSpec
from ..errors import EkError
from ..files import digest_bytes, digest_json
from ..layout import cache_files, split_dir
from .records import INDIVIDUAL_FILE, MASK_FILE, band_file, list_records

LABEL_FILES = (MASK_FILE, INDIVIDUAL_FILE)


@dataclass(frozen=True)
class Sources:
    """The files an entry reads: per record of ``ids``, ``(size, mtime_ns)`` of each of
    ``files`` (-1 where absent) in ``table`` int64 ``(N, F, 2)``."""

    root: Path
    split: str
    ids: list[str]
    files: tuple[str, ...]
    table: np.ndarray

    @property
    def fingerprint(self) -> str:
        return digest_json(
            {"ids": digest_json(self.ids), "files": self.files, "stat": _table_digest(self.table)}
        )

    def record(self) -> dict:
        """What ``DONE`` and ``summary.json`` keep of it (see :func:`changed_sources`)."""
        return {"files": list(self.files), "fingerprint": self.fingerprint}


def input_files(spec: InputSpec) -> tuple[str, ...]:
    """The band files an input spec reads from each record."""
    bands = (11, 14, 15) if spec.channels == "ash" else spec.bands
    return tuple(band_file(b) for b in sorted(set(bands)))


def read_sources(
    data_root: Path, split: str, files: tuple[str, ...], labelled_only: bool = False
) -> Sources:
    """Stat ``files`` in every record folder of a split (with ``labelled_only``, only the
    records that have the first of ``files``): the fingerprint of a cache entry."""
    ids = list_records(data_root, split)
    table = _stat_table(split_dir(data_root, split), ids, files)
    if labelled_only:
        keep = table[:, 0, 0] >= 0
        ids, table = [rid for rid, k in zip(ids, keep) if k], table[keep]
    return Sources(Path(data_root), split, ids, tuple(files), table)


def describe_change(path: Path, sources: Sources) -> str:
    """Which of ``sources`` differ from those the entry at ``path`` was built from."""
    try:
        files = cache_files(path)
        old_ids = pd.read_csv(files["ids"], dtype={"record_id": str})["record_id"].tolist()
        old_table = np.load(files["sources"])
    except (OSError, ValueError):
        return "its sources changed"
    if old_ids != sources.ids:
        return f"the record ids of '{sources.split}' changed ({len(old_ids)} -> {len(sources.ids)})"
    if old_table.shape != sources.table.shape:
        return "its source files changed"
    changed = np.flatnonzero((old_table != sources.table).any(axis=2).ravel())
    if not len(changed):
        return "its band statistics changed"
    row, column = divmod(int(changed[0]), len(sources.files))
    first = Path(sources.split) / sources.ids[row] / sources.files[column]
    return f"{len(changed)} source file(s) changed (first: {first})"


def changed_sources(data_root: Path, recorded: dict, memo: dict | None = None) -> list[str]:
    """Which recorded sources (``summary.json``'s or ``DONE``'s ``sources``) differ now.

    Args:
        data_root: The data folder.
        recorded: ``{"<split>/inputs" | "<split>/labels": {"files", "fingerprint"}}``.
        memo: A dict shared by calls on the same data, so each source is stat-ed once.

    Returns:
        One description per changed source (empty: every file is as it was).
    """
    memo = {} if memo is None else memo
    changed = []
    for name, source in sorted(recorded.items()):
        if source is None:  # an entry built before its sources were recorded
            continue
        if "paths" in source:  # an image task's folders and files (paths_source)
            if paths_fingerprint(data_root, source["paths"]) != source["fingerprint"]:
                changed.append(f"{name} ({', '.join(source['paths'])})")
            continue
        key = (name, tuple(source["files"]))
        if key not in memo:
            memo[key] = _fingerprint_now(data_root, name, key[1])
        if memo[key] != source["fingerprint"]:
            changed.append(f"{name} ({', '.join(source['files'])})")
    return changed


def _fingerprint_now(data_root: Path, name: str, files: tuple[str, ...]) -> str | None:
    split, kind = name.split("/")
    try:
        return read_sources(data_root, split, files, labelled_only=kind == "labels").fingerprint
    except EkError:
        return None  # the split is gone


def records_fingerprint(data_root: Path, split: str, ids: list[str], files: tuple[str, ...]) -> str:
    """Fingerprint of ``files`` of the given records only (e.g. the band statistics' sample)."""
    return _table_digest(_stat_table(Path(data_root) / split, ids, files))


def _stat_table(base: Path | str, ids: list[str], files: tuple[str, ...]) -> np.ndarray:
    values: list[
        int
    ] = []  # a flat list, converted once: ~2x faster than filling the array per file
    base = os.fspath(base)
    for rid in ids:
        folder = f"{base}/{rid}/"
        for name in files:
            try:
                stat = os.stat(folder + name)
                values += (stat.st_size, stat.st_mtime_ns)
            except FileNotFoundError:
                values += (-1, -1)
    return np.array(values, dtype=np.int64).reshape(len(ids), len(files), 2)


def _table_digest(table: np.ndarray) -> str:
    return digest_bytes(np.ascontiguousarray(table, dtype="<i8").tobytes())


def paths_source(data_root: Path | str, paths: list[str]) -> dict:
    """What an image task's cache entry read: every file in each folder of ``paths``
    (relative to ``data_root``; a file stands for itself), as ``{"paths", "fingerprint"}``."""
    return {"paths": list(paths), "fingerprint": paths_fingerprint(data_root, paths)}


def paths_fingerprint(data_root: Path | str, paths: list[str]) -> str | None:
    """:func:`files_fingerprint` of the files of ``paths`` (a folder's files, or the file);
    None where one is gone."""
    files: list[Path] = []
    try:
        for relative in paths:
            path = Path(data_root) / relative
            listed = path.iterdir() if path.is_dir() else [path]
            files += sorted(p for p in listed if not p.name.startswith("."))
        return files_fingerprint(files)
    except FileNotFoundError:
        return None


def files_fingerprint(paths: list[Path]) -> str:
    """Digest of the name, size and ``mtime_ns`` of each file (stat calls only)."""
    stats = []
    for path in paths:
        stat = os.stat(path)
        stats.append((path.name, stat.st_size, stat.st_mtime_ns))
    return digest_json(stats)
