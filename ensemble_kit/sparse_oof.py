"""The sparse OOF format: only the pixels at or above a floor code, as runs.

A *unit* is one image and class: a uint8 ``(H, W)`` plane. An array of shape ``(N, H, W)``
has N units, ``(N, C, H, W)`` has ``N * C`` (row ``i`` holds units ``i*C .. i*C+C-1``).
Per unit the file keeps

- the runs of pixels whose code is ``>= floor``: start (in the flat ``r * W + c`` order) and
  length, so a blob costs 8 bytes per row it spans;
- their codes, one byte per stored pixel, in the same order;
- ``below_positives``: the labelled positives among the pixels it does not store (-1 when the
  writer had no labels, as in fold parts); the pixels per unit are ``H * W``.

A code below the floor reads back as 0. The file (``oof_sparse.ekz``) is a small container:
a magic line, a JSON header (``floor``, ``shape``, each array's dtype, length and offset) and
the raw arrays, each memory-mapped on reading. :class:`SparseWriter` takes rows in any order
(like :class:`~ensemble_kit.oof.ArrayWriter`), keeps their encoded form (a few % of the
dense size) and writes the file atomically when every row was written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EkError
from .files import atomic_path

MAGIC = b"EKSPARSE1\n"
ALIGN = 64
DENSE_LIMIT = 4 * 10**9  # bytes of dense OOF per config above which `auto` goes sparse
FORMATS = ("auto", "dense", "sparse")
ARRAYS = {
    "run_offset": np.int64,  # (U + 1,) runs of unit u: run_offset[u] : run_offset[u + 1]
    "run_start": np.uint32,  # flat position of each run's first pixel in its unit
    "run_length": np.uint32,
    "code_offset": np.int64,  # (U + 1,) codes of unit u: code_offset[u] : code_offset[u + 1]
    "codes": np.uint8,
    "below_positives": np.int64,  # (U,) labelled positives below the floor; -1: unknown
}


def wants_sparse(fmt: str, n_records: int, record_shape: tuple[int, ...]) -> bool:
    """Whether OOF of ``n_records`` records of ``record_shape`` is written sparse.

    ``fmt`` is ``dense``, ``sparse`` or ``auto`` (sparse when the dense file would pass
    :data:`DENSE_LIMIT` bytes).
    """
    if fmt not in FORMATS:
        raise EkError(f"oof.format: {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "auto":
        return n_records * int(np.prod(record_shape)) > DENSE_LIMIT
    return fmt == "sparse"


def encode_units(values: np.ndarray, floor: int) -> tuple[np.ndarray, ...]:
    """Runs of uint8 ``(B, P)`` units at or above ``floor``.

    Returns:
        ``(runs_per_unit, run_start, run_length, codes)``; runs and codes in unit order.
    """
    n_units, pixels = values.shape
    mask = np.zeros((n_units, pixels + 2), dtype=np.int8)
    mask[:, 1:-1] = values >= floor
    edges = np.diff(mask, axis=1)  # (B, P + 1): +1 where a run starts, -1 after it ends
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    unit = starts // (pixels + 1)
    run_start = (starts - unit * (pixels + 1)).astype(np.uint32)
    return (
        np.bincount(unit, minlength=n_units).astype(np.int64),
        run_start,
        (ends - starts).astype(np.uint32),
        values[mask[:, 1:-1].astype(bool)],
    )


def decode_units(
    runs: tuple[np.ndarray, np.ndarray, np.ndarray], codes: np.ndarray, out: np.ndarray
) -> None:
    """Fill uint8 ``out`` ``(B, P)`` (zeroed first) from each unit's runs and codes.

    ``runs`` is ``(runs_per_unit, run_start, run_length)`` as :func:`encode_units` returns.
    """
    per_unit, run_start, run_length = runs
    out[:] = 0
    if not len(codes):
        return
    unit = np.repeat(np.arange(len(per_unit), dtype=np.int64), per_unit)
    first = unit * out.shape[1] + run_start.astype(np.int64)
    before = np.cumsum(run_length, dtype=np.int64) - run_length
    flat = np.arange(len(codes), dtype=np.int64) + np.repeat(first - before, run_length)
    out.reshape(-1)[flat] = codes


class SparseWriter:
    """Streams rows of a uint8 ``(N, H, W)`` or ``(N, C, H, W)`` array to a sparse file.

    Use as a context manager; the file appears under its real name only when every row was
    written and the block exits without an exception (same contract as ``ArrayWriter``).
    """

    def __init__(self, path: Path, shape: tuple[int, ...], floor: int):
        if not 1 <= floor <= 255:
            raise EkError(f"oof.floor: {floor}; a floor code must be in 1..255")
        self.path, self.shape, self.floor = Path(path), tuple(shape), int(floor)
        self._rows: list = [None] * shape[0]

    def __enter__(self) -> SparseWriter:
        return self

    def write(self, rows, values: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Encode ``values`` (rows ``rows``); with ``labels`` (0/1, same shape) count the
        positives below the floor."""
        index = np.arange(self.shape[0])[rows]
        flat = np.asarray(values, dtype=np.uint8).reshape(-1, self.shape[-2] * self.shape[-1])
        per_row = len(flat) // len(index)
        per_unit, run_start, run_length, codes = encode_units(flat, self.floor)
        n_codes = np.count_nonzero(flat >= self.floor, axis=1).astype(np.int64)
        below = np.full(len(flat), -1, dtype=np.int64)
        if labels is not None:
            positive = np.asarray(labels).reshape(flat.shape) > 0
            below = np.count_nonzero(positive & (flat < self.floor), axis=1).astype(np.int64)
        run_at = _offsets(per_unit.reshape(len(index), per_row).sum(axis=1))
        code_at = _offsets(n_codes.reshape(len(index), per_row).sum(axis=1))
        for j, row in enumerate(index):
            units_of = slice(j * per_row, (j + 1) * per_row)
            runs_of = slice(run_at[j], run_at[j + 1])
            self._rows[row] = (
                per_unit[units_of],
                run_start[runs_of],
                run_length[runs_of],
                n_codes[units_of],
                codes[code_at[j] : code_at[j + 1]],
                below[units_of],
            )

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        missing = sum(row is None for row in self._rows)
        if missing:
            raise EkError(f"{self.path}: {missing} rows were never written")
        parts = [np.concatenate(part) for part in zip(*self._rows)]
        self._rows = [None] * self.shape[0]
        arrays = {
            "run_offset": _offsets(parts[0]),
            "run_start": parts[1],
            "run_length": parts[2],
            "code_offset": _offsets(parts[3]),
            "codes": parts[4],
            "below_positives": parts[5],
        }
        save_sparse(self.path, self.shape, self.floor, arrays)


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def save_sparse(path: Path, shape: tuple[int, ...], floor: int, arrays: dict) -> None:
    """Write the container atomically (``arrays``: every name of :data:`ARRAYS`)."""
    header: dict = {"floor": int(floor), "shape": [int(s) for s in shape], "arrays": {}}
    offset = 0
    for name, dtype in ARRAYS.items():
        array = np.ascontiguousarray(arrays[name], dtype=dtype)
        header["arrays"][name] = [np.dtype(dtype).str, len(array), offset]
        offset += array.nbytes + (-array.nbytes) % ALIGN
    text = json.dumps(header).encode()
    start = len(MAGIC) + 8 + len(text)
    start += (-start) % ALIGN
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(MAGIC + start.to_bytes(8, "little") + text)
        handle.write(b"\0" * (start - handle.tell()))
        for name, dtype in ARRAYS.items():
            array = np.ascontiguousarray(arrays[name], dtype=dtype)
            handle.write(array.tobytes())
            handle.write(b"\0" * ((-array.nbytes) % ALIGN))


