"""Postprocessing of predicted masks: connected components (8-connectivity) and size filters.

Dense kernels work on bool/uint8 masks ``(H, W)`` or batches ``(B, H, W)`` (images in
parallel). ``remove_small_components`` drops connected components with fewer than
``min_size`` pixels; ``apply_min_pixels`` drops a whole mask with fewer than ``min_pixels``
positive pixels.

Sparse kernels serve the blend search: pixels are a sparse candidate set sorted by image
and raster position, and for a blend value ``s`` per pixel they compute the *level* of
each pixel, the highest threshold at which it survives a postprocessing rule. A pixel is
then predicted at threshold ``t`` exactly when ``level >= t``, so one histogram of levels
scores every threshold at once.

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
def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(cache=True)
def _union(parent: np.ndarray, a: int, b: int) -> int:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra < rb:
        parent[rb] = ra
        return ra
    parent[ra] = rb
    return rb


@njit(cache=True)
def _label_image(mask: np.ndarray, out: np.ndarray, parent: np.ndarray) -> int:
    """Two-pass union-find labelling of one image into ``out``; returns the count."""
    height, width = mask.shape
    provisional = 0
    for r in range(height):
        for c in range(width):
            out[r, c] = 0
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
    return _compact_labels(out, parent, provisional)


@njit(cache=True)
def _compact_labels(out: np.ndarray, parent: np.ndarray, provisional: int) -> int:
    final = np.zeros(provisional + 1, dtype=np.int32)
    count = 0
    height, width = out.shape
    for r in range(height):
        for c in range(width):
            if out[r, c] == 0:
                continue
            root = _find(parent, out[r, c])
            if final[root] == 0:
                count += 1
                final[root] = count
            out[r, c] = final[root]
    return count


@njit(cache=True, parallel=True)
def label_components_batch(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected component labels of a batch ``(B, H, W)``: int32 labels and counts ``(B,)``.

    Labels are ``1..count`` per image in raster order of each component's first pixel; 0 is
    background.
    """
    n, height, width = masks.shape
    labels = np.zeros((n, height, width), dtype=np.int32)
    counts = np.zeros(n, dtype=np.int64)
    for i in prange(n):
        parent = np.empty(height * width + 1, dtype=np.int32)
        counts[i] = _label_image(masks[i], labels[i], parent)
    return labels, counts


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of one ``(H, W)`` mask; returns ``(labels, count)``."""
    labels, counts = label_components_batch(_as_batch(mask))
    return labels[0], int(counts[0])


def label_components_reference(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """scipy reference of :func:`label_components`."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=STRUCTURE_8)
    return labels, int(count)


@njit(cache=True, parallel=True)
def _remove_small_batch(masks: np.ndarray, min_size: int) -> np.ndarray:
    n, height, width = masks.shape
    kept = np.zeros((n, height, width), dtype=np.bool_)
    for i in prange(n):
        labels = np.zeros((height, width), dtype=np.int32)
        parent = np.empty(height * width + 1, dtype=np.int32)
        count = _label_image(masks[i], labels, parent)
        sizes = np.zeros(count + 1, dtype=np.int64)
        for r in range(height):
            for c in range(width):
                sizes[labels[r, c]] += 1
        for r in range(height):
            for c in range(width):
                kept[i, r, c] = labels[r, c] > 0 and sizes[labels[r, c]] >= min_size
    return kept


