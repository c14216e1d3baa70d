"""Reading Kaggle contrail records: bands, frames, ash false colour, labels.

A record is a folder ``<root>/<split>/<record_id>/`` with ``band_08.npy`` ... ``band_16.npy``
(float32 ``(H, W, 8)``, brightness temperature in K) and, for labelled splits,
``human_pixel_masks.npy`` (int32 ``(H, W, 1)``) and, in train, ``human_individual_masks.npy``
(int32 ``(H, W, 1, R)``). Every problem with a file raises :class:`EkError` naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import InputSpec
from ..errors import EkError
from ..layout import record_dir

N_FRAMES = 8
LABELLED_FRAME = 4
# Ash false colour: (band difference or band, low K, high K) per RGB channel (DOMAIN.md).
ASH_RANGES = {"r": (-4.0, 2.0), "g": (-4.0, 5.0), "b": (243.0, 303.0)}
MASK_FILE = "human_pixel_masks.npy"
INDIVIDUAL_FILE = "human_individual_masks.npy"


def band_file(band: int) -> str:
    return f"band_{band:02d}.npy"


def list_records(data_root: Path | str, split: str) -> list[str]:
    """Record ids of a split (sorted as strings); errors for a missing split or odd folder."""
    split_dir = Path(data_root) / split
    if not split_dir.is_dir():
        raise EkError(f"{split_dir}: no '{split}/' folder in the data folder")
    ids = []
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir() or not entry.name.isdigit():
            raise EkError(f"{entry}: not a record folder (record ids are digits)")
        ids.append(entry.name)
    return ids


def record_shape(data_root: Path | str, split: str) -> tuple[int, int] | None:
    """``(H, W)`` of a split's images, read from its first record's header; None if empty."""
    ids = list_records(data_root, split)
    for name in (band_file(11), MASK_FILE) if ids else ():
        path = Path(data_root) / split / ids[0] / name
        if path.is_file():
            try:
                shape = np.load(path, mmap_mode="r").shape
            except (ValueError, OSError, EOFError) as err:
                raise EkError(f"{path}: unreadable or truncated .npy ({err})") from None
            return int(shape[0]), int(shape[1])
    return None


def _load_npy(path: Path, expected_ndim: int, dtype_kind: str) -> np.ndarray:
    if not path.is_file():
        raise EkError(f"{path}: missing")
    try:
        array = np.load(path)
    except (ValueError, OSError, EOFError) as err:
        raise EkError(f"{path}: unreadable or truncated .npy ({err})") from None
    if array.ndim != expected_ndim or array.dtype.kind not in dtype_kind:
        raise EkError(f"{path}: unexpected array {array.dtype} {array.shape}")
    return array


class NonFiniteBand(EkError):
    """A band file holds NaN or infinite values (refused unless asked to repair them)."""


def load_band(folder: Path, band: int, repair: bool = False) -> np.ndarray:
    """One band, float32 ``(H, W, 8)``; rejects wrong shapes, and NaN/inf values unless
    ``repair`` (inference only: :func:`fill_nonfinite`)."""
    path = Path(folder) / band_file(band)
    array = _load_npy(path, 3, "f")
    if array.shape[2] != N_FRAMES or array.shape[0] != array.shape[1]:
        raise EkError(f"{path}: expected (H, W, {N_FRAMES}), found {array.shape}")
    if not np.isfinite(array).all():
        if not repair:
            raise NonFiniteBand(f"{path}: contains NaN or infinite values")
        array = fill_nonfinite(array, path)
    return array.astype(np.float32, copy=False)


def fill_nonfinite(array: np.ndarray, path: Path) -> np.ndarray:
    """Each frame's NaN pixels set to the median of its finite pixels, +inf/-inf to their
    maximum/minimum; a frame with no finite pixel is an :class:`EkError`."""
    filled = np.array(array, dtype=np.float32)
    for frame in range(filled.shape[2]):
        plane = filled[:, :, frame]
        finite = plane[np.isfinite(plane)]
        if finite.size == 0:
            raise EkError(f"{path}: frame {frame} has no finite pixel")
        plane[np.isnan(plane)] = np.median(finite)
        plane[np.isposinf(plane)] = finite.max()
        plane[np.isneginf(plane)] = finite.min()
    return filled


def load_bands(
    folder: Path, bands: tuple[int, ...], frames: tuple[int, ...], repair: bool = False
) -> np.ndarray:
    """Selected bands and frames, float32 ``(len(bands), len(frames), H, W)``."""
    stack = [load_band(folder, band, repair)[:, :, list(frames)] for band in bands]
    shapes = {a.shape for a in stack}
    if len(shapes) > 1:
        raise EkError(f"{folder}: bands disagree in shape {sorted(shapes)}")
    return np.stack(stack).transpose(0, 3, 1, 2)


def ash_false_color(b11: np.ndarray, b14: np.ndarray, b15: np.ndarray) -> np.ndarray:
    """Ash RGB in [0, 1]: R=(B15-B14) from (-4,2) K, G=(B14-B11) from (-4,5) K,
    B=B14 from (243,303) K.

    Inputs have any equal shapes; the output stacks the three channels first.
    """

    def scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0)

    return np.stack(
        [
            scale(b15 - b14, *ASH_RANGES["r"]),
            scale(b14 - b11, *ASH_RANGES["g"]),
            scale(b14, *ASH_RANGES["b"]),
        ]
    ).astype(np.float32)


def normalise_bands(bands: np.ndarray, spec: InputSpec, stats: dict) -> np.ndarray:
    """Normalise ``(n_bands, F, H, W)`` per band with pool statistics (mean/std or min/max)."""
    index = [stats["bands"].index(b) for b in spec.bands]
    shape = (-1, 1, 1, 1)
    if spec.normalize == "meanstd":
        mean = np.asarray(stats["mean"], np.float32)[index].reshape(shape)
        std = np.asarray(stats["std"], np.float32)[index].reshape(shape)
        return (bands - mean) / np.maximum(std, 1e-6)
    low = np.asarray(stats["min"], np.float32)[index].reshape(shape)
    high = np.asarray(stats["max"], np.float32)[index].reshape(shape)
    return np.clip((bands - low) / np.maximum(high - low, 1e-6), 0.0, 1.0)


def build_input(
    folder: Path, spec: InputSpec, stats: dict | None = None, repair: bool = False
) -> np.ndarray:
    """The model input of one record, float32 ``(C, H, W)``, channels frame-major.

    For frames ``(f0, f1, ...)`` the channels are ``[f0: c0, c1, ...], [f1: ...]``, so that a
    temporal model can split them back into frames. ``repair``: see :func:`load_band`.
    """
    if spec.channels == "ash":
        b11, b14, b15 = load_bands(folder, (11, 14, 15), spec.frames, repair)
        per_channel = ash_false_color(b11, b14, b15)  # (3, F, H, W)
    else:
        if stats is None:
            raise EkError(f"{folder}: band normalisation needs pool statistics")
        bands = load_bands(folder, spec.bands, spec.frames, repair)
        per_channel = normalise_bands(bands, spec, stats)
    n_channels, n_frames, height, width = per_channel.shape
    return per_channel.transpose(1, 0, 2, 3).reshape(n_frames * n_channels, height, width)


def load_mask(folder: Path) -> np.ndarray:
    """The aggregated label, uint8 ``(H, W)`` of 0/1."""
    path = Path(folder) / MASK_FILE
    mask = _load_npy(path, 3, "iub")
    if mask.shape[2] != 1:
        raise EkError(f"{path}: expected (H, W, 1), found {mask.shape}")
    return (mask[:, :, 0] > 0).astype(np.uint8)


def load_soft_label(folder: Path) -> np.ndarray | None:
    """Mean of the individual annotators' masks, float32 ``(H, W)``; None where absent."""
    path = Path(folder) / INDIVIDUAL_FILE
    if not path.is_file():
        return None
    masks = _load_npy(path, 4, "iub")
    if masks.shape[2] != 1 or masks.shape[3] < 1:
        raise EkError(f"{path}: expected (H, W, 1, R), found {masks.shape}")
    return masks[:, :, 0, :].astype(np.float32).mean(axis=-1)


def has_labels(data_root: Path | str, split: str, record_id: str) -> bool:
    return (record_dir(Path(data_root), split, record_id) / MASK_FILE).is_file()


def band_statistics(folders: list[Path], bands: tuple[int, ...], frames: tuple[int, ...]) -> dict:
    """Per-band mean, std, min and max over the given records (the training pool's sample)."""
    total = np.zeros(len(bands))
    total_sq = np.zeros(len(bands))
    low = np.full(len(bands), np.inf)
    high = np.full(len(bands), -np.inf)
    count = 0
    for folder in folders:
        values = load_bands(folder, bands, frames).reshape(len(bands), -1).astype(np.float64)
        total += values.sum(axis=1)
        total_sq += (values**2).sum(axis=1)
        low = np.minimum(low, values.min(axis=1))
        high = np.maximum(high, values.max(axis=1))
        count += values.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {
        "bands": list(bands),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "min": low.tolist(),
        "max": high.tolist(),
    }
