import numpy as np
import pandas as pd
import pytest

from ensemble_kit import data
from ensemble_kit.config import InputSpec
from ensemble_kit.data.cache import decode_inputs, ensure_inputs, ensure_labels, load_labels
from ensemble_kit.errors import EkError
from ensemble_kit.layout import Layout


def test_input_cache_round_trip(sample_root, tmp_path):
    layout = Layout(tmp_path / "folds")
    spec = InputSpec(channels="ash", frames=(3, 4, 5))
    entry = ensure_inputs(layout, sample_root, "train", spec, workers=1)
    cached = entry.arrays["inputs"]
    assert cached.dtype == np.uint8 and cached.shape == (3, 9, 256, 256)
    assert isinstance(cached, np.memmap)
    for row, rid in enumerate(entry.ids):
        direct = data.build_input(sample_root / "train" / rid, spec)
        np.testing.assert_allclose(decode_inputs(cached[row]), direct, atol=0.5 / 255 + 1e-6)
    # a second call reuses the entry (no rebuild), and the same spec shares it
    mtime = (entry.path / "inputs.npy").stat().st_mtime_ns
    again = ensure_inputs(layout, sample_root, "train", InputSpec(channels="ash", frames=(3, 4, 5)))
    assert again.path == entry.path and (again.path / "inputs.npy").stat().st_mtime_ns == mtime
    other = ensure_inputs(layout, sample_root, "train", InputSpec(channels="ash", frames=(4,)))
    assert other.path != entry.path and other.arrays["inputs"].shape[1] == 3


def test_band_cache_is_float16_and_parallel(sample_root, tmp_path):
    layout = Layout(tmp_path / "folds")
    spec = InputSpec(channels="bands", frames=(4,))
    entry = ensure_inputs(layout, sample_root, "train", spec, workers=2)
    assert entry.arrays["inputs"].dtype == np.float16
    assert entry.arrays["inputs"].shape == (3, 9, 256, 256)
    assert np.isfinite(entry.arrays["inputs"]).all()


def test_label_cache(sample_root, tmp_path):
    layout = Layout(tmp_path / "folds")
    entry = ensure_labels(layout, sample_root, "train")
    for row, rid in enumerate(entry.ids):
        folder = sample_root / "train" / rid
        np.testing.assert_array_equal(entry.arrays["labels"][row], data.load_mask(folder))
        soft = data.load_soft_label(folder)
        np.testing.assert_array_equal(
            entry.arrays["soft"][row], np.rint(soft * 255).astype(np.uint8)
        )
    records = pd.DataFrame(
        {"record_id": ["1002777035567823518", entry.ids[1]], "split": ["validation", "train"]}
    )
    labels = load_labels(layout, sample_root, records)
    assert labels[0].sum() == 25 and np.array_equal(labels[1], entry.arrays["labels"][1])


def test_bad_record_fails_the_build_and_leaves_nothing(sample_copy, tmp_path):
    layout = Layout(tmp_path / "folds")
    bad = sample_copy / "test" / "1002653297254493116" / "band_15.npy"
    bad.write_bytes(b"garbage")
    with pytest.raises(EkError, match=r"band_15\.npy"):
        ensure_inputs(layout, sample_copy, "test", InputSpec(), workers=1)
    assert not any(p.name.endswith("inputs.npy") for p in layout.cache_dir.rglob("*"))
