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
        root = _find(parent, out[r, c])
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


# ----------------------------------------------------------------------------- sparse


@njit(cache=True)
def neighbour_table(
    image_start: np.ndarray, positions: np.ndarray, height: int, width: int
) -> np.ndarray:
    """For sparse pixels sorted by (image, raster position): index of each 8-neighbour or -1.

    Args:
        image_start: int64 ``(N + 1,)``; image ``i`` owns pixels
            ``image_start[i]:image_start[i+1]``.
        positions: int32 ``(P,)`` raster positions ``r * width + c`` within each image.
        height: Image height.
        width: Image width.

    Returns:
        int32 ``(P, 8)`` in the order of :data:`EIGHT_NEIGHBOURS`.
    """
    table = np.full((positions.shape[0], 8), -1, dtype=np.int32)
    index = np.full(height * width, -1, dtype=np.int64)  # dense scratch, reset per image
    for i in range(image_start.shape[0] - 1):
        lo, hi = image_start[i], image_start[i + 1]
        for p in range(lo, hi):
            index[positions[p]] = p
        for p in range(lo, hi):
            r, c = positions[p] // width, positions[p] % width
            for k in range(8):
                rr, cc = r + EIGHT_NEIGHBOURS[k, 0], c + EIGHT_NEIGHBOURS[k, 1]
                if 0 <= rr < height and 0 <= cc < width:
                    table[p, k] = index[rr * width + cc]
        for p in range(lo, hi):
            index[positions[p]] = -1
    return table


def neighbour_table_reference(image_start, positions, height, width) -> np.ndarray:
    """Numpy reference of :func:`neighbour_table` (a dict per image)."""
    table = np.full((len(positions), 8), -1, dtype=np.int32)
    for i in range(len(image_start) - 1):
        lookup = {int(positions[p]): p for p in range(image_start[i], image_start[i + 1])}
        for p in range(image_start[i], image_start[i + 1]):
            r, c = divmod(int(positions[p]), width)
            for k, (dr, dc) in enumerate(EIGHT_NEIGHBOURS):
                if 0 <= r + dr < height and 0 <= c + dc < width:
                    table[p, k] = lookup.get((r + dr) * width + c + dc, -1)
    return table


@njit(cache=True)
def descending_order(values: np.ndarray, image_start: np.ndarray) -> np.ndarray:
    """Global indices of sparse pixels sorted by value, descending, within each image."""
    order = np.empty(values.shape[0], dtype=np.int64)
    for i in range(image_start.shape[0] - 1):
        lo, hi = image_start[i], image_start[i + 1]
        local = np.argsort(-values[lo:hi].astype(np.int64))
        for k in range(hi - lo):
            order[lo + k] = lo + local[k]
    return order


@njit(cache=True, parallel=True)
def component_levels(values, image_start, order, neighbours, min_sizes):
    """Highest threshold at which each sparse pixel lies in a component of >= ``min_sizes[j]``.

    Pixels are added in descending value order (a component tree of the superlevel sets);
    when a component first reaches ``min_sizes[j]`` at level ``v``, its pixels get level
    ``v`` for ``j``. One pass serves every size.

    Args:
        values: int64 ``(P,)`` blend values of the sparse pixels.
        image_start: int64 ``(N + 1,)`` image boundaries.
        order: int64 ``(P,)`` from :func:`descending_order`.
        neighbours: int32 ``(P, 8)`` from :func:`neighbour_table`.
        min_sizes: int64 ``(J,)`` ascending component sizes, each >= 1.

    Returns:
        int64 ``(J, P)``: the pixel survives ``min_sizes[j]`` at threshold ``t`` iff
        ``t <= level[j]`` (and ``t <= value``); -1 when its component never gets that big.
    """
    n_pixels, n_sizes = values.shape[0], min_sizes.shape[0]
    level = np.full((n_sizes, n_pixels), -1, dtype=np.int64)
    parent = np.arange(n_pixels).astype(np.int32)
    size = np.ones(n_pixels, dtype=np.int64)
    reached = np.zeros(n_pixels, dtype=np.int64)  # how many min_sizes the root's component passed
    added = np.zeros(n_pixels, dtype=np.bool_)
    next_member = np.full(n_pixels, -1, dtype=np.int64)
    tail = np.arange(n_pixels)
    for i in prange(image_start.shape[0] - 1):
        for k in range(image_start[i], image_start[i + 1]):
            p = order[k]
            added[p] = True
            _grow(p, p, values[p], min_sizes, parent, size, reached, next_member, tail, level)
            for j in range(8):
                q = neighbours[p, j]
                if q >= 0 and added[q]:
                    _grow(
                        p, q, values[p], min_sizes, parent, size, reached, next_member, tail, level
                    )
    return level


@njit(cache=True)
def _grow(p, q, current, min_sizes, parent, size, reached, next_member, tail, level):
    """Merge the components of ``p`` and ``q`` (``p == q``: just check ``p``'s own size)."""
    a, b = _find(parent, p), _find(parent, q)
    total = size[a] + (size[b] if a != b else 0)
    now = 0
    while now < min_sizes.shape[0] and min_sizes[now] <= total:
        now += 1
    for j in range(reached[a], now):
        _assign_level(a, j, current, next_member, level)
    if a != b:
        for j in range(reached[b], now):
            _assign_level(b, j, current, next_member, level)
        root, child = (a, b) if a < b else (b, a)
        parent[child] = root
        size[root] += size[child]
        next_member[tail[root]] = child
        tail[root] = tail[child]
        a = root
    reached[a] = now


@njit(cache=True)
def _assign_level(root, j, current, next_member, level):
    member = root
    while member != -1:
        level[j, member] = current
        member = next_member[member]


def min_pixel_levels(values, image_start, order, min_pixels: int) -> np.ndarray:
    """Per image, the ``min_pixels``-th largest value (-1 if fewer pixels): int64 ``(N,)``.

    At threshold ``t`` an image has at least ``min_pixels`` predicted pixels iff ``t <=``
    this level (``min_pixels <= 0`` keeps every image: the level is the int64 maximum).
    """
    if min_pixels <= 0:
        return np.full(len(image_start) - 1, np.iinfo(np.int64).max)
    starts, counts = image_start[:-1], np.diff(image_start)
    cut = np.full(len(counts), -1, dtype=np.int64)
    enough = counts >= min_pixels
    cut[enough] = values[order[starts[enough] + min_pixels - 1]]
    return cut


def postprocess_levels(
    values, image_start, order, neighbours, min_pixels: int, min_size: int
) -> np.ndarray:
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
        sizes = np.array([min_size], dtype=np.int64)
        levels = np.minimum(
            levels, component_levels(values, image_start, order, neighbours, sizes)[0]
        )
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
