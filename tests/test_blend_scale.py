"""The full-size blend path: kernels against numpy, labels never loaded as a byte per pixel."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ensemble_kit.blend import kernels
from ensemble_kit.blend.candidates import build_candidates
from ensemble_kit.blend.run import _load_labels
from ensemble_kit.data.cache import load_labels
from ensemble_kit.data.records import list_records
from ensemble_kit.data.splits import mask_sizes
from ensemble_kit.layout import Layout


def _stack(seed=0, n_configs=3, n_images=5, n_pixels=67):
    """Codes with long runs of one value (the case sub-histograms are for) and a few highs."""
    rng = np.random.default_rng(seed)
    stack = np.repeat(rng.integers(0, 4, (n_configs, n_images, n_pixels // 5 + 1)), 5, axis=2)
    stack = stack[:, :, :n_pixels].astype(np.uint8)
    hot = rng.random(stack.shape) < 0.05
    stack[hot] = rng.integers(0, 256, int(hot.sum()))
    labels = (rng.random((n_images, n_pixels)) < 0.1).astype(np.uint8)
    return stack, labels


@pytest.mark.parametrize("n_pixels", [64, 67, 1])
def test_scan_chunk_matches_reference(n_pixels):
    stack, labels = _stack(n_pixels=n_pixels)
    hist = np.empty((*stack.shape[:2], 256, 2), np.int64)
    flags = np.empty((stack.shape[1], n_pixels + (-n_pixels) % 8), np.uint8)
    kernels.scan_chunk(stack, labels, 40, hist, flags)
    want_hist, want_flags = kernels.scan_chunk_reference(stack, labels, 40)
    np.testing.assert_array_equal(hist, want_hist)
    np.testing.assert_array_equal(flags[:, :n_pixels], want_flags)


def test_gather_chunk_matches_reference():
    stack, labels = _stack(n_pixels=64)
    flags = (stack.max(axis=0) >= 40).astype(np.uint8)
    starts = np.concatenate([[0], np.cumsum(flags.sum(axis=1))]).astype(np.int64)
    got = kernels.gather_chunk(stack, labels, flags, starts)
    for a, b in zip(got, kernels.gather_chunk_reference(stack, labels, flags)):
        np.testing.assert_array_equal(a, b)


def test_candidates_read_memmapped_labels_like_arrays(tmp_path):
    rng = np.random.default_rng(1)
    labels = (rng.random((70, 16, 16)) < 0.05).astype(np.uint8)
    oofs = [
        np.clip(labels * 150 + rng.integers(0, 40, labels.shape), 0, 255).astype(np.uint8)
        for _ in range(2)
    ]
    np.save(tmp_path / "labels.npy", labels)
    mapped = np.load(tmp_path / "labels.npy", mmap_mode="r")
    folds = np.arange(70) % 3
    a = build_candidates(oofs, mapped, folds, floor=30)
    b = build_candidates(oofs, labels, folds, floor=30)
    for name in ("values", "labels", "positions", "pixel_fold", "config_histograms"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.pixel_fold.dtype == np.int8
    np.testing.assert_array_equal(a.fold_positives, [labels[folds == k].sum() for k in range(3)])


def _records(root, splits):
    return pd.DataFrame(
        [(rid, split) for split in splits for rid in list_records(root, split)],
        columns=["record_id", "split"],
    )


def test_blend_labels_are_the_cache_itself_when_rows_align(tmp_path, synth_root):
    layout = Layout(tmp_path / "w")
    records = _records(synth_root, ["train"])
    labels = _load_labels(
        layout, synth_root, records["record_id"].tolist(), dict(records.values.tolist())
    )
    assert isinstance(labels, np.memmap) and str(labels.filename).endswith("labels.npy")
    np.testing.assert_array_equal(labels, load_labels(layout, synth_root, records))


def test_blend_labels_of_two_splits_are_an_unlinked_file_copy(tmp_path, synth_root):
    layout = Layout(tmp_path / "w")
    records = _records(synth_root, ["train", "validation"]).iloc[::-1]  # reordered
    ids = records["record_id"].tolist()
    labels = _load_labels(layout, synth_root, ids, dict(records.values.tolist()))
    assert isinstance(labels, np.memmap) and not labels.flags.writeable
    np.testing.assert_array_equal(labels, load_labels(layout, synth_root, records))
    leftovers = [p for p in layout.cache_dir.iterdir() if p.is_file()]
    assert leftovers == [], leftovers
    rng = np.random.default_rng(0)  # the search reads the unlinked copy like any labels
    oof = rng.integers(0, 256, labels.shape, dtype=np.uint8)
    folds = np.arange(len(ids)) % 2
    a = build_candidates([oof], labels, folds)
    b = build_candidates([oof], np.array(labels), folds)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.config_histograms, b.config_histograms)


def test_mask_sizes_read_in_chunks_match_a_full_load(tmp_path, synth_root, monkeypatch):
    from ensemble_kit.data import splits

    monkeypatch.setattr(splits, "SIZE_CHUNK", 5)  # several chunks and a short last one
    layout = Layout(tmp_path / "w")
    records = _records(synth_root, ["train", "validation"])
    want = load_labels(layout, synth_root, records).reshape(len(records), -1).sum(axis=1)
    np.testing.assert_array_equal(mask_sizes(layout, synth_root, records), want)
