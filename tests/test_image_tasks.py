"""Image tasks end to end: `ek folds --task`, `ek cv`, `ek blend --oof`, `ek submit` and the
`ek kaggle` notebook on synthetic `folder` (two classes) and `steel` data.

The holdout check decodes the submission and scores it with code written here from the
`folder` task's contract (docs/reference/task.md), not with ek's own decoder or metric.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SMALL_UNET
from PIL import Image
from test_kaggle import RUNNER, _outputs, offline_command, shadow_packages

from ensemble_kit.cli import main
from ensemble_kit.inference.bundle import predict_bundle
from ensemble_kit.inference.notebook import notebook
from ensemble_kit.task import builtin_task

CONFIG = """
name: {name}
input: {{channels: image}}
model: {{arch: Unet, encoder: tu-test_resnet, encoder_weights: none, decoder: {decoder}}}
optim: {{name: adam, lr: 0.003}}
augment: {{hflip: 0.5, crop: {crop}, crop_masked: 0.5}}
train: {{epochs: 2, batch_size: 4, max_steps_per_epoch: 3, seed: 0}}
tta: [identity, hflip]
"""


def ek(*args, check: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if check:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """Two classes in the `folder` layout, 2 folds of a tiny model, blended and submitted."""
    base = tmp_path_factory.mktemp("folder")
    data, workdir = base / "data", base / "folds"
    ek("synth", "--task", "folder", "--classes", "2", "--out", data, "--train", "24",
       "--validation", "8", "--test", "6", "--size", "64")  # fmt: skip
    ek("folds", "--data", data, "--task", data / "task.yaml", "--folds", "2", "--workdir", workdir)
    config = base / "tiny_image.yaml"
    config.write_text(CONFIG.format(name="tiny_image", crop="[32, 48]", decoder=SMALL_UNET))
    ek("cv", "--workdir", workdir, config)
    ek("blend", "--oof", "--workdir", workdir, "--steps", "2")
    ek("submit", "--workdir", workdir, "--split", "validation", "--out", base / "validation.csv")
    ek("submit", "--workdir", workdir, "--out", base / "submission.csv")
    return base


def decode_contract(rle: str, height: int, width: int) -> np.ndarray:
    """The `folder` contract: 1-indexed `start length` pairs, pixels numbered top to bottom
    then left to right; an empty field is an empty mask."""
    flat = np.zeros(height * width, dtype=bool)
    numbers = [int(n) for n in rle.split()]
    for start, length in zip(numbers[0::2], numbers[1::2]):
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape(width, height).T


def contract_mean_dice(csv_path: Path, masks_dir: Path, classes: list[str]) -> float:
    """Mean over (image, class) pairs of dice, 1 where truth and prediction are both empty."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "rle"]
    predicted = dict(rows[1:])
    scores = []
    for mask_file in sorted(masks_dir.glob("*.png")):
        value = np.asarray(Image.open(mask_file))
        for index, name in enumerate(classes, start=1):
            truth = value == index
            pred = decode_contract(predicted[f"{mask_file.stem}_{name}"], *value.shape)
            total = truth.sum() + pred.sum()
            scores.append(1.0 if total == 0 else 2.0 * (truth & pred).sum() / total)
    assert len(scores) == len(predicted)
    return float(np.mean(scores))


def test_folder_submission_scores_the_holdout_the_blend_reported(folder_run):
    blend = json.loads((folder_run / "folds" / "blend.json").read_text())
    assert blend["scores"]["metric"] == "mean_dice"
    score = contract_mean_dice(
        folder_run / "validation.csv",
        folder_run / "data" / "validation" / "masks",
        ["class_1", "class_2"],
    )
    assert score == pytest.approx(blend["scores"]["holdout"], abs=1e-12)


def test_folder_oof_holds_one_channel_per_class(folder_run):
    oof = np.load(folder_run / "folds" / "tiny_image" / "oof.npy")
    assert oof.dtype == np.uint8 and oof.shape == (24, 2, 64, 64)
    holdout = np.load(folder_run / "folds" / "tiny_image" / "holdout.npy")
    assert holdout.shape == (8, 2, 64, 64)


