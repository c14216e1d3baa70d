import numpy as np
import pandas as pd
import pytest

from ensemble_kit.config import InputSpec
from ensemble_kit.data import records
from ensemble_kit.data.cache import (
    band_stats,
    decode_inputs,
    ensure_inputs,
    ensure_labels,
    load_labels,
)
from ensemble_kit.data.sources import changed_sources
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
        direct = records.build_input(sample_root / "train" / rid, spec)
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
        np.testing.assert_array_equal(entry.arrays["labels"][row], records.load_mask(folder))
        soft = records.load_soft_label(folder)
        np.testing.assert_array_equal(
            entry.arrays["soft"][row], np.rint(soft * 255).astype(np.uint8)
        )
    wanted = pd.DataFrame(
        {"record_id": ["1002777035567823518", entry.ids[1]], "split": ["validation", "train"]}
    )
    labels = load_labels(layout, sample_root, wanted)
    assert labels[0].sum() == 25 and np.array_equal(labels[1], entry.arrays["labels"][1])


def test_bad_record_fails_the_build_and_leaves_nothing(sample_copy, tmp_path):
    layout = Layout(tmp_path / "folds")
    bad = sample_copy / "test" / "1002653297254493116" / "band_15.npy"
    bad.write_bytes(b"garbage")
    with pytest.raises(EkError, match=r"band_15\.npy"):
        ensure_inputs(layout, sample_copy, "test", InputSpec(), workers=1)
    assert not any(p.name.endswith("inputs.npy") for p in layout.cache_dir.rglob("*"))


@pytest.fixture
def small_data(tmp_path):
    from ensemble_kit.data.synth import write_synthetic

    root = tmp_path / "data"
    write_synthetic(root, n_train=6, n_validation=3, n_test=2, size=32, seed=1)
    return root


def _rewrite(path, change):
    """Rewrite a .npy in place (same size, new content): only its mtime tells."""
    array = np.load(path)
    np.save(path, change(array))


def test_label_cache_is_rebuilt_when_a_mask_changes(small_data, tmp_path, caplog):
    layout = Layout(tmp_path / "folds")
    first = ensure_labels(layout, small_data, "train")
    rid = first.ids[2]
    mask_file = small_data / "train" / rid / "human_pixel_masks.npy"
    _rewrite(mask_file, lambda m: 1 - m)
    old_row = np.array(first.arrays["labels"][2])
    again = ensure_labels(layout, small_data, "train")
    assert again.path == first.path
    np.testing.assert_array_equal(again.arrays["labels"][2], np.load(mask_file)[:, :, 0] > 0)
    assert not np.array_equal(again.arrays["labels"][2], old_row)
    assert f"train/{rid}/human_pixel_masks.npy" in caplog.text
    # the individual masks are a source too (soft labels)
    individual = small_data / "train" / rid / "human_individual_masks.npy"
    _rewrite(individual, np.zeros_like)
    assert ensure_labels(layout, small_data, "train").arrays["soft"][2].max() == 0


def test_input_cache_is_rebuilt_when_a_band_changes(small_data, tmp_path):
    layout = Layout(tmp_path / "folds")
    spec = InputSpec(channels="ash", frames=(4,))
    first = ensure_inputs(layout, small_data, "validation", spec)
    folder = small_data / "validation" / first.ids[1]
    _rewrite(folder / "band_14.npy", lambda b: b + 3.0)
    unused = small_data / "validation" / first.ids[0] / "band_08.npy"
    again = ensure_inputs(layout, small_data, "validation", spec)
    assert again.path == first.path
    direct = records.build_input(folder, spec)
    np.testing.assert_allclose(decode_inputs(again.arrays["inputs"][1]), direct, atol=0.5 / 255)
    assert not np.array_equal(again.arrays["inputs"][1], first.arrays["inputs"][1])
    # a band the spec does not read changes nothing
    stamp = (again.path / "inputs.npy").stat().st_mtime_ns
    _rewrite(unused, lambda b: b + 1.0)
    assert (
        ensure_inputs(layout, small_data, "validation", spec).path / "inputs.npy"
    ).stat().st_mtime_ns == stamp


