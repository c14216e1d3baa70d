"""Connected components and size filters agree with scipy / numpy references."""

import numpy as np
import pytest

from ensemble_kit import postprocess as pp
from ensemble_kit.blend import levels


def _masks(seed, n=6, shape=(23, 31)):
    rng = np.random.default_rng(seed)
    return rng.random((n, *shape)) < rng.uniform(0.05, 0.6)


SPECIAL = {
    "empty": np.zeros((7, 9), bool),
    "full": np.ones((7, 9), bool),
    "one_pixel": np.ones((1, 1), bool),
    "row": np.array([[1, 0, 1, 1, 0, 0, 1]], bool),
    "column": np.array([[1], [1], [0], [1]], bool),
    "checkerboard": (np.indices((8, 8)).sum(axis=0) % 2).astype(bool),
    "diagonals": np.eye(9, dtype=bool) | np.eye(9, dtype=bool)[::-1],
    "odd_width": np.random.default_rng(1).random((5, 13)) < 0.4,
}


def _same_partition(labels, count, reference, ref_count, mask):
    assert count == ref_count
    pairs = set(zip(labels[mask].tolist(), reference[mask].tolist()))
    assert len(pairs) == count  # a bijection between the two labellings
    assert (labels[~mask] == 0).all()


@pytest.mark.parametrize("name", SPECIAL)
def test_labels_match_scipy_on_special_masks(name):
    mask = SPECIAL[name]
    _same_partition(*pp.label_components(mask), *pp.label_components_reference(mask), mask)


@pytest.mark.parametrize("seed", range(4))
def test_batched_labels_match_scipy(seed):
    masks = _masks(seed)
    labels, counts = pp.label_components_batch(masks)
    for mask, lab, count in zip(masks, labels, counts):
        _same_partition(lab, int(count), *pp.label_components_reference(mask), mask)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_size", [0, 1, 2, 3, 7, 50])
def test_remove_small_components_matches_reference(seed, min_size):
    masks = _masks(seed)
    got = pp.remove_small_components(masks, min_size)
    want = np.stack([pp.remove_small_components_reference(m, min_size) for m in masks])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(pp.remove_small_components(masks[0], min_size), want[0])


@pytest.mark.parametrize("min_pixels", [0, 1, 30, 200, 10_000])
def test_apply_min_pixels_matches_reference(min_pixels):
    masks = _masks(5, n=8)
    masks[2] = False
    np.testing.assert_array_equal(
        pp.apply_min_pixels(masks, min_pixels), pp.apply_min_pixels_reference(masks, min_pixels)
    )


def _sparse(seed, n=4, shape=(12, 13), low=10):
    rng = np.random.default_rng(seed)
    dense = rng.integers(0, 30, (n, *shape))
    image, position = np.nonzero((dense >= low).reshape(n, -1))
    values = dense.reshape(n, -1)[image, position].astype(np.int64)
    start = np.concatenate([[0], np.cumsum(np.bincount(image, minlength=n))]).astype(np.int64)
    return values, start, position.astype(np.int32), shape


@pytest.mark.parametrize("seed", range(3))
def test_neighbour_table_matches_reference(seed):
    _, start, positions, shape = _sparse(seed)
    np.testing.assert_array_equal(
        levels.neighbour_table(start, positions, *shape),
        levels.neighbour_table_reference(start, positions, *shape),
    )


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_pixels,min_size", [(0, 0), (0, 3), (15, 0), (20, 4), (3, 9)])
def test_postprocess_levels_match_dense_thresholding(seed, min_pixels, min_size):
    values, start, positions, shape = _sparse(seed)
    order = levels.descending_order(values, start)
    neighbours = levels.neighbour_table(start, positions, *shape)
    got = levels.postprocess_levels(values, start, order, neighbours, min_pixels, min_size)
    want = levels.postprocess_levels_reference(
        values, start, positions, shape, min_pixels, min_size
    )
    for t in range(10, 31):  # thresholds above every dropped value
        np.testing.assert_array_equal(got >= t, want >= t)


def test_component_levels_serve_several_sizes_in_one_pass():
    values, start, positions, shape = _sparse(7)
    order = levels.descending_order(values, start)
    neighbours = levels.neighbour_table(start, positions, *shape)
    together = levels.component_levels(
        values, start, order, neighbours, np.array([2, 4, 9], np.int64)
    )
    for row, size in zip(together, (2, 4, 9)):
        alone = levels.component_levels(
            values, start, order, neighbours, np.array([size], np.int64)
        )[0]
        np.testing.assert_array_equal(row, alone)
        want = levels.postprocess_levels_reference(values, start, positions, shape, 0, size)
        for t in range(10, 31):
            np.testing.assert_array_equal(np.minimum(row, values) >= t, want >= t)


@pytest.mark.parametrize("seed", range(3))
def test_sorted_component_levels_match_dense_thresholding(seed):
    """Pixels in value order, the neighbour table built on that order (what the blend's
    tables do): the same levels as the raster-order call, and as dense thresholding."""
    values, start, positions, shape = _sparse(seed, n=9)
    order = levels.descending_order(values, start)
    sizes = np.array([2, 4, 9], np.int64)
    neighbours = levels.neighbour_table(start, positions[order], *shape)
    got = levels.sorted_component_levels(values[order], start, neighbours, sizes)
    raster = levels.component_levels(
        values, start, order, levels.neighbour_table(start, positions, *shape), sizes
    )
    np.testing.assert_array_equal(got, raster[:, order])
    for row, size in zip(got, sizes):
        want = levels.postprocess_levels_reference(values, start, positions, shape, 0, size)
        for t in range(10, 31):
            np.testing.assert_array_equal(np.minimum(row, values[order]) >= t, want[order] >= t)


def test_level_kernels_fill_reused_buffers_completely():
    """Buffers reused across chunks hold the last chunk's values: every entry is written."""
    values, start, positions, shape = _sparse(3, n=6)
    sizes = np.array([2, 5], np.int64)
    order = levels.descending_order(values, start)
    buffers = levels.ChunkBuffers(len(values) + 7, len(sizes))
    for name in ("_order", "_neighbours", "_levels"):
        getattr(buffers, name).fill(7)
    n = len(values)
    np.testing.assert_array_equal(levels.descending_order(values, start, buffers.order(n)), order)
    neighbours = levels.neighbour_table(start, positions[order], *shape, buffers.neighbours(n))
    np.testing.assert_array_equal(
        neighbours, levels.neighbour_table_reference(start, positions[order], *shape)
    )
    got = levels.sorted_component_levels(values[order], start, neighbours, sizes, buffers.levels(n))
    np.testing.assert_array_equal(
        got, levels.sorted_component_levels(values[order], start, neighbours, sizes)
    )
    want = levels.component_levels(
        values, start, order, levels.neighbour_table(start, positions, *shape), sizes
    )
    np.testing.assert_array_equal(got, want[:, order])
