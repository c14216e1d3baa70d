"""The out-of-fold (OOF) file format: written by ``ek cv``, read by ``ek blend``.

Per config, under ``folds/<name>/``:

- ``oof.npy``: uint8 ``(N, H, W)``, the fold model's probability x 255 rounded, one row per
  pool record in the order of ``oof_ids.csv`` (``record_id,fold``).
- ``holdout.npy`` / ``holdout_ids.csv`` (``record_id``): the same for the holdout records,
  averaged over the K fold models. Absent when there is no holdout.
- ``summary.json``: scores and the digests of splits, config and data.

With ``oof.format: sparse`` (or ``auto`` past 4 GB of dense OOF) the codes go to
``oof_sparse.ekz`` / ``holdout_sparse.ekz`` instead (:mod:`.sparse_oof`): only codes at or
above ``oof.floor``; :func:`load_codes` reads either format as dense uint8.

Arrays are written through a memory map to a temporary file and renamed into place, so
peak memory does not grow with N and a killed run leaves no half-written ``oof.npy``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import EkError
from .files import atomic_path
from .layout import Layout, fold_files
from .sparse_oof import SparseCodes, SparseWriter, open_codes, wants_sparse


def to_codes(probabilities):
    """Probabilities (or any values) in [0, 1] to the stored uint8 code ``round(p * 255)``.

    The one quantiser of ek: OOF, holdout, submission, pseudo-labels and the uint8 input
    cache all store ``round(clip(p, 0, 1) * 255)`` (round half to even). Takes a numpy array,
    or a torch tensor (quantised on its device, returned as a uint8 tensor).
    """
    if isinstance(probabilities, np.ndarray) or np.isscalar(probabilities):
        return np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)
    import torch  # a tensor was passed, so torch is loaded already

    return torch.round(probabilities.clamp(0.0, 1.0) * 255).to(torch.uint8)


def from_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes back to float32 values in [0, 1]: ``u / 255``."""
    return np.asarray(codes).astype(np.float32) / 255.0


class ArrayWriter:
    """Streams rows of a uint8 ``(N, H, W)`` (or ``(N, C, H, W)``) array to ``path`` via a
    temporary memmap.

    Use as a context manager; the file appears under its real name only when every row
    was written and the block exits without an exception.
    """

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path = Path(path)
        self.shape = shape
        self._atomic = atomic_path(self.path)
        self._filled = np.zeros(shape[0], dtype=bool)

    def __enter__(self) -> ArrayWriter:
        tmp = self._atomic.__enter__()
        self.array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=self.shape)
        return self

    def write(self, rows: np.ndarray | slice | list, values: np.ndarray) -> None:
        self.array[rows] = values
        self._filled[rows] = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._filled.all():
            exc_type = EkError
            exc = EkError(f"{self.path}: {int((~self._filled).sum())} rows were never written")
        self.array.flush()
        del self.array
        if exc_type is not None:
            self._atomic.__exit__(exc_type, exc, tb)
            if isinstance(exc, EkError):
                raise exc
            return
        self._atomic.__exit__(None, None, None)


def codes_writer(
    path: Path, shape: tuple[int, ...], sparse: bool, floor: int
) -> ArrayWriter | SparseWriter:
    """An :class:`ArrayWriter` on ``path`` (``<stem>.npy``) or, with ``sparse``, a
    :class:`~.sparse_oof.SparseWriter` on :func:`sparse_path` of it."""
    if sparse:
        return SparseWriter(sparse_path(path), shape, floor)
    return ArrayWriter(path, tuple(shape))


