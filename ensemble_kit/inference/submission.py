"""Writing and checking the Kaggle submission CSV.

For contrails the file is ``record_id,encoded_pixels`` with one row per test record. Record ids are
15-19 digit strings and stay strings end to end: read as floats they lose digits and no
longer match any record.

Image tasks (:mod:`ensemble_kit.task`) write their own layout: the task's two-column header,
one row per (image, class) with ids from the task's pattern, RLE in the task's pixel order,
its empty text, rows in ``sample_submission.csv``'s order when there is one
(:func:`task_rows`, :func:`write_task_submission`, :func:`check_task_submission`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.images import list_images
from ..data.records import list_records, record_shape
from ..errors import EkError
from ..files import atomic_path
from ..task import Task
from .rle import EMPTY, encode, parse_runs

DEFAULT_SHAPE = (256, 256)

HEADER = "record_id,encoded_pixels"
COLUMNS = HEADER.split(",")
SAMPLE_SUBMISSION = "sample_submission.csv"


def _check_rows_to_write(record_ids: Sequence[str], rles: Sequence[str]) -> None:
    """EkError for mismatched lengths, non-string or duplicate ids, unwritable RLEs."""
    if len(record_ids) != len(rles):
        raise EkError(f"{len(record_ids)} record ids but {len(rles)} RLEs")
    for i, record_id in enumerate(record_ids):
        if not isinstance(record_id, str) or not (record_id.isascii() and record_id.isdigit()):
            raise EkError(f"record_ids[{i}] is {record_id!r}; record ids must be digit strings")
    for i, rle in enumerate(rles):
        if not isinstance(rle, str) or any(ch in rle for ch in ',\r\n"'):
            raise EkError(f"rles[{i}] ({record_ids[i]}) is not a one-line RLE text: {rle!r:.60}")
    seen: set[str] = set()
    for record_id in record_ids:
        if record_id in seen:
            raise EkError(f"record id {record_id} appears more than once")
        seen.add(record_id)


def write_submission(path: Path | str, record_ids: Sequence[str], rles: Sequence[str]) -> None:
    """Write a submission CSV atomically.

    Args:
        path: Where to write; parent folders are created.
        record_ids: Record ids as digit strings, written exactly as given.
        rles: One RLE text per record (``-`` for empty; an empty string is written as ``-``).

    Raises:
        EkError: lengths differ, an id is not a digit string or repeats, or an RLE holds a
            comma, quote or line break.
    """
    _check_rows_to_write(record_ids, rles)
    lines = [HEADER] + [f"{r},{rle.strip() or EMPTY}" for r, rle in zip(record_ids, rles)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _read_rows(path: Path, header: str = HEADER, parse=None) -> list[tuple[int, str, str]]:
    """``(line, id, rle)`` per data row, after checking the header and field counts.

    Read with the csv module rather than pandas: pandas silently turns a first column into
    the index when rows have one field more than the header, and renumbers lines.

    Args:
        header: The expected first line.
        parse: ``(path, line, fields) -> (line, id, rle)``; default :func:`_row` (contrails'
            digit-string record ids).
    """
    parse = parse or _row
    if not path.is_file():
        raise EkError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            first = fh.readline().rstrip("\r\n")
            if first != header:
                raise EkError(f"{path}: line 1: header is {first[:80]!r}, expected {header!r}")
            reader = csv.reader(fh)
            # line_num counts from the reader's first line, which is the file's line 2.
            return [parse(path, reader.line_num + 1, fields) for fields in reader]
    except (csv.Error, UnicodeDecodeError) as error:
        raise EkError(f"{path}: not a readable CSV: {error}") from None


def _two_fields(path: Path, line: int, fields: list[str]) -> tuple[int, str, str]:
    """One data row as ``(line, id, rle)``; EkError for a blank line or another field count."""
    if len(fields) != 2:
        what = "blank line" if not fields else f"{len(fields)} fields, expected 2"
        raise EkError(f"{path}: line {line}: {what}")
    return line, fields[0], fields[1]


def _row(path: Path, line: int, fields: list[str]) -> tuple[int, str, str]:
    """One data row as ``(line, record_id, rle)``; EkError for a blank line or bad id."""
    _, record_id, rle = _two_fields(path, line, fields)
    if not (record_id.isascii() and record_id.isdigit()):
        hint = " (a float-mangled id? keep ids as strings)" if "e+" in record_id.lower() else ""
        raise EkError(
            f"{path}: line {line}: record_id {record_id[:40]!r} is not a digit string{hint}"
        )
    return line, record_id, rle


def _check_unique(path: Path, rows: list[tuple[int, str, str]]) -> None:
    """EkError naming both lines of the first record id that appears twice."""
    first_line: dict[str, int] = {}
    for line, record_id, _ in rows:
        if record_id in first_line:
            raise EkError(
                f"{path}: line {line}: record {record_id} appears more than once "
                f"(first on line {first_line[record_id]})"
            )
        first_line[record_id] = line


def _compare_ids(path: Path, ids: set[str], expected: set[str], source: str) -> None:
    """EkError when the submission's ids are not exactly ``expected``."""
    if ids == expected:
        return
    missing, extra = sorted(expected - ids), sorted(ids - expected)
    parts = []
    if missing:
        parts.append(f"{len(missing)} records of {source} missing (e.g. {', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} records not in {source} (e.g. {', '.join(extra[:3])})")
    raise EkError(f"{path}: " + "; ".join(parts))


