"""Postprocessing of predicted masks: connected components (8-connectivity) and size filters.

Dense kernels work on bool/uint8 masks ``(H, W)`` or batches ``(B, H, W)`` (images in
parallel). ``remove_small_components`` drops connected components with fewer than
``min_size`` pixels; ``apply_min_pixels`` drops a whole mask with fewer than ``min_pixels``
positive pixels.

The same rules on the blend search's sparse candidate pixels live in :mod:`.levels`.

Each numba kernel has a numpy/scipy reference (``*_reference``) that the tests compare
against.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

EIGHT_NEIGHBOURS = np.array(
    [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)], dtype=np.int64
)
STRUCTURE_8 = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------- dense


@njit(cache=True)
def find_root(parent: np.ndarray, x: int) -> int:
    """Root of ``x`` in the union-find forest ``parent``, halving the path on the way."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(cache=True)
def _union(parent: np.ndarray, a: int, b: int) -> int:
    ra, rb = find_root(parent, a), find_root(parent, b)
    if ra < rb:
        parent[rb] = ra
        return ra
    parent[ra] = rb
    return rb


@njit(cache=True)
def _label_image(mask: np.ndarray, out: np.ndarray, parent: np.ndarray, foreground: np.ndarray):
    """Two-pass union-find labelling of one image into an all-zero ``out``.

    ``parent`` and ``foreground`` are scratch of ``H * W + 1`` int32; ``foreground[:n]``
    lists the labelled raster positions. Only foreground pixels are written and revisited,
    so the cost beyond one read of the mask grows with the foreground, not the image.

    Returns:
        ``(count, n)``: the number of components and of foreground pixels.
    """
    height, width = mask.shape
    provisional = n_foreground = 0
    for r in range(height):
        if _row_empty(mask[r]):
            continue
        for c in range(width):
            if not mask[r, c]:
                continue
            label = 0
            for dr, dc in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
                rr, cc = r + dr, c + dc
                if rr < 0 or cc < 0 or cc >= width or out[rr, cc] == 0:
                    continue
                label = out[rr, cc] if label == 0 else _union(parent, label, out[rr, cc])
            if label == 0:
                provisional += 1
                parent[provisional] = provisional
                label = provisional
            out[r, c] = label
            foreground[n_foreground] = r * width + c
            n_foreground += 1
    return _compact_labels(out, parent, provisional, foreground[:n_foreground]), n_foreground


@njit(cache=True)
def _row_empty(row: np.ndarray) -> bool:
    """True when a uint8 row has no non-zero byte; checks 8 bytes per step where it can."""
    n_words = row.shape[0] // 8
    if n_words > 0:
        for word in row[: n_words * 8].view(np.uint64):
            if word:
                return False
    for c in range(n_words * 8, row.shape[0]):
        if row[c]:
            return False
    return True


@njit(cache=True)
def _compact_labels(out, parent, provisional, foreground) -> int:
    """Relabel roots ``1..count`` in raster order of their first pixel."""
    final = np.zeros(provisional + 1, dtype=np.int32)
    count = 0
    width = out.shape[1]
    for p in foreground:
        r, c = p // width, p % width
        root = find_root(parent, out[r, c])
        if final[root] == 0:
            count += 1
            final[root] = count
        out[r, c] = final[root]
    return count