class SparseCodes:
    """A sparse OOF file read like a uint8 array: ``codes[rows]`` is dense (below floor: 0).

    Attributes:
        floor: The floor code recorded in the file.
        shape: ``(N, H, W)`` or ``(N, C, H, W)``.
        below_positives: int64 per unit (-1: unknown).
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path | str):
        self.path = Path(path)
        header, start = _read_header(self.path)
        self.floor, self.shape = int(header["floor"]), tuple(header["shape"])
        self.ndim = len(self.shape)
        self.per_row = int(np.prod(self.shape[1:-2], dtype=np.int64))
        self.unit_pixels = int(self.shape[-2] * self.shape[-1])
        self._arrays = {
            name: _map(self.path, start, *spec) for name, spec in header["arrays"].items()
        }
        units = self.shape[0] * self.per_row
        if len(self._arrays["run_offset"]) != units + 1:
            raise EkError(f"{self.path}: run_offset does not match the shape {self.shape}")
        self.below_positives = self._arrays["below_positives"]
        self._stride, self._first = self.per_row, 0  # row i holds units i*stride+first+...

    def class_view(self, c: int) -> SparseCodes:
        """Class ``c`` of an ``(N, C, H, W)`` file as an ``(N, H, W)`` one, read without
        decoding the other classes (``codes[:, c]`` makes every row dense)."""
        if self.ndim != 4 or not 0 <= c < self.shape[1]:
            raise EkError(f"{self.path}: no class {c} in shape {self.shape}")
        view = copy.copy(self)
        view.shape, view.ndim, view.per_row = (self.shape[0], *self.shape[2:]), 3, 1
        view._first = self._first + c
        view.below_positives = self.below_positives[c :: self.shape[1]]
        return view

    def _units(self, rows: np.ndarray) -> np.ndarray:
        """Unit indices of ``rows``, row-major (each row's classes in order)."""
        rows = np.asarray(rows, dtype=np.int64)[:, None] * self._stride + self._first
        return (rows + np.arange(self.per_row)).reshape(-1)

    def __len__(self) -> int:
        return self.shape[0]

    def unit_counts(self) -> np.ndarray:
        """Stored pixels (codes >= floor) per unit."""
        counts = np.diff(self._arrays["code_offset"])
        if self._stride == self.per_row:
            return counts
        return counts.reshape(self.shape[0], self._stride)[:, self._first]

    def row_counts(self) -> np.ndarray:
        """Stored pixels per row (summed over its classes)."""
        return self.unit_counts().reshape(self.shape[0], self.per_row).sum(axis=1)

    def nbytes_on_disk(self) -> int:
        return self.path.stat().st_size

    def any(self) -> bool:
        return bool(len(self._arrays["codes"]))

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Dense codes of ``rows`` (ascending or not) into C-contiguous uint8 ``out``."""
        a = self._arrays
        units = self._units(rows)
        runs = [_ranges(a["run_offset"], units, a[k]) for k in ("run_start", "run_length")]
        codes = _ranges(a["code_offset"], units, a["codes"])
        per_unit = a["run_offset"][units + 1] - a["run_offset"][units]
        decode_units((per_unit, *runs), codes, out.reshape(len(units), self.unit_pixels))

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:])]
        rows = np.arange(self.shape[0])[key]
        out = np.empty((np.size(rows), *self.shape[1:]), dtype=np.uint8)
        self.read_rows(np.atleast_1d(rows), out)
        return out[0] if np.ndim(rows) == 0 else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        dense = self[:]
        return dense if dtype is None else dense.astype(dtype)


class FlooredCodes:
    """A dense uint8 array read with every code below ``floor`` as 0 (for mixed blends)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, array: np.ndarray, floor: int):
        self.array, self.floor = array, int(floor)
        self.shape, self.ndim = tuple(array.shape), array.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        values = np.array(self.array[key], dtype=np.uint8)
        values[values < self.floor] = 0
        return values

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        dense = self[:]
        return dense if dtype is None else dense.astype(dtype)


