"""The synthetic data set: Kaggle layout, determinism, labels, and a learnable signal."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from ensemble_kit.config import InputSpec
from ensemble_kit.data import records
from ensemble_kit.data.synth import BANDS, record_ids, write_synthetic
from ensemble_kit.errors import EkError

SIZE = 64
COUNTS = {"train": 8, "validation": 6, "test": 3}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic")
    summary = write_synthetic(
        root,
        n_train=COUNTS["train"],
        n_validation=COUNTS["validation"],
        n_test=COUNTS["test"],
        size=SIZE,
        seed=0,
    )
    return root, summary


def _records(root: Path, split: str) -> list[Path]:
    return [root / split / record_id for record_id in records.list_records(root, split)]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_returns_counts_and_writes_each_split(synthetic):
    root, summary = synthetic
    assert {split: summary[split] for split in COUNTS} == COUNTS
    for split, n in COUNTS.items():
        assert len(records.list_records(root, split)) == n
    assert not [p for p in root.rglob(".*")]  # no temporary folders left behind


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_files_dtypes_and_shapes_match_kaggle(synthetic, split):
    root, _ = synthetic
    expected = {records.band_file(band) for band in BANDS}
    expected |= {records.MASK_FILE} if split != "test" else set()
    expected |= {records.INDIVIDUAL_FILE} if split == "train" else set()
    for folder in _records(root, split):
        assert {p.name for p in folder.iterdir()} == expected
        for band in BANDS:
            values = np.load(folder / records.band_file(band))
            assert values.dtype == np.float32 and values.shape == (SIZE, SIZE, 8)
            assert np.isfinite(values).all() and 180 < values.min() and values.max() < 320
        if split != "test":
            mask = np.load(folder / records.MASK_FILE)
            assert mask.dtype == np.int32 and mask.shape == (SIZE, SIZE, 1)
            assert set(np.unique(mask)) <= {0, 1}
        if split == "train":
            individual = np.load(folder / records.INDIVIDUAL_FILE)
            assert individual.dtype == np.int32 and individual.shape[:3] == (SIZE, SIZE, 1)
            assert 3 <= individual.shape[3] <= 6


def test_band_levels_are_realistic(synthetic):
    root, _ = synthetic
    means = {
        band: np.mean(
            [np.load(f / records.band_file(band)).mean() for f in _records(root, "train")]
        )
        for band in BANDS
    }
    assert 220 < means[8] < 245 and means[8] < means[9] < means[10]  # water vapour bands
    assert 260 < means[14] < 300 and means[15] < means[14] < means[13]
    assert means[16] < means[12] < means[14]


def test_sample_submission_lists_every_test_id_with_empty_mask(synthetic):
    root, _ = synthetic
    with open(root / "sample_submission.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["record_id", "encoded_pixels"]
    assert sorted(r[0] for r in rows[1:]) == records.list_records(root, "test")
    assert {r[1] for r in rows[1:]} == {"-"}


def test_record_ids_are_unique_digit_strings_mostly_above_2_53(synthetic):
    root, _ = synthetic
    ids = [i for split in COUNTS for i in records.list_records(root, split)]
    assert len(set(ids)) == len(ids) == sum(COUNTS.values())
    many = record_ids(500, seed=3)
    assert len(set(many)) == 500
    assert all(i.isdigit() and 15 <= len(i) <= 19 and i[0] != "0" for i in many)
    assert sum(int(i) > 2**53 for i in many) > 400
    assert record_ids(20, seed=3) == many[:20]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    small = {"n_train": 2, "n_validation": 2, "n_test": 1, "size": 32}
    write_synthetic(tmp_path / "a", seed=7, **small)
    write_synthetic(tmp_path / "b", seed=7, **small)
    write_synthetic(tmp_path / "c", seed=8, **small)
    first, again, other = (_digests(tmp_path / name) for name in "abc")
    assert first == again
    assert set(first).isdisjoint(other.keys() - {"sample_submission.csv"})
    assert sorted(first.values()) != sorted(other.values())


def test_about_half_of_labelled_records_are_empty(synthetic):
    root, summary = synthetic
    folders = _records(root, "train") + _records(root, "validation")
    empty = sum(not records.load_mask(f).any() for f in folders)
    assert empty == summary["empty"]
    # Exactly half are drawn empty; a drawn positive loses its label only in rare cases.
    assert len(folders) // 2 <= empty <= len(folders) // 2 + 1


def test_aggregated_mask_is_majority_of_annotators_who_disagree(synthetic):
    root, _ = synthetic
    disagreements = 0
    for folder in _records(root, "train"):
        individual = np.load(folder / records.INDIVIDUAL_FILE)[:, :, 0, :]
        majority = 2 * individual.sum(axis=-1) > individual.shape[-1]
        np.testing.assert_array_equal(records.load_mask(folder), majority.astype(np.uint8))
        soft = records.load_soft_label(folder)
        disagreements += int(((soft > 0) & (soft < 1)).sum())
    assert disagreements > 0


def test_reader_accepts_every_split(synthetic):
    root, _ = synthetic
    spec = InputSpec(channels="ash", frames=(3, 4, 5))
    for split in COUNTS:
        for folder in _records(root, split):
            x = records.build_input(folder, spec)
            assert x.shape == (9, SIZE, SIZE) and x.dtype == np.float32
            assert 0.0 <= x.min() and x.max() <= 1.0
            assert records.has_labels(root, split, folder.name) == (split != "test")
    for folder in _records(root, "train"):
        assert records.load_soft_label(folder).shape == (SIZE, SIZE)
    assert all(records.load_soft_label(f) is None for f in _records(root, "validation"))
    stats = records.band_statistics(_records(root, "train"), BANDS, (4,))
    assert all(std > 0 for std in stats["std"])


def _positive_records(root: Path) -> list[tuple[Path, np.ndarray]]:
    folders = _records(root, "train") + _records(root, "validation")
    pairs = [(f, records.load_mask(f).astype(bool)) for f in folders]
    return [(f, m) for f, m in pairs if m.any()]


def test_contrails_show_in_the_ash_channels(synthetic):
    """Against the pixels just around them, contrails are colder with smaller band differences."""
    root, _ = synthetic
    contrast = []
    for folder, mask in _positive_records(root):
        ash = records.build_input(folder, InputSpec(channels="ash", frames=(4,)))
        ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask)
        contrast.append([ash[c][mask].mean() - ash[c][ring].mean() for c in range(3)])
    red, green, blue = np.mean(contrast, axis=0)
    assert red < 0 and green < -0.05 and blue < -0.02


def test_contrails_are_thin_and_drift_between_frames(synthetic):
    root, _ = synthetic
    for _folder, mask in _positive_records(root):
        interior = mask & ndimage.binary_erosion(mask)
        assert interior.sum() <= 0.3 * mask.sum()
    # B14 on the label minus around it, per frame: coldest at the labelled frame; weaker at
    # frame 0 (most contrails not born yet) and at frame 7 (they drifted off the label).
    contrast = []
    for folder, mask in _positive_records(root):
        b14 = np.load(folder / "band_14.npy")
        ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask)
        contrast.append(b14[mask].mean(axis=0) - b14[ring].mean(axis=0))
    by_frame = np.mean(contrast, axis=0)
    assert by_frame[4] < -1.0
    assert by_frame[0] > by_frame[4] + 1.0 and by_frame[7] > by_frame[4] + 1.0


def test_size_scales_the_images(tmp_path):
    write_synthetic(tmp_path, n_train=1, n_validation=0, n_test=0, size=48, seed=1)
    (folder,) = _records(tmp_path, "train")
    assert np.load(folder / "band_11.npy").shape == (48, 48, 8)
    assert np.load(folder / records.INDIVIDUAL_FILE).shape[:2] == (48, 48)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"size": 16}, "size"), ({"n_train": -1}, "train"), ({"n_test": 1.5}, "test")],
)
def test_bad_arguments_raise_ek_error(tmp_path, kwargs, message):
    with pytest.raises(EkError, match=message):
        write_synthetic(
            tmp_path, **{"n_train": 1, "n_validation": 0, "n_test": 0, "size": 32, **kwargs}
        )


def test_refuses_a_folder_that_already_holds_records(synthetic, tmp_path):
    root, _ = synthetic
    with pytest.raises(EkError, match="already holds records"):
        write_synthetic(root, n_train=1, n_validation=0, n_test=0, size=32)
