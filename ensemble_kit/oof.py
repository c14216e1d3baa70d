"""The out-of-fold (OOF) file format: written by ``ek cv``, read by ``ek blend``.

Per config, under ``folds/<name>/``:

- ``oof.npy``: uint8 ``(N, H, W)``, the fold model's probability x 255 rounded, one row per
  pool record in the order of ``oof_ids.csv`` (``record_id,fold``).
- ``holdout.npy`` / ``holdout_ids.csv`` (``record_id``): the same for the holdout records,
  averaged over the K fold models. Absent when there is no holdout.
- ``summary.json``: scores and the digests of splits, config and data.

Arrays are written through a memory map to a temporary file and renamed into place, so
peak memory does not grow with N and a killed run leaves no half-written ``oof.npy``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import EkError
from .files import atomic_path
from .layout import Layout, fold_files


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


def load_codes(folder: Path | str, split: str) -> np.ndarray:
    """A member's stored uint8 codes, read-only: ``(N, H, W)`` in the order of its ids file.

    Args:
        folder: The config's folder, ``folds/<name>``.
        split: ``oof`` (the out-of-fold predictions of the pool) or ``holdout`` (the mean of
            the fold models on the holdout).
    """
    files = {"oof": "oof.npy", "holdout": "holdout.npy"}
    if split not in files:
        raise EkError(f"load_codes: split {split!r} is not one of {sorted(files)}")
    return _open_uint8(Path(folder) / files[split])


class ArrayWriter:
    """Streams rows of a uint8 ``(N, H, W)`` array to ``path`` via a temporary memmap.

    Use as a context manager; the file appears under its real name only when every row
    was written and the block exits without an exception.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int]):
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


@dataclass(frozen=True)
class OofSet:
    """One config's finished OOF: probabilities are uint8 memmaps (never loaded as float)."""

    name: str
    probs: np.ndarray  # uint8 (N, H, W), memmap
    ids: list[str]
    folds: np.ndarray  # int (N,)
    holdout: np.ndarray | None  # uint8 (M, H, W), memmap
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


def _open_uint8(path: Path) -> np.ndarray:
    if not path.is_file():
        raise EkError(f"{path}: missing; run `ek cv` to assemble it")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise EkError(f"{path}: unreadable ({err})") from None
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
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