def test_folder_submission_follows_the_sample_submission(folder_run):
    sample = (folder_run / "data" / "sample_submission.csv").read_text().splitlines()
    written = (folder_run / "submission.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in written] == [line.split(",")[0] for line in sample]
    assert len(written) == 1 + 6 * 2


def run_notebook(bundle: Path, data: Path, tmp_path: Path) -> tuple[Path, str]:
    """The bundle's notebook as Kaggle runs it: offline, from its wheel, Kaggle's packages."""
    working = tmp_path / "working"
    working.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EK_") and k != "PYTHONPATH"}
    env.update(
        PYTHONPATH=str(shadow_packages(tmp_path / "shadow")),
        PWD=str(tmp_path),
        EK_DATA=str(data),
        EK_BUNDLE=str(bundle),
        EK_OUT="working/submission.csv",
        HF_HUB_OFFLINE="1",
    )
    executed = tmp_path / "executed.ipynb"
    command = [sys.executable, "-c", RUNNER, str(bundle / "inference.ipynb"), str(working)]
    run = subprocess.run(
        offline_command(command + [str(executed)]), env=env, cwd=tmp_path, capture_output=True,
        text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return working / "submission.csv", _outputs(executed)


def test_folder_bundle_prediction_equals_submit(folder_run, tmp_path):
    """The notebook's one call on the `ek export` bundle writes `ek submit`'s bytes."""
    ek("export", "--workdir", folder_run / "folds")
    bundle = folder_run / "folds" / "export"
    assert json.loads((bundle / "manifest.json").read_text())["task"]["name"] == "folder"
    out = tmp_path / "bundle.csv"
    predict_bundle(bundle, folder_run / "data", out, device="cpu")
    assert out.read_bytes() == (folder_run / "submission.csv").read_bytes()


def test_task_notebook_reads_the_task_s_data_and_checks_its_csv():
    steel = builtin_task("steel")
    cells = notebook("steel-test", "Steel task test", "w.whl", "0", steel)["cells"]
    text = {cell["id"]: "".join(cell["source"]) for cell in cells}
    assert "/kaggle/input/severstal-steel-defect-detection" in text["parameters"]
    assert '"test": "test_images"' in text["checks"] and "check_task_submission" in text["check"]
    contrails = notebook("c-test", "Contrails test", "w.whl", "0")["cells"]
    assert "check_task_submission" not in "".join(contrails[5]["source"])


def test_folds_trained_on_changed_images_are_refused(folder_run):
    """A DONE fold records the image and mask folders it read; a changed image refuses it."""
    image = sorted((folder_run / "data" / "train" / "images").glob("*.png"))[0]
    config = folder_run / "tiny_image.yaml"
    before = image.stat()
    try:
        os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        result = ek("cv", "--workdir", folder_run / "folds", config, check=False)
        assert result.exit_code == 2
        (line,) = result.output.strip().splitlines()
        assert "trained on data that changed since (train/inputs (train/images))" in line
    finally:
        os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert ek("cv", "--workdir", folder_run / "folds", config).exit_code == 0


@pytest.mark.slow
def test_folder_notebook_offline_equals_submit(folder_run, tmp_path):
    bundle = tmp_path / "kaggle"
    ek("kaggle", "--workdir", folder_run / "folds", "--out", bundle, "--slug", "folder-test",
       "--title", "Folder task test", "--device", "cpu")  # fmt: skip
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["task"]["classes"] == ["class_1", "class_2"]
    written, printed = run_notebook(bundle, folder_run / "data", tmp_path)
    assert "'rows': 12" in printed
    assert written.read_bytes() == (folder_run / "submission.csv").read_bytes()


@pytest.mark.slow
def test_steel_runs_end_to_end_with_its_submission_format(tmp_path):
    """Synthetic Severstal data (256 x 1600, 4 classes, train.csv RLE masks): the three
    commands and the notebook; the CSV is ImageId_ClassId,EncodedPixels, 4 rows per image."""
    data, workdir = tmp_path / "data", tmp_path / "folds"
    ek("synth", "--task", "steel", "--out", data, "--train", "12", "--test", "3")
    ek("folds", "--data", data, "--task", "steel", "--folds", "2", "--workdir", workdir)
    config = tmp_path / "tiny_steel.yaml"
    config.write_text(
        CONFIG.format(name="tiny_steel", crop="[256, 400]", decoder=SMALL_UNET).replace(
            "epochs: 2", "epochs: 1"
        )
    )
    ek("cv", "--workdir", workdir, config)
    assert np.load(workdir / "tiny_steel" / "oof.npy", mmap_mode="r").shape == (12, 4, 256, 1600)
    ek("blend", "--oof", "--workdir", workdir, "--steps", "2")
    out = tmp_path / "submission.csv"
    ek("submit", "--workdir", workdir, "--out", out)
    lines = out.read_text().splitlines()
    assert lines[0] == "ImageId_ClassId,EncodedPixels" and len(lines) == 1 + 3 * 4
    sample = (data / "sample_submission.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == [line.split(",")[0] for line in sample]
    bundle = tmp_path / "kaggle"
    ek("kaggle", "--workdir", workdir, "--out", bundle, "--slug", "steel-test",
       "--title", "Steel task test", "--device", "cpu")  # fmt: skip
    notebook = json.loads((bundle / "inference.ipynb").read_text())
    assert "/kaggle/input/severstal-steel-defect-detection" in "".join(
        notebook["cells"][1]["source"]
    )
    written, _ = run_notebook(bundle, data, tmp_path)
    assert written.read_bytes() == out.read_bytes()


def test_show_on_an_image_task_is_one_line(folder_run):
    result = ek("show", "anything", "--workdir", folder_run / "folds", check=False)
    assert result.exit_code == 2
    assert result.output.strip() == (
        "ek: error: ek show draws contrail records; task folder has images (not drawn yet)"
    )