def _ranges(offsets: np.ndarray, units: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values[offsets[u]:offsets[u + 1]]`` for every unit in ``units``, concatenated."""
    lo, hi = offsets[units], offsets[units + 1]
    if len(units) and np.all(lo[1:] == hi[:-1]):  # consecutive units: one slice
        return np.asarray(values[lo[0] : hi[-1]])
    lengths = hi - lo
    flat = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(
        lo - (np.cumsum(lengths) - lengths), lengths
    )
    return np.asarray(values[flat])


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(MAGIC))
            start = int.from_bytes(handle.read(8), "little")
            text = handle.read(max(0, start - len(MAGIC) - 8))
    except FileNotFoundError:
        raise EkError(f"{path}: missing; run `ek cv` to assemble it") from None
    if magic != MAGIC:
        raise EkError(f"{path}: not a sparse OOF file")
    try:
        return json.loads(text.rstrip(b"\0")), start
    except json.JSONDecodeError:
        raise EkError(f"{path}: unreadable header") from None


def _map(path: Path, start: int, dtype: str, length: int, offset: int) -> np.ndarray:
    if length == 0:
        return np.zeros(0, dtype=dtype)
    try:
        return np.memmap(path, dtype=dtype, mode="r", offset=start + offset, shape=(length,))
    except ValueError as err:
        raise EkError(f"{path}: truncated ({err})") from None


def open_codes(path: Path) -> Any:
    """A dense ``.npy`` as a read-only memmap, or a sparse file as :class:`SparseCodes`."""
    path = Path(path)
    if path.suffix != ".npy":
        return SparseCodes(path)
    if not path.is_file():
        raise EkError(f"{path}: missing; run `ek cv` to assemble it")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise EkError(f"{path}: unreadable ({err})") from None
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
        raise EkError(f"{path}: expected uint8 (N, H, W), found {array.dtype} {array.shape}")
    return array