def test_band_statistics_follow_the_sampled_train_files(small_data, tmp_path):
    layout = Layout(tmp_path / "folds")
    spec = InputSpec(channels="bands", bands=(8, 14), frames=(4,), normalize="meanstd")
    before = ensure_inputs(layout, small_data, "validation", spec)
    codes_before = np.array(before.arrays["inputs"])
    for band_path in (small_data / "train").glob("*/band_08.npy"):
        _rewrite(band_path, lambda b: b + 10.0)
    after = ensure_inputs(layout, small_data, "validation", spec)
    values = np.concatenate(
        [np.load(p).ravel() for p in sorted((small_data / "train").glob("*/band_08.npy"))]
    ).astype(np.float64)
    stats = band_stats(layout, small_data, spec)
    assert stats["mean"][0] == pytest.approx(values.mean(), rel=1e-9)
    # the validation inputs were normalised with the new statistics: 10 K lower
    shift = 10.0 / stats["std"][0]
    np.testing.assert_allclose(
        after.arrays["inputs"][:, 0].astype(np.float32),
        codes_before[:, 0].astype(np.float32) - shift,
        atol=0.02,
    )


def test_changed_sources_names_what_changed(small_data, tmp_path):
    layout = Layout(tmp_path / "folds")
    recorded = {
        "train/labels": ensure_labels(layout, small_data, "train").sources,
        "train/inputs": ensure_inputs(layout, small_data, "train", InputSpec()).sources,
    }
    assert changed_sources(small_data, recorded) == []
    mask = next((small_data / "train").glob("*/human_pixel_masks.npy"))
    _rewrite(mask, lambda m: m)
    assert changed_sources(small_data, recorded) == [
        "train/labels (human_pixel_masks.npy, human_individual_masks.npy)"
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_temp(
    synth_root, tiny_disk, tiny_config_path, workers
):
    from click.testing import CliRunner

    from ensemble_kit.cli import main

    workdir = tiny_disk / "folds"
    workdir.mkdir()
    (workdir / "big").write_bytes(b"x" * ((2 << 20) - 200_000))  # leave ~200 kB free
    args = ["prepare", "--data", str(synth_root), "--workdir", str(workdir), "--split", "train"]
    result = CliRunner().invoke(main, [*args, "--workers", workers, str(tiny_config_path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no space left on device (needed ~" in lines[0], result.output
    assert [p.name for p in (workdir / "cache").iterdir()] == []


def test_allocation_reserves_the_blocks(tmp_path, tiny_disk, monkeypatch):
    import shutil

    from ensemble_kit.data.cache import allocate_arrays

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 0, 1 << 40))
    with pytest.raises(EkError, match=r"no space left on device \(needed ~4 MB\)"):
        allocate_arrays(tiny_disk / "entry", {"inputs": ((4, 1024, 1024), np.dtype(np.uint8))})


def _dies(task):
    import os

    if task == 2:
        os._exit(1)
    return task


def test_a_worker_that_dies_ends_the_run_in_one_line():
    from ensemble_kit.data.cache import run_in_workers

    with pytest.raises(EkError, match="cache train: a worker process died"):
        list(run_in_workers(_dies, [0, 1, 2, 3], workers=2, label="cache train"))
    assert sorted(run_in_workers(_dies, [0, 1, 3], workers=2, label="x")) == [0, 1, 3]


def test_a_dead_process_build_is_removed(tmp_path):
    import os
    import subprocess

    from ensemble_kit.data.cache import remove_dead_builds

    ended = subprocess.Popen(["true"])
    ended.wait()
    entry = tmp_path / "cache" / "train-abc"
    stale = entry.with_name(f".{entry.name}.tmp-{ended.pid}")
    mine = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    stale.mkdir(parents=True), mine.mkdir()
    remove_dead_builds(entry)
    assert not stale.exists() and mine.exists()


def test_a_record_without_a_mask_is_named(small_data, tmp_path):
    layout = Layout(tmp_path / "folds")
    ids = sorted(p.name for p in (small_data / "train").iterdir())
    (small_data / "train" / ids[1] / "human_pixel_masks.npy").unlink()
    records = pd.DataFrame({"record_id": ids, "split": "train"})
    with pytest.raises(EkError, match=rf"train/{ids[1]}: no human_pixel_masks.npy \(1 such"):
        load_labels(layout, small_data, records)


def test_annotator_masks_of_another_size_are_named(small_data, tmp_path):
    """Was ``ValueError: could not broadcast``, with no file named."""
    layout = Layout(tmp_path / "folds")
    ids = sorted(p.name for p in (small_data / "train").iterdir())
    folder = small_data / "train" / ids[0]
    np.save(folder / "human_individual_masks.npy", np.zeros((8, 8, 1, 3), np.int32))
    records = pd.DataFrame({"record_id": ids, "split": "train"})
    with pytest.raises(EkError, match=rf"{ids[0]}/human_individual_masks.npy: shape \(8, 8\)"):
        load_labels(layout, small_data, records)
