"""Image-task caches: inputs (N, C, H, W), labels (N, C, H, W) for C > 1 and (N, H, W) for one."""

from __future__ import annotations

import os

import numpy as np

from ensemble_kit.data.cache import ensure_image_inputs, ensure_image_labels
from ensemble_kit.data.images import fit_task, list_images, read_image, read_masks
from ensemble_kit.data.synth_images import synth_task, write_synthetic_task
from ensemble_kit.layout import Layout
from ensemble_kit.task import task_from_dict


def test_folder_caches_hold_what_the_readers_read(tmp_path):
    root = tmp_path / "data"
    write_synthetic_task(root, synth_task("folder", 3, 24), {"train": 5, "validation": 2}, 0)
    task = fit_task(task_from_dict({"extends": "folder", "classes": ["a", "b", "c"]}), root)
    layout = Layout(tmp_path / "folds")
    inputs = ensure_image_inputs(layout, task, root, "train")
    labels = ensure_image_labels(layout, task, root, "train")
    ids = list_images(task, root, "train")
    assert inputs.ids == labels.ids == ids
    assert inputs.arrays["inputs"].shape == (5, 3, 24, 24)
    assert inputs.arrays["inputs"].dtype == np.uint8
    first = read_image(task, root / "train" / "images" / f"{ids[0]}.png")
    assert np.array_equal(inputs.arrays["inputs"][0], np.rint(first * 255).astype(np.uint8))
    assert labels.arrays["labels"].shape == (5, 3, 24, 24)
    assert np.array_equal(labels.arrays["labels"], read_masks(task, root, "train", ids))
    # one class: (N, H, W), as the contrail labels
    one = fit_task(task_from_dict({"extends": "folder"}), root)
    single = ensure_image_labels(layout, one, root, "train").arrays["labels"]
    assert single.shape == (5, 24, 24)
    assert np.array_equal(single, read_masks(task, root, "train", ids).max(axis=1))


def test_rebuilt_when_a_mask_changes_and_reused_otherwise(tmp_path):
    root = tmp_path / "data"
    write_synthetic_task(root, synth_task("steel"), {"train": 3, "test": 1}, 0)
    task = task_from_dict({"extends": "steel"})
    layout = Layout(tmp_path / "folds")
    first = ensure_image_labels(layout, task, root, "train")
    assert first.arrays["labels"].shape == (3, 4, 256, 1600)
    built = (first.path / "labels.npy").stat().st_mtime_ns
    assert (
        ensure_image_labels(layout, task, root, "train").path / "labels.npy"
    ).stat().st_mtime_ns == built
    csv = root / "train.csv"
    image = sorted(p.name for p in (root / "train_images").iterdir())[0]
    csv.write_text(f"ImageId,ClassId,EncodedPixels\n{image},2,1 3\n")
    os.utime(csv, ns=(built + 10**9, built + 10**9))
    again = ensure_image_labels(layout, task, root, "train").arrays["labels"]
    assert again[0, 1, :3, 0].tolist() == [1, 1, 1] and again.sum() == 3
