import numpy as np
import pytest

from ensemble_kit.config import InputSpec
from ensemble_kit.data import records
from ensemble_kit.errors import EkError

TRAIN_WITH_CONTRAIL = "1000603527582775543"


def _record(root, split="train"):
    return root / split / sorted(p.name for p in (root / split).iterdir())[0]


def test_ash_false_colour_matches_hand_computation(sample_root):
    folder = _record(sample_root)
    b11, b14, b15 = (np.load(folder / f"band_{b}.npy")[:, :, 4] for b in (11, 14, 15))
    expected_r = np.clip(((b15 - b14) + 4.0) / 6.0, 0, 1)
    expected_g = np.clip(((b14 - b11) + 4.0) / 9.0, 0, 1)
    expected_b = np.clip((b14 - 243.0) / 60.0, 0, 1)
    ash = records.build_input(folder, InputSpec(channels="ash", frames=(4,)))
    assert ash.shape == (3, 256, 256) and ash.dtype == np.float32
    np.testing.assert_allclose(ash[0], expected_r, atol=1e-6)
    np.testing.assert_allclose(ash[1], expected_g, atol=1e-6)
    np.testing.assert_allclose(ash[2], expected_b, atol=1e-6)
    # one pixel by hand, to the formula's constants
    r, c = 100, 37
    assert ash[2, r, c] == pytest.approx(min(max((float(b14[r, c]) - 243) / 60, 0), 1), abs=1e-6)


def test_frame_selection_is_frame_major(sample_root):
    folder = _record(sample_root)
    single = {f: records.build_input(folder, InputSpec(frames=(f,))) for f in (3, 4, 5)}
    stacked = records.build_input(folder, InputSpec(frames=(3, 4, 5)))
    assert stacked.shape == (9, 256, 256)
    for i, f in enumerate((3, 4, 5)):
        np.testing.assert_array_equal(stacked[3 * i : 3 * i + 3], single[f])
    every = records.build_input(folder, InputSpec(frames=tuple(range(8))))
    assert every.shape == (24, 256, 256)


def test_bands_normalised_with_pool_statistics(sample_root):
    folders = [sample_root / "train" / p.name for p in (sample_root / "train").iterdir()]
    spec = InputSpec(channels="bands", normalize="meanstd", frames=(4,))
    stats = records.band_statistics(folders, spec.bands, tuple(range(8)))
    values = np.stack([records.build_input(f, spec, stats) for f in folders])
    assert values.shape == (3, 9, 256, 256)
    assert abs(values.mean()) < 0.5
    minmax = InputSpec(channels="bands", normalize="minmax", frames=(4,))
    scaled = records.build_input(folders[0], minmax, stats)
    assert scaled.min() >= 0 and scaled.max() <= 1
    raw = np.load(folders[0] / "band_08.npy")[:, :, 4]
    expected = (raw - stats["mean"][0]) / stats["std"][0]
    np.testing.assert_allclose(
        records.build_input(folders[0], spec, stats)[0], expected, rtol=1e-4, atol=1e-4
    )


def test_labels_and_soft_labels(sample_root):
    folder = sample_root / "train" / TRAIN_WITH_CONTRAIL
    mask = records.load_mask(folder)
    individual = np.load(folder / "human_individual_masks.npy")[:, :, 0, :]
    soft = records.load_soft_label(folder)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_allclose(soft, individual.mean(axis=-1))
    assert mask.sum() > 0
    # the aggregate is "more than half of the annotators"
    assert np.array_equal(mask.astype(bool), individual.mean(axis=-1) > 0.5)
    assert records.load_soft_label(_record(sample_root, "validation")) is None


def test_list_records_keeps_ids_as_strings(sample_root):
    ids = records.list_records(sample_root, "train")
    assert ids == sorted(ids) and all(isinstance(i, str) and i.isdigit() for i in ids)
    assert "100071707854144929" in ids  # 18 digits, above 2**53


def test_missing_band(sample_copy):
    folder = _record(sample_copy)
    (folder / "band_14.npy").unlink()
    with pytest.raises(EkError, match=r"band_14\.npy: missing"):
        records.build_input(folder, InputSpec())


def test_truncated_npy(sample_copy):
    path = _record(sample_copy) / "band_11.npy"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(EkError, match=r"band_11\.npy: unreadable or truncated"):
        records.build_input(path.parent, InputSpec())


def test_wrong_shape(sample_copy):
    path = _record(sample_copy) / "band_15.npy"
    np.save(path, np.zeros((256, 256, 3), np.float32))
    with pytest.raises(EkError, match=r"band_15\.npy: expected"):
        records.build_input(path.parent, InputSpec())


def test_nan_in_band(sample_copy):
    path = _record(sample_copy) / "band_11.npy"
    array = np.load(path)
    array[3, 3, 4] = np.nan
    np.save(path, array)
    with pytest.raises(EkError, match=r"band_11\.npy: contains NaN"):
        records.build_input(path.parent, InputSpec())


def test_non_numeric_record_folder(sample_copy):
    (sample_copy / "train" / "notes").mkdir()
    with pytest.raises(EkError, match="notes: not a record folder"):
        records.list_records(sample_copy, "train")


def test_data_folder_without_train(tmp_path):
    with pytest.raises(EkError, match="no 'train/' folder"):
        records.list_records(tmp_path, "train")


def test_loader_workers_are_capped_at_the_cpus():
    import os

    from ensemble_kit.data.loader import worker_count

    cpus = len(os.sched_getaffinity(0))
    assert worker_count(cpus + 6) == cpus and worker_count(0) == 0 and worker_count(1) == 1