def _expected_id_sets(data_root: Path, split: str) -> list[tuple[set[str], str]]:
    """The id sets a submission for ``split`` must match, each with a description."""
    expected = [(set(list_records(data_root, split)), f"{data_root / split}/")]
    sample = data_root / SAMPLE_SUBMISSION
    if split == "test" and sample.is_file():
        sample_ids = pd.read_csv(sample, dtype=str, keep_default_na=False)
        if "record_id" not in sample_ids.columns:
            raise EkError(f"{sample}: no record_id column")
        expected.append((set(sample_ids["record_id"]), str(sample)))
    return expected


def _check_rles(
    path: Path, rows: list[tuple[int, str, str]], shape: Sequence[int]
) -> tuple[int, int]:
    """Parse every RLE; return (empty rows, positive pixels) or EkError naming the line."""
    empty_rows = positive_pixels = 0
    for line, record_id, rle in rows:
        try:
            _, lengths = parse_runs(rle, shape)
        except EkError as error:
            raise EkError(f"{path}: line {line} (record {record_id}): {error}") from None
        empty_rows += lengths.size == 0
        positive_pixels += int(lengths.sum())
    return empty_rows, positive_pixels


def check_submission(
    path: Path | str,
    data_root: Path | str | None = None,
    split: str = "test",
    shape: Sequence[int] | None = None,
) -> dict:
    """Validate a submission CSV before uploading it.

    Checks the header is exactly ``record_id,encoded_pixels``, every row has two fields,
    every id is a digit string and appears once, and every RLE is valid for ``shape``
    (``-`` or an empty field for an empty mask). With ``data_root``, the ids must also be
    exactly the record folders of ``data_root/split/`` and, for the test split, the ids of
    ``data_root/sample_submission.csv`` when that file exists.

    Args:
        path: The submission CSV.
        data_root: Kaggle data folder to compare record ids with, or None to skip that.
        split: Split folder under ``data_root`` the submission is for.
        shape: ``(H, W)`` of every mask (default: that of ``data_root``'s records, else
            256 x 256, the competition's).

    Returns:
        ``{"path", "rows", "empty_rows", "positive_pixels"}``.

    Raises:
        EkError: a one-line message naming the file and, for a bad row, its line number
            (the header is line 1).
    """
    path = Path(path)
    rows = _read_rows(path)
    _check_unique(path, rows)
    if data_root is not None:
        ids = {record_id for _, record_id, _ in rows}
        for expected, source in _expected_id_sets(Path(data_root), split):
            _compare_ids(path, ids, expected, source)
    if shape is None:
        shape = (data_root and record_shape(Path(data_root), split)) or DEFAULT_SHAPE
    empty_rows, positive_pixels = _check_rles(path, rows, shape)
    return {
        "path": str(path),
        "rows": len(rows),
        "empty_rows": empty_rows,
        "positive_pixels": positive_pixels,
    }