def remove_small_components_batch(masks: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_size`` pixels; bool ``(B, H, W)``."""
    masks = _as_uint8(masks)
    if min_size <= 1:
        return masks.astype(bool)
    return _remove_small_batch(masks, int(min_size))


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


@njit(cache=True, parallel=True)
def positive_counts(masks: np.ndarray) -> np.ndarray:
    """Number of non-zero pixels of each image of ``(B, H, W)``: int64 ``(B,)``."""
    n, height, width = masks.shape
    counts = np.zeros(n, dtype=np.int64)
    for i in prange(n):
        total = 0
        for r in range(height):
            for c in range(width):
                if masks[i, r, c]:
                    total += 1
        counts[i] = total
    return counts


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
        kept[positive_counts(batch) < min_pixels] = False
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


# ----------------------------------------------------------------------------- sparse


@njit(cache=True, parallel=True)
def neighbour_table(image_start: np.ndarray, positions: np.ndarray, height: int, width: int) -> np.ndarray:
    """For sparse pixels sorted by (image, raster position): index of each 8-neighbour or -1.

    Args:
        image_start: int64 ``(N + 1,)``; image ``i`` owns pixels ``image_start[i]:image_start[i+1]``.
        positions: int32 ``(P,)`` raster positions ``r * width + c``, ascending within an image.
        height: Image height.
        width: Image width.

    Returns:
        int32 ``(P, 8)`` in the order of :data:`EIGHT_NEIGHBOURS`.
    """
    table = np.full((positions.shape[0], 8), -1, dtype=np.int32)
    for i in prange(image_start.shape[0] - 1):
        lo, hi = image_start[i], image_start[i + 1]
        segment = positions[lo:hi]
        for p in range(lo, hi):
            r, c = positions[p] // width, positions[p] % width
            for k in range(8):
                rr, cc = r + EIGHT_NEIGHBOURS[k, 0], c + EIGHT_NEIGHBOURS[k, 1]
                if rr < 0 or cc < 0 or rr >= height or cc >= width:
                    continue
                j = np.searchsorted(segment, rr * width + cc)
                if j < hi - lo and segment[j] == rr * width + cc:
                    table[p, k] = lo + j
    return table


@njit(cache=True, parallel=True)
def descending_order(values: np.ndarray, image_start: np.ndarray) -> np.ndarray:
    """Global indices of sparse pixels sorted by value, descending, within each image."""
    order = np.empty(values.shape[0], dtype=np.int64)
    for i in prange(image_start.shape[0] - 1):
        lo, hi = image_start[i], image_start[i + 1]
        local = np.argsort(-values[lo:hi].astype(np.int64), kind="mergesort")
        for k in range(hi - lo):
            order[lo + k] = lo + local[k]
    return order


@njit(cache=True, parallel=True)
def component_levels(values, image_start, order, neighbours, min_size):
    """Highest threshold at which each sparse pixel lies in a component of >= ``min_size``.

    Pixels are added in descending value order (a component tree of the superlevel sets);
    when a component first reaches ``min_size`` at level ``v`` its pixels get level ``v``.

    Returns:
        int64 ``(P,)``: the pixel is kept at threshold ``t`` iff ``t <= level`` (and
        ``t <= value``); -1 when its component never reaches ``min_size``.
    """
    n_pixels = values.shape[0]
    level = np.full(n_pixels, -1, dtype=np.int64)
    parent = np.arange(n_pixels).astype(np.int32)
    size = np.ones(n_pixels, dtype=np.int64)
    reached = np.zeros(n_pixels, dtype=np.bool_)
    added = np.zeros(n_pixels, dtype=np.bool_)
    next_member = np.full(n_pixels, -1, dtype=np.int64)
    tail = np.arange(n_pixels)
    for i in prange(image_start.shape[0] - 1):
        for k in range(image_start[i], image_start[i + 1]):
            p = order[k]
            current = values[p]
            added[p] = True
            if min_size <= 1:
                reached[p], level[p] = True, current
            for j in range(8):
                q = neighbours[p, j]
                if q >= 0 and added[q]:
                    _merge(p, q, current, min_size, parent, size, reached, next_member, tail, level)
    return level


@njit(cache=True)
def _merge(p, q, current, min_size, parent, size, reached, next_member, tail, level):
    a, b = _find(parent, p), _find(parent, q)
    if a == b:
        return
    now = reached[a] or reached[b] or size[a] + size[b] >= min_size
    if now and not reached[a]:
        _assign_level(a, current, next_member, level)
    if now and not reached[b]:
        _assign_level(b, current, next_member, level)
    root, child = (a, b) if a < b else (b, a)
    parent[child] = root
    size[root] += size[child]
    next_member[tail[root]] = child
    tail[root] = tail[child]
    reached[root] = now


@njit(cache=True)
def _assign_level(root, current, next_member, level):
    member = root
    while member != -1:
        level[member] = current
        member = next_member[member]


@njit(cache=True, parallel=True)
def min_pixel_levels(values, image_start, order, min_pixels):
    """Per image, the ``min_pixels``-th largest value (-1 if fewer pixels): int64 ``(N,)``.

    At threshold ``t`` an image has at least ``min_pixels`` predicted pixels iff ``t <=``
    this level.
    """
    n_images = image_start.shape[0] - 1
    cut = np.full(n_images, -1, dtype=np.int64)
    for i in prange(n_images):
        lo, hi = image_start[i], image_start[i + 1]
        if min_pixels <= 0:
            cut[i] = 1 << 40
        elif hi - lo >= min_pixels:
            cut[i] = values[order[lo + min_pixels - 1]]
    return cut


def postprocess_levels(values, image_start, order, neighbours, min_pixels: int, min_size: int) -> np.ndarray:
    """Level of each sparse pixel under threshold -> min-pixel -> min-component.

    A pixel is predicted at threshold ``t`` iff ``t <= level`` (for ``t`` above every
    dropped pixel's value).

    Returns:
        int64 ``(P,)``.
    """
    levels = values.astype(np.int64)
    if min_pixels > 1:
        cut = min_pixel_levels(values, image_start, order, min_pixels)
        levels = np.minimum(levels, np.repeat(cut, np.diff(image_start)))
    if min_size > 1:
        levels = np.minimum(levels, component_levels(values, image_start, order, neighbours, min_size))
    return levels


def postprocess_levels_reference(values, image_start, positions, shape, min_pixels, min_size):
    """Dense reference of :func:`postprocess_levels`: threshold at every distinct value."""
    levels = np.full(values.shape[0], -1, dtype=np.int64)
    image = np.repeat(np.arange(len(image_start) - 1), np.diff(image_start))
    for t in np.unique(values):
        masks = np.zeros((len(image_start) - 1, shape[0] * shape[1]), dtype=bool)
        masks[image, positions] = values >= t
        masks = masks.reshape(-1, *shape)
        masks = apply_min_pixels_reference(masks, min_pixels)
        masks = np.stack([remove_small_components_reference(m, min_size) for m in masks])
        kept = masks.reshape(len(masks), -1)[image, positions]
        levels[kept] = np.maximum(levels[kept], t)
    return levels
