"""Synthetic data for image tasks (``ek synth --task steel|folder``), in their exact layouts.

- ``steel``: ``train_images/`` and ``test_images/`` of 256 x 1600 grayscale JPGs named
  ``<hex>.jpg``, ``train.csv`` (``ImageId,ClassId,EncodedPixels``, one row per non-empty
  (image, class) pair, RLE 1-indexed column-major) and ``sample_submission.csv``
  (``ImageId_ClassId,EncodedPixels``, four rows per test image, empty RLEs).
- ``folder``: ``train/``, ``validation/`` and ``test/`` with ``images/<id>.png`` (RGB) and,
  but for test, ``masks/<id>.png`` (one class: 0/255; several: the class index 1..C), a
  ``sample_submission.csv`` (``id,rle``) and ``task.yaml``, the task file to pass to
  ``ek folds --task`` (``extends: folder``, its size, and for several classes their names
  and ``metric: mean_dice``).

Each (image, class) pair holds a defect with probability ``PRESENT`` (about 75 % of pairs are
empty, so the empty-or-not decision of ``mean_dice`` matters). A defect is a filled ellipse
whose brightness change depends on its class, over smooth noise, so a tiny model can learn
it. Everything is a deterministic function of the arguments.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import yaml

from ..errors import EkError
from ..files import atomic_path, write_text
from ..task import Task, task_from_dict

PRESENT = 0.25
TASK_FILE = "task.yaml"  # a folder set's task file, written beside its splits
SPLIT_SEEDS = {"train": 11, "validation": 12, "test": 13}


def synth_task(name: str, classes: int = 1, size: int = 64) -> Task:
    """The task a synthetic set is written for: ``steel``, or ``folder`` with N classes."""
    if name == "steel":
        return task_from_dict({"extends": "steel"}, source="ek synth")
    if name != "folder":
        raise EkError(f"--task {name!r}: ek synth writes contrails, steel or folder data")
    if not 1 <= classes <= 9:
        raise EkError(f"--classes {classes}: choose 1 to 9")
    return task_from_dict(folder_overrides(classes, size), source="ek synth")


def folder_overrides(classes: int, size: int) -> dict:
    """The task file of a synthetic ``folder`` set: ``extends: folder`` and what differs
    (several classes are scored, as most competitions do, with ``mean_dice``)."""
    overrides: dict = {"extends": "folder", "size": [size, size]}
    if classes > 1:
        overrides.update(classes=[f"class_{i + 1}" for i in range(classes)], metric="mean_dice")
    return overrides


def draw_masks(rng: np.random.Generator, task: Task) -> np.ndarray:
    """uint8 ``(C, H, W)`` masks of one image: an ellipse per present class."""
    height, width = task.size
    rows, cols = np.mgrid[0:height, 0:width]
    masks = np.zeros((task.n_classes, height, width), dtype=np.uint8)
    for c in range(task.n_classes):
        if rng.random() >= PRESENT:
            continue
        ry, rx = rng.uniform(0.08, 0.25) * height, rng.uniform(0.04, 0.15) * width
        cy, cx = rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)
        masks[c] = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
    return masks


def render_image(rng: np.random.Generator, masks: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``(H, W, channels)`` image: noise plus a class-dependent change inside masks."""
    _, height, width = masks.shape
    image = 0.45 + 0.08 * rng.standard_normal((height, width))
    for c, mask in enumerate(masks):
        image += (0.3 if c % 2 == 0 else -0.3) * (1.0 + 0.25 * (c // 2)) * mask
    pixels = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(pixels[:, :, None], channels, axis=2)


def _runs(mask: np.ndarray) -> str:
    """Column-major 1-indexed ``start length`` text of a 0/1 mask ("" when empty)."""
    flat = np.concatenate(([0], mask.T.ravel().astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts.tolist(), ends.tolist()))


def _save_image(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if path.suffix == ".jpg" else "PNG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def write_synthetic_task(
    out: Path | str, task: Task, counts: dict[str, int], seed: int = 0
) -> dict[str, int]:
    """Write a synthetic data set for an image task (``steel`` or ``folder`` layout).

    Args:
        out: The data folder to write (must not exist or be empty).
        task: From :func:`synth_task`.
        counts: Images per split (``train``, ``validation``, ``test``; steel has no
            validation split).
        seed: Seed of everything.

    Returns:
        Images written per split.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EkError(f"{out}: exists and is not empty; choose a new --out")
    written = {}
    for split, n in counts.items():
        if n <= 0 or (split == "validation" and task.images.validation is None):
            continue
        rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
        ids = [f"{rng.integers(16**8):08x}" for _ in range(n)]
        if len(set(ids)) != n:
            ids = [f"{i:08x}" for i in range(n)]
        if task.name == "steel":
            _write_steel_split(out, task, split, ids, rng)
        else:
            _write_folder_split(out, task, split, ids, rng)
        written[split] = n
    if task.name == "folder":
        overrides = folder_overrides(task.n_classes, task.size[0])
        write_text(
            out / TASK_FILE, "# ek folds --task DATA/task.yaml\n" + yaml.safe_dump(overrides)
        )
    return written


def _write_steel_split(out: Path, task: Task, split: str, ids: list[str], rng) -> None:
    folder = out / (task.images.train if split == "train" else str(task.images.test))
    rows = []
    for image_id in ids:
        masks = draw_masks(rng, task)
        _save_image(folder / f"{image_id}.jpg", render_image(rng, masks, 1))
        rows += [[f"{image_id}.jpg", str(c + 1), _runs(m)] for c, m in enumerate(masks) if m.any()]
    if split == "train":
        _write_csv(out / task.masks.train, ["ImageId", "ClassId", "EncodedPixels"], rows)
    else:
        sample = [[row_id, ""] for i in ids for row_id in task.row_ids(f"{i}.jpg")]
        _write_csv(out / str(task.submission.sample), list(task.submission.header), sample)


def _write_folder_split(out: Path, task: Task, split: str, ids: list[str], rng) -> None:
    images = out / str(getattr(task.images, split))
    masks_dir = out / str(getattr(task.masks, split, None))
    for image_id in ids:
        masks = draw_masks(rng, task)
        _save_image(images / f"{image_id}.png", render_image(rng, masks, 3))
        if split == "test":
            continue
        # One PNG holds one class per pixel: a later class wins where two overlap.
        value = np.zeros(task.size, dtype=np.uint8)
        for c, mask in enumerate(masks):
            value[mask > 0] = 255 if task.n_classes == 1 else c + 1
        _save_image(masks_dir / f"{image_id}.png", value[:, :, None])
    if split == "test":
        sample = [[row_id, ""] for i in ids for row_id in task.row_ids(i)]
        _write_csv(out / str(task.submission.sample), list(task.submission.header), sample)
