"""Reading image tasks (``kind: images``): image files, mask files and RLE mask CSVs.

Images are PNG, JPG or TIFF (read with Pillow) or ``.npy`` arrays, 1 or 3 channels,
converted to the task's channel count and returned as float32 ``(C, H, W)`` in [0, 1] (8- and
16-bit images scaled by their maximum; ``.npy`` floats as stored). Masks come from PNG files
(one class: any value > 0 is the class; several classes: the value is the class index 1..C)
or from an RLE CSV (one row per non-empty (image, class) pair, as Severstal's ``train.csv``).
Masks are uint8 ``(C, H, W)`` of 0/1. Every problem is one :class:`EkError` naming the file.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import EkError
from ..runlength import parse_runs
from ..task import Task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
MASK_SUFFIX = ".png"


def split_folder(task: Task, data_root: Path | str, split: str) -> Path | None:
    """The images folder of a split, or None where the task has no such split."""
    relative = {
        "train": task.images.train,
        "validation": task.images.validation,
        "test": task.images.test,
    }.get(split)
    return None if relative is None else Path(data_root) / relative


def image_files(task: Task, data_root: Path | str, split: str) -> dict[str, Path]:
    """Image id -> file of a split, ids sorted; EkError for a missing folder or a repeated id."""
    folder = split_folder(task, data_root, split)
    if folder is None or not folder.is_dir():
        raise EkError(f"{folder or split}: no '{split}' images folder for task {task.name}")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        image_id = path.stem if task.images.id == "stem" else path.name
        if image_id in files:
            raise EkError(f"{path}: image id '{image_id}' also names {files[image_id].name}")
        files[image_id] = path
    return files


def list_images(task: Task, data_root: Path | str, split: str) -> list[str]:
    """Image ids of a split, sorted as strings."""
    return list(image_files(task, data_root, split))


def _read_pixels(path: Path) -> np.ndarray:
    """The raw pixels of an image file as ``(H, W)`` or ``(H, W, C)``."""
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path)
        except (ValueError, OSError, EOFError) as err:
            raise EkError(f"{path}: unreadable .npy ({err})") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except (UnidentifiedImageError, OSError) as err:
        raise EkError(f"{path}: unreadable image ({err})") from None


def _to_unit(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / 65535.0
    return pixels.astype(np.float32)


def read_image(task: Task, path: Path | str) -> np.ndarray:
    """One image as float32 ``(channels, H, W)``; EkError for a wrong size or channel count."""
    path = Path(path)
    pixels = _read_pixels(path)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise EkError(f"{path}: expected 1 or 3 channels, found shape {pixels.shape}")
    if task.size != (0, 0) and pixels.shape[:2] != task.size:
        raise EkError(
            f"{path}: image is {pixels.shape[0]} x {pixels.shape[1]}, task {task.name} expects "
            f"{task.size[0]} x {task.size[1]} (resizing is not supported yet)"
        )
    image = _to_unit(pixels[:, :, :3]).transpose(2, 0, 1)
    wanted = task.channels or image.shape[0]
    if image.shape[0] == wanted:
        return np.ascontiguousarray(image)
    if wanted == 1:
        return image.mean(axis=0, keepdims=True)
    return np.repeat(image, wanted, axis=0)


def read_mask_file(task: Task, path: Path | str) -> np.ndarray:
    """A PNG mask as uint8 ``(C, H, W)`` of 0/1 (``C`` = the task's classes)."""
    path = Path(path)
    if not path.is_file():
        raise EkError(f"{path}: mask missing")
    pixels = _read_pixels(path)
    if pixels.ndim == 3:
        pixels = pixels[:, :, 0]
    if task.size != (0, 0) and pixels.shape != task.size:
        raise EkError(
            f"{path}: mask is {pixels.shape[0]} x {pixels.shape[1]}, task {task.name} expects "
            f"{task.size[0]} x {task.size[1]}"
        )
    if task.n_classes == 1:
        return (pixels > 0).astype(np.uint8)[None]
    top = int(pixels.max())
    if top > task.n_classes:
        raise EkError(
            f"{path}: mask value {top} is above the task's {task.n_classes} classes "
            f"(values are 0 = background, 1..{task.n_classes} = the class)"
        )
    values = np.arange(1, task.n_classes + 1, dtype=pixels.dtype).reshape(-1, 1, 1)
    return (pixels[None] == values).astype(np.uint8)


@dataclass(frozen=True)
class MaskRow:
    """One row of an RLE mask CSV: where it is, which image and class, its runs."""

    line: int
    image_id: str
    class_index: int  # 0-based
    starts: np.ndarray  # 1-indexed in the task's pixel order
    lengths: np.ndarray


def _class_index(task: Task, value: str, where: str) -> int:
    """0-based class of a CSV's class field: the class id 1..C or the class name."""
    if value in task.classes and not value.isdigit():
        return task.classes.index(value)
    if value.isdigit() and 1 <= int(value) <= task.n_classes:
        return int(value) - 1
    raise EkError(f"{where}: class {value!r} is outside the task's classes 1..{task.n_classes}")


def read_mask_csv(task: Task, path: Path | str, shape: tuple[int, int]) -> list[MaskRow]:
    """Every row of an RLE mask CSV, each checked strictly; EkError names file and row.

    A run past the image, overlapping or unsorted runs, a class outside the task or a second
    row for one (image, class) pair is an error; runs that touch are accepted.
    """
    path = Path(path)
    spec = task.masks
    if not path.is_file():
        raise EkError(f"{path}: mask CSV missing")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        needed = [spec.id_column, spec.rle_column] + ([spec.class_column] * (task.n_classes > 1))
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise EkError(f"{path}: no column {missing[0]!r} (columns: {reader.fieldnames})")
        rows, seen = [], set()
        for fields in reader:
            row = _mask_row(task, path, reader.line_num, fields, shape)
            if (row.image_id, row.class_index) in seen:
                raise EkError(f"{path}: row {row.line}: second row for {row.image_id} class")
            seen.add((row.image_id, row.class_index))
            rows.append(row)
    return rows


def _mask_row(task: Task, path: Path, line: int, fields: dict, shape: tuple[int, int]) -> MaskRow:
    spec = task.masks
    where = f"{path}: row {line}"
    class_index = 0
    if task.n_classes > 1:
        class_index = _class_index(task, str(fields[spec.class_column]).strip(), where)
    side = shape if spec.order == "column" else (shape[1], shape[0])
    try:
        starts, lengths = parse_runs(
            fields[spec.rle_column] or "", side, spec.index_base, allow_touching=True
        )
    except EkError as err:
        raise EkError(f"{where}: {err}") from None
    return MaskRow(line, str(fields[spec.id_column]), class_index, starts, lengths)


def paint_rows(task: Task, rows: list[MaskRow], shape: tuple[int, int]) -> np.ndarray:
    """The masks of one image's CSV rows as uint8 ``(C, H, W)``."""
    height, width = shape
    flat = np.zeros((task.n_classes, height * width), dtype=np.uint8)
    for row in rows:
        for start, length in zip(row.starts.tolist(), row.lengths.tolist()):
            flat[row.class_index, start - 1 : start - 1 + length] = 1
    if task.masks.order == "row":
        return flat.reshape(task.n_classes, height, width)
    # Column-major numbering: the flat pixels are the (W, H) transpose, row by row.
    return np.ascontiguousarray(flat.reshape(task.n_classes, width, height).transpose(0, 2, 1))


def mask_location(task: Task, data_root: Path | str, split: str) -> Path | None:
    """The masks folder (files) or CSV (csv) of a split; None where it has no masks."""
    relative = {"train": task.masks.train, "validation": task.masks.validation}.get(split)
    return None if relative is None else Path(data_root) / relative


def has_masks(task: Task, data_root: Path | str, split: str) -> bool:
    location = mask_location(task, data_root, split)
    return location is not None and location.exists()


def fit_task(task: Task, data_root: Path | str) -> Task:
    """Check a data folder fits an image task; the task with size and channels filled in.

    Raises:
        EkError: one line naming what is missing (the train images or masks) or the first
            image that cannot be read.
    """
    root = Path(data_root)
    images = split_folder(task, root, "train")
    if images is None or not images.is_dir():
        raise EkError(f"{root}: does not fit task {task.name}: no {task.images.train}/ folder")
    if not has_masks(task, root, "train"):
        raise EkError(f"{root}: does not fit task {task.name}: no {task.masks.train}")
    files = image_files(task, root, "train")
    if not files:
        raise EkError(f"{images}: no images (png, jpg, tif or npy) for task {task.name}")
    if task.size != (0, 0) and task.channels:
        return task
    first = next(iter(files.values()))
    pixels = _read_pixels(first)
    channels = task.channels or (1 if pixels.ndim == 2 else min(pixels.shape[2], 3))
    size = task.size if task.size != (0, 0) else (int(pixels.shape[0]), int(pixels.shape[1]))
    return replace(task, size=size, channels=channels)


def read_masks(
    task: Task,
    data_root: Path | str,
    split: str,
    ids: list[str],
    rows: dict[str, list[MaskRow]] | None = None,
) -> np.ndarray:
    """Masks of ``ids`` in a split, uint8 ``(N, C, H, W)`` (``C`` classes, sizes checked).

    ``rows``: :func:`mask_rows` of the split, when the caller reads many chunks of one CSV;
    read here otherwise.
    """
    location = mask_location(task, data_root, split)
    if location is None:
        raise EkError(f"task {task.name} has no masks for split '{split}'")
    out = np.zeros((len(ids), task.n_classes, *task.size), dtype=np.uint8)
    if task.masks.source == "files":
        for i, image_id in enumerate(ids):
            out[i] = read_mask_file(task, location / f"{Path(image_id).stem}{MASK_SUFFIX}")
        return out
    by_image = _csv_rows(task, data_root, split) if rows is None else rows
    for i, image_id in enumerate(ids):
        out[i] = paint_rows(task, by_image.get(image_id, []), task.size)
    return out


def mask_rows(task: Task, data_root: Path | str, split: str) -> dict[str, list[MaskRow]] | None:
    """The rows of a split's mask CSV by image id, read once for :func:`read_masks` calls on
    many chunks; None where the masks are files (each read with its image)."""
    return _csv_rows(task, data_root, split) if task.masks.source == "csv" else None


def _csv_rows(task: Task, data_root: Path | str, split: str) -> dict[str, list[MaskRow]]:
    """The rows of a split's mask CSV by image id; EkError for an image not in the data."""
    location = mask_location(task, data_root, split)
    if location is None:
        raise EkError(f"task {task.name} has no masks for split '{split}'")
    by_image: dict[str, list[MaskRow]] = {}
    for row in read_mask_csv(task, location, task.size):
        by_image.setdefault(row.image_id, []).append(row)
    known = set(list_images(task, data_root, split))
    for image_id, rows in by_image.items():
        if image_id not in known:
            raise EkError(f"{location}: row {rows[0].line}: image {image_id!r} is not in the data")
    return by_image