def task_rows(task: Task, image_ids: Sequence[str], masks: np.ndarray) -> list[tuple[str, str]]:
    """``(row id, RLE)`` per (image, class) of an image task's submission, image by image.

    Args:
        task: The task (its row id pattern, RLE order and empty text).
        image_ids: One id per image.
        masks: Binary masks ``(N, C, H, W)``, or ``(N, H, W)`` for one class.
    """
    masks = np.asarray(masks)
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.shape[:2] != (len(image_ids), task.n_classes):
        raise EkError(
            f"{masks.shape[:2]} masks for {len(image_ids)} images x {task.n_classes} classes"
        )
    spec = task.submission
    return [
        (row_id, encode(mask, order=spec.rle_order, empty=spec.empty))
        for image_id, image_masks in zip(image_ids, masks)
        for row_id, mask in zip(task.row_ids(image_id), image_masks)
    ]


def sample_order(task: Task, data_root: Path | str | None) -> list[str] | None:
    """Row ids of the task's ``sample_submission.csv`` in its order; None where absent."""
    if data_root is None or task.submission.sample is None:
        return None
    sample = Path(data_root) / task.submission.sample
    if not sample.is_file():
        return None
    table = pd.read_csv(sample, dtype=str, keep_default_na=False)
    column = task.submission.header[0]
    if column not in table.columns:
        raise EkError(f"{sample}: no {column} column (task {task.name}'s submission header)")
    return table[column].tolist()


def write_task_submission(
    path: Path | str, task: Task, rows: list[tuple[str, str]], data_root: Path | str | None = None
) -> None:
    """Write an image task's submission CSV atomically, rows in the sample's order if any.

    Raises:
        EkError: a row id repeats, or the rows are not exactly the sample submission's.
    """
    ids = [row_id for row_id, _ in rows]
    if len(set(ids)) != len(ids):
        raise EkError(f"{path}: a row id appears twice")
    order = sample_order(task, data_root) if task.submission.row_order != "sorted" else None
    by_id = dict(rows)
    if order is not None:
        _compare_ids(Path(path), set(ids), set(order), "sample_submission.csv")
        rows = [(row_id, by_id[row_id]) for row_id in order]
    elif task.submission.row_order == "sorted":
        rows = sorted(rows)
    lines = [",".join(task.submission.header)] + [f"{i},{rle}" for i, rle in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def check_task_submission(
    path: Path | str, task: Task, data_root: Path | str | None = None, split: str = "test"
) -> dict:
    """Validate an image task's submission CSV (header, ids, RLEs) before uploading it.

    With ``data_root``, the row ids must be exactly those of the split's images (every
    class of each) and, for the test split, those of the sample submission when present.

    Returns:
        ``{"path", "rows", "empty_rows", "positive_pixels"}``.

    Raises:
        EkError: one line naming the file and, for a bad row, its line (the header is 1).
    """
    path = Path(path)
    rows = read_task_rows(path, task)
    _check_unique(path, rows)
    if data_root is not None:
        ids = {row_id for _, row_id, _ in rows}
        images = list_images(task, data_root, split)
        expected = {row_id for image in images for row_id in task.row_ids(image)}
        _compare_ids(path, ids, expected, f"the {split} images")
        order = sample_order(task, data_root) if split == "test" else None
        if order is not None:
            _compare_ids(path, ids, set(order), str(task.submission.sample))
    side = task.size if task.submission.rle_order == "column" else task.size[::-1]
    empty_rows = positive_pixels = 0
    for line, row_id, rle in rows:
        if rle == task.submission.empty:
            empty_rows += 1
            continue
        try:
            _, lengths = parse_runs(rle, side, allow_touching=True)
        except EkError as error:
            raise EkError(f"{path}: line {line} ({row_id}): {error}") from None
        positive_pixels += int(lengths.sum())
    return {
        "path": str(path),
        "rows": len(rows),
        "empty_rows": empty_rows,
        "positive_pixels": positive_pixels,
    }


def read_task_rows(path: Path, task: Task) -> list[tuple[int, str, str]]:
    """``(line, row id, rle)`` per data row after checking the header and field counts."""
    return _read_rows(path, ",".join(task.submission.header), _two_fields)