def label_components_batch(
    masks: np.ndarray, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """8-connected component labels of a batch ``(B, H, W)``: int32 labels and counts ``(B,)``.

    Labels are ``1..count`` per image in raster order of each component's first pixel; 0 is
    background.

    Args:
        masks: bool or 0/1 ``(B, H, W)``.
        out: Optional int32 ``(B, H, W)`` to write the labels into (reused buffers avoid the
            page faults of a fresh allocation, like scipy's ``output=``).
    """
    masks = _as_uint8(masks)
    if out is None:
        out = np.empty(masks.shape, dtype=np.int32)
    return out, _label_batch(masks, out)


@njit(cache=True, parallel=True)
def _label_batch(masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    n, height, width = masks.shape
    counts = np.zeros(n, dtype=np.int64)
    n_chunks = min(n, 64)  # scratch is allocated once per chunk of images, not per image
    for chunk in prange(n_chunks):
        parent = np.empty(height * width + 1, dtype=np.int32)
        foreground = np.empty(height * width + 1, dtype=np.int32)
        for i in range(chunk * n // n_chunks, (chunk + 1) * n // n_chunks):
            labels[i] = 0
            counts[i] = _label_image(masks[i], labels[i], parent, foreground)[0]
    return counts


@njit(cache=True, parallel=True)
def _remove_small_batch(masks: np.ndarray, min_size: int, kept: np.ndarray) -> None:
    n, height, width = masks.shape
    n_chunks = min(n, 64)
    for chunk in prange(n_chunks):
        # per-chunk scratch, returned to all-zero after each image by clearing its foreground
        labels = np.zeros((height, width), dtype=np.int32)
        parent = np.empty(height * width + 1, dtype=np.int32)
        foreground = np.empty(height * width + 1, dtype=np.int32)
        for i in range(chunk * n // n_chunks, (chunk + 1) * n // n_chunks):
            count, n_foreground = _label_image(masks[i], labels, parent, foreground)
            sizes = np.zeros(count + 1, dtype=np.int64)
            for p in foreground[:n_foreground]:
                sizes[labels[p // width, p % width]] += 1
            kept[i] = False
            for p in foreground[:n_foreground]:
                r, c = p // width, p % width
                kept[i, r, c] = sizes[labels[r, c]] >= min_size
                labels[r, c] = 0


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of one ``(H, W)`` mask; returns ``(labels, count)``."""
    labels, counts = label_components_batch(_as_batch(mask))
    return labels[0], int(counts[0])


def label_components_reference(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """scipy reference of :func:`label_components`."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=STRUCTURE_8)
    return labels, int(count)


def remove_small_components_batch(
    masks: np.ndarray, min_size: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_size`` pixels; bool ``(B, H, W)``.

    Args:
        masks: bool or 0/1 ``(B, H, W)``.
        min_size: Smallest component kept (0 or 1 keeps everything).
        out: Optional bool ``(B, H, W)`` buffer for the result.
    """
    masks = _as_uint8(masks)
    if min_size <= 1:
        return masks.astype(bool)
    if out is None:
        out = np.empty(masks.shape, dtype=bool)
    _remove_small_batch(masks, int(min_size), out)
    return out


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_size`` pixels from one or more masks.

    Args:
        mask: ``(H, W)`` or ``(B, H, W)``, bool or 0/1.
        min_size: Smallest component kept (0 or 1 keeps everything).

    Returns:
        A bool mask of the input's shape.
    """
    mask = np.asarray(mask)
    kept = remove_small_components_batch(_as_batch(mask), min_size)
    return kept.reshape(mask.shape)


def remove_small_components_reference(mask: np.ndarray, min_size: int) -> np.ndarray:
    """scipy reference of :func:`remove_small_components` for one ``(H, W)`` mask."""
    labels, count = label_components_reference(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return (labels > 0) & (sizes[labels] >= min_size)


def apply_min_pixels(masks: np.ndarray, min_pixels: int) -> np.ndarray:
    """Drop every whole mask with fewer than ``min_pixels`` positive pixels.

    Args:
        masks: ``(H, W)`` or ``(B, H, W)``, bool or 0/1.
        min_pixels: Smallest number of positive pixels a kept mask has (0 keeps all).

    Returns:
        A bool array of the input's shape.
    """
    masks = np.asarray(masks)
    batch = _as_batch(masks)
    kept = batch.astype(bool)
    if min_pixels > 0:
        kept[np.count_nonzero(batch, axis=(1, 2)) < min_pixels] = False
    return kept.reshape(masks.shape)


def apply_min_pixels_reference(masks: np.ndarray, min_pixels: int) -> np.ndarray:
    """Numpy reference of :func:`apply_min_pixels` for ``(B, H, W)``."""
    counts = np.count_nonzero(masks, axis=(1, 2))
    return masks.astype(bool) & (counts >= min_pixels)[:, None, None]


def _as_batch(mask: np.ndarray) -> np.ndarray:
    mask = _as_uint8(mask)
    return mask[None] if mask.ndim == 2 else mask


def _as_uint8(mask: np.ndarray) -> np.ndarray:
    mask = np.ascontiguousarray(mask)
    if mask.dtype == bool:
        return mask.view(np.uint8)
    return mask if mask.dtype == np.uint8 else (mask != 0).view(np.uint8)