def sparse_path(path: Path) -> Path:
    """``<stem>_sparse.ekz`` beside the dense ``<stem>.npy``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_sparse.ekz")


def writes_sparse(config, n_records: int, record_shape: tuple[int, ...]) -> bool:
    """Whether ``ek cv`` writes this config's OOF sparse (``oof.format``; ``auto``: past
    4 GB of dense codes per config)."""
    return wants_sparse(config.oof.format, n_records, record_shape)


def load_codes(folder: Path | str, split: str) -> np.ndarray:
    """A config's dense uint8 codes from either format (codes below a sparse floor as 0).

    Args:
        folder: The config's folder (``<workdir>/<config>``).
        split: ``oof`` or ``holdout``.

    Returns:
        uint8 ``(N, H, W)``: a read-only memmap for dense files, an array for sparse ones.
    """
    if split not in ("oof", "holdout"):
        raise EkError(f"split {split!r}: expected 'oof' or 'holdout'")
    folder = Path(folder)
    dense, sparse = folder / f"{split}.npy", folder / f"{split}_sparse.ekz"
    if not dense.is_file() and sparse.is_file():
        return SparseCodes(sparse)[:]
    return open_codes(dense)


@dataclass(frozen=True)
class OofSet:
    """One config's finished OOF: uint8 memmaps (never loaded as float), or
    :class:`~.sparse_oof.SparseCodes` read like them."""

    name: str
    probs: Any  # uint8 (N, H, W): np.ndarray or SparseCodes
    ids: list[str]
    folds: np.ndarray  # int (N,)
    holdout: Any  # uint8 (M, H, W) like probs, or None
    holdout_ids: list[str]
    summary: dict


def read_ids(path: Path) -> pd.DataFrame:
    """Read an ids CSV keeping ``record_id`` a string (ids exceed float precision)."""
    try:
        return pd.read_csv(path, dtype={"record_id": str}, keep_default_na=False)
    except FileNotFoundError:
        raise EkError(f"{path}: missing") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise EkError(f"{path}: unreadable CSV ({err})") from None


def write_ids(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def missing_folds(layout: Layout, name: str, n_folds: int | None = None) -> list[int]:
    """Folds of a config without a DONE marker (K by default from the summary or fold folders)."""
    if n_folds is None:
        n_folds = _summary(layout, name, required=False).get("n_folds")
    if n_folds is None:
        found = sorted(layout.config_dir(name).glob("fold_*"))
        n_folds = len(found)
    return [k for k in range(n_folds) if not fold_files(layout.fold_dir(name, k))["done"].is_file()]


def read_oof(layout: Layout, name: str) -> OofSet:
    """Open a config's OOF for reading; a clear :class:`EkError` when anything is missing."""
    config_dir = layout.config_dir(name)
    if not config_dir.is_dir():
        raise EkError(f"{config_dir}: no such config folder; run `ek cv` first")
    pending = missing_folds(layout, name)
    if pending:
        raise EkError(
            f"{config_dir}: folds {pending} are not DONE; finish them with `ek cv` before blending"
        )
    probs = _open_uint8(layout.oof_npy(name))
    ids = read_ids(layout.oof_ids(name))
    if len(ids) != probs.shape[0]:
        raise EkError(f"{layout.oof_ids(name)}: {len(ids)} ids for {probs.shape[0]} OOF rows")
    holdout, holdout_ids = None, []
    if layout.holdout_npy(name).is_file():
        holdout = _open_uint8(layout.holdout_npy(name))
        holdout_ids = read_ids(layout.holdout_ids(name))["record_id"].tolist()
    return OofSet(
        name=name,
        probs=probs,
        ids=ids["record_id"].tolist(),
        folds=ids["fold"].to_numpy(dtype=np.int64),
        holdout=holdout,
        holdout_ids=holdout_ids,
        summary=_summary(layout, name, required=True),
    )


def _open_uint8(path: Path) -> Any:
    array = open_codes(path)
    if array.ndim not in (3, 4):
        raise EkError(
            f"{path}: expected uint8 (N, H, W) or (N, C, H, W), found {array.dtype} {array.shape}"
        )
    return array


def _summary(layout: Layout, name: str, required: bool) -> dict:
    path = layout.summary(name)
    if not path.is_file():
        if required:
            raise EkError(f"{path}: missing; run `ek cv` to finish this config")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise EkError(f"{path}: not valid JSON") from None
