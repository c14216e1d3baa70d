"""Image-task readers: image formats and channels, PNG and CSV masks, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ensemble_kit.data.images import (
    fit_task,
    list_images,
    read_image,
    read_mask_csv,
    read_mask_file,
    read_masks,
)
from ensemble_kit.errors import EkError
from ensemble_kit.task import builtin_task, task_from_dict

FOLDER = task_from_dict({"extends": "folder", "size": [4, 6], "channels": 3})
TWO = task_from_dict({"extends": "folder", "classes": ["a", "b"], "size": [4, 6]})
STEEL_SMALL = task_from_dict({"extends": "steel", "size": [4, 5]})


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, pixels)
    else:
        Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("suffix", [".png", ".tif", ".npy"])
@pytest.mark.parametrize("channels", [1, 3])
def test_images_in_every_format_and_channel_count(tmp_path, suffix, channels):
    rng = np.random.default_rng(0)
    shape = (4, 6) if channels == 1 else (4, 6, 3)
    pixels = rng.integers(0, 256, shape).astype(np.uint8)
    path = save(tmp_path / f"a{suffix}", pixels)
    image = read_image(FOLDER, path)
    assert image.shape == (3, 4, 6) and image.dtype == np.float32
    expected = pixels if channels == 3 else np.repeat(pixels[:, :, None], 3, axis=2)
    assert np.array_equal(np.rint(image.transpose(1, 2, 0) * 255).astype(np.uint8), expected)
    gray = read_image(task_from_dict({"extends": "folder", "channels": 1}), path)
    assert gray.shape == (1, 4, 6)


def test_jpg_reads_as_the_task_s_channels(tmp_path):
    path = tmp_path / "x.jpg"
    Image.fromarray(np.full((4, 6), 200, np.uint8)).save(path)
    image = read_image(FOLDER, path)
    assert image.shape == (3, 4, 6) and abs(float(image.mean()) - 200 / 255) < 0.02


def test_image_of_another_size_names_the_image(tmp_path):
    path = save(tmp_path / "odd.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(EkError, match=r"odd.png: image is 5 x 6, task folder expects 4 x 6"):
        read_image(FOLDER, path)


def test_png_masks_one_class_and_several(tmp_path):
    values = np.array([[0, 1, 2, 0, 0, 0]] * 4, np.uint8)
    path = save(tmp_path / "m.png", values)
    one = read_mask_file(FOLDER, path)
    assert one.shape == (1, 4, 6) and one[0, 0].tolist() == [0, 1, 1, 0, 0, 0]
    two = read_mask_file(TWO, path)
    assert two[0, 0].tolist() == [0, 1, 0, 0, 0, 0] and two[1, 0].tolist() == [0, 0, 1, 0, 0, 0]
    save(tmp_path / "bad.png", values * 2)  # a value 4 with two classes
    with pytest.raises(EkError, match="bad.png: mask value 4 is above the task's 2 classes"):
        read_mask_file(TWO, tmp_path / "bad.png")


def write_csv(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "train.csv"
    path.write_text("\n".join(("ImageId,ClassId,EncodedPixels", *rows)) + "\n")
    return path


def test_csv_masks_decode_per_class(tmp_path):
    path = write_csv(tmp_path, "a.jpg,2,1 3 10 5", "b.jpg,4,20 1")
    rows = read_mask_csv(STEEL_SMALL, path, (4, 5))
    assert [(r.line, r.image_id, r.class_index) for r in rows] == [
        (2, "a.jpg", 1),
        (3, "b.jpg", 3),
    ]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("a.jpg,1,19 3", "past the image end"),
        ("a.jpg,1,1 5 3 2", "overlap"),
        ("a.jpg,1,10 2 1 2", "not ascending"),
        ("a.jpg,5,1 2", "class '5' is outside the task's classes 1..4"),
        ("a.jpg,0,1 2", "outside"),
        ("a.jpg,1,1 x", "not a positive integer"),
    ],
)
def test_bad_csv_rows_name_file_and_row(tmp_path, row, problem):
    path = write_csv(tmp_path, "b.jpg,1,1 1", row)
    with pytest.raises(EkError) as err:
        read_mask_csv(STEEL_SMALL, path, (4, 5))
    message = str(err.value)
    assert message.startswith(f"{path}: row 3: ") and problem in message
    assert "\n" not in message


def test_second_row_for_a_pair_and_unknown_image(tmp_path):
    path = write_csv(tmp_path, "a.jpg,1,1 1", "a.jpg,1,3 1")
    with pytest.raises(EkError, match="row 3: second row"):
        read_mask_csv(STEEL_SMALL, path, (4, 5))
    root = tmp_path / "data"
    save(root / "train_images" / "a.jpg", np.zeros((4, 5), np.uint8))
    (root / "train.csv").write_text("ImageId,ClassId,EncodedPixels\nzz.jpg,1,1 1\n")
    with pytest.raises(EkError, match="row 2: image 'zz.jpg' is not in the data"):
        read_masks(STEEL_SMALL, root, "train", ["a.jpg"])


def test_csv_masks_painted_column_major(tmp_path):
    root = tmp_path / "data"
    for name in ("a.jpg", "b.jpg"):
        save(root / "train_images" / name, np.zeros((4, 5), np.uint8))
    (root / "train.csv").write_text("ImageId,ClassId,EncodedPixels\na.jpg,3,5 2\n")
    assert list_images(STEEL_SMALL, root, "train") == ["a.jpg", "b.jpg"]
    masks = read_masks(STEEL_SMALL, root, "train", ["b.jpg", "a.jpg"])
    assert masks.shape == (2, 4, 4, 5) and not masks[0].any()
    expected = np.zeros((4, 5), np.uint8)
    expected[0, 1] = expected[1, 1] = 1  # pixels 5, 6 of 4-row columns: top of column 1
    assert np.array_equal(masks[1, 2], expected) and masks[1].sum() == 2


def test_fit_task_fills_size_and_refuses_a_foreign_folder(tmp_path):
    root = tmp_path / "data"
    save(root / "train" / "images" / "x.png", np.zeros((7, 9, 3), np.uint8))
    with pytest.raises(EkError, match="does not fit task folder: no train/masks"):
        fit_task(builtin_task("folder"), root)
    (root / "train" / "masks").mkdir()
    fitted = fit_task(builtin_task("folder"), root)
    assert fitted.size == (7, 9) and fitted.channels == 3
