"""Tasks: built-ins, task files, recording in folds/, and refusing data that does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from ensemble_kit.cli import main
from ensemble_kit.data.synth_images import synth_task, write_synthetic_task
from ensemble_kit.errors import EkError
from ensemble_kit.task import (
    BUILTIN_TASKS,
    Task,
    builtin_task,
    load_task,
    resolve_task,
    task_from_dict,
)


def run(*args: str):
    return CliRunner().invoke(main, list(map(str, args)))


def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ek: error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder") / "data"
    counts = {"train": 10, "validation": 4, "test": 3}
    write_synthetic_task(root, synth_task("folder", 2, 32), counts, seed=0)
    return root


def test_builtins_load_and_show_round_trips():
    assert [builtin_task(n).name for n in BUILTIN_TASKS] == ["contrails", "steel", "folder"]
    steel = builtin_task("steel")
    assert (steel.size, steel.n_classes, steel.metric) == ((256, 1600), 4, "mean_dice")
    listed = run("tasks")
    assert listed.exit_code == 0 and len(listed.output.strip().splitlines()) == 3
    for name in BUILTIN_TASKS:
        shown = run("tasks", "show", name)
        assert shown.exit_code == 0
        assert task_from_dict(yaml.safe_load(shown.output)) == builtin_task(name)
    one_line_error(run("tasks", "show", "steal"), "did you mean steel")


def test_contrails_row_ids_and_defaults_are_todays():
    contrails = builtin_task("contrails")
    assert contrails.submission.header == ("record_id", "encoded_pixels")
    assert contrails.submission.empty == "-" and contrails.row_ids("123") == ["123"]
    assert resolve_task(None) == contrails


def test_extends_overrides_and_row_ids(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("extends: folder\nclasses: [road, river]\nmasks: {order: row}\n")
    task = load_task(path)
    assert task.classes == ("road", "river") and task.masks.order == "row"
    assert task.masks.train == "train/masks"  # the rest of the mapping comes from folder
    assert task.row_ids("a1") == ["a1_road", "a1_river"]
    assert builtin_task("folder").row_ids("a1") == ["a1"]
    assert Task.load(path) == task


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("extends: folder\nclases: [a]\n", ["clases", "did you mean classes"]),
        ("extends: folder\nmasks: {ordr: row}\n", ["masks.ordr"]),
        ("extends: folder\nclasses: [Road]\n", ["[a-z0-9_]+"]),
        ("extends: folder\nmetric: dice\n", ["metric", "mean_dice"]),
        ("extends: foldr\n", ["did you mean folder"]),
        ("extends: folder\nversion: 2\n", ["version"]),
        ("extends: folder\nclasses: [a, b]\nsubmission: {id: '{image}'}\n", ["{class}"]),
    ],
)
def test_bad_task_files_are_one_line_errors(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(EkError) as err:
        load_task(path)
    for word in words:
        assert word in str(err.value)
    data = tmp_path / "data"
    data.mkdir()
    one_line_error(run("folds", "--data", data, "--task", path, "--workdir", tmp_path / "f"))
    assert not (tmp_path / "f").exists()


def test_contrails_writes_no_task_file_and_same_bytes(synth_root, tmp_path):
    plain, named = tmp_path / "plain", tmp_path / "named"
    assert run("folds", "--data", synth_root, "--workdir", plain, "--folds", 3).exit_code == 0
    result = run(
        "folds", "--data", synth_root, "--workdir", named, "--folds", 3, "--task", "contrails"
    )
    assert result.exit_code == 0
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in named.iterdir())
    for name in ("splits.csv", "splits.json"):
        plain_text = (plain / name).read_text()
        assert plain_text == (named / name).read_text().replace(str(named), str(plain))
    assert not (plain / "task.yaml").exists()
    assert "task" not in json.loads((plain / "splits.json").read_text())


def test_folder_task_recorded_and_checked(folder_root, tmp_path):
    task_file = tmp_path / "two.yaml"
    task_file.write_text("extends: folder\nclasses: [class_1, class_2]\n")
    workdir = tmp_path / "folds"
    result = run(
        "folds", "--data", folder_root, "--workdir", workdir, "--folds", 2, "--task", task_file
    )
    assert result.exit_code == 0, result.output
    recorded = load_task(workdir / "task.yaml")
    assert recorded.size == (32, 32) and recorded.channels == 3  # filled in from the data
    meta = json.loads((workdir / "splits.json").read_text())
    assert meta["task"] == "folder" and meta["task_digest"] == recorded.digest
    splits = (workdir / "splits.csv").read_text().splitlines()
    assert len(splits) == 1 + 10 + 4 and sum(line.endswith(",-1") for line in splits) == 4
    # another task for these splits, or pseudo-labels of a task without frames: refused
    one_line_error(
        run("cv", "--workdir", workdir, "--task", "steel", "configs/tiny.yaml"), "folder"
    )
    one_line_error(run("pseudo", "--workdir", workdir), "no frames")
    # an edited task file is refused
    (workdir / "task.yaml").write_text((workdir / "task.yaml").read_text().replace("32", "33"))
    one_line_error(run("cv", "--workdir", workdir, "configs/tiny.yaml"), "task.yaml", "changed")


def test_data_folder_that_does_not_fit(folder_root, synth_root, tmp_path):
    one_line_error(
        run("folds", "--data", synth_root, "--task", "steel", "--workdir", tmp_path / "a"),
        "does not fit task steel",
    )
    one_line_error(
        run("folds", "--data", folder_root, "--workdir", tmp_path / "b"), "record folder"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "splits.csv").exists()


def test_steel_synth_layout_and_empty_share(tmp_path):
    root = tmp_path / "steel"
    run("synth", "--task", "steel", "--out", root, "--train", 20, "--test", 3)
    assert sorted(p.name for p in root.iterdir()) == [
        "sample_submission.csv",
        "test_images",
        "train.csv",
        "train_images",
    ]
    lines = (root / "train.csv").read_text().splitlines()
    assert lines[0] == "ImageId,ClassId,EncodedPixels"
    assert all(line.split(",")[2] for line in lines[1:])  # only non-empty pairs
    empty_share = 1 - (len(lines) - 1) / (20 * 4)
    assert 0.6 <= empty_share <= 0.9
    sample = (root / "sample_submission.csv").read_text().splitlines()
    assert sample[0] == "ImageId_ClassId,EncodedPixels" and len(sample) == 1 + 3 * 4
    assert sample[1].endswith(".jpg_1,")
    from PIL import Image

    with Image.open(next((root / "train_images").iterdir())) as image:
        assert image.size == (1600, 256)


def test_steel_folds_reads_the_csv_masks(tmp_path):
    root = tmp_path / "steel"
    write_synthetic_task(root, synth_task("steel"), {"train": 8, "test": 2}, seed=1)
    result = run(
        "folds", "--data", root, "--task", "steel", "--workdir", tmp_path / "f", "--folds", 2
    )
    assert result.exit_code == 0, result.output
    assert load_task(tmp_path / "f" / "task.yaml") == builtin_task("steel")
    assert np.sum([1 for _ in (root / "train_images").iterdir()]) == 8


def test_every_task_key_is_in_the_task_reference():
    import dataclasses

    text = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "task.md").read_text()

    def paths(obj, prefix=""):
        for field in dataclasses.fields(obj):
            yield f"{prefix}{field.name}"
            value = getattr(obj, field.name)
            if dataclasses.is_dataclass(value):
                yield from paths(value, f"{prefix}{field.name}.")

    missing = [p for p in paths(Task()) if f"`{p}`" not in text]
    assert not missing, f"task.md lacks {missing}; rerun python scripts/gen_docs.py"
    for name in BUILTIN_TASKS:
        assert f"ek tasks show {name}" in text


def test_task_submission_written_in_sample_order_and_checked(tmp_path):
    from ensemble_kit.inference.submission import (
        check_task_submission,
        task_rows,
        write_task_submission,
    )

    root = tmp_path / "steel"
    write_synthetic_task(root, synth_task("steel"), {"train": 4, "test": 3}, seed=2)
    steel = builtin_task("steel")
    images = sorted(p.name for p in (root / "test_images").iterdir())
    masks = np.zeros((3, 4, 256, 1600), dtype=bool)
    masks[1, 2, 0:3, 0] = True  # rows 0-2 of column 0: "1 3"
    rows = task_rows(steel, images[::-1], masks)
    out = tmp_path / "submission.csv"
    write_task_submission(out, steel, rows, root)
    lines = out.read_text().splitlines()
    sample = (root / "sample_submission.csv").read_text().splitlines()
    assert lines[0] == "ImageId_ClassId,EncodedPixels"
    assert [line.split(",")[0] for line in lines] == [line.split(",")[0] for line in sample]
    assert f"{images[1]}_3,1 3" in lines and f"{images[0]}_1," in lines
    result = check_task_submission(out, steel, root)
    assert result["rows"] == 12 and result["empty_rows"] == 11 and result["positive_pixels"] == 3
    # `ek submit --check` follows the workdir's task
    workdir = tmp_path / "folds"
    assert (
        run(
            "folds", "--data", root, "--task", "steel", "--workdir", workdir, "--folds", 2
        ).exit_code
        == 0
    )
    checked = run("submit", "--check", out, "--data", root, "--workdir", workdir)
    assert checked.exit_code == 0 and "valid" in checked.output
    out.write_text("\n".join(lines[:-1]) + f"\n{lines[-1].split(',')[0]},409600 2\n")
    one_line_error(
        run("submit", "--check", out, "--data", root, "--workdir", workdir), "line 13", "past"
    )
    out.write_text("\n".join(lines[:-1]) + "\n")
    one_line_error(run("submit", "--check", out, "--data", root, "--workdir", workdir), "missing")


REPO = Path(__file__).resolve().parents[1]


def test_config_for_another_task_is_refused():
    from ensemble_kit.config import config_from_dict, load_config
    from ensemble_kit.task import check_config_fits, model_channels

    folder = task_from_dict({"extends": "folder", "classes": ["a", "b"], "channels": 3})
    tiny, tiny_folder = (
        load_config(REPO / "configs/tiny.yaml"),
        load_config(REPO / "configs/tiny_folder.yaml"),
    )
    check_config_fits(tiny, builtin_task("contrails"), "tiny.yaml")
    check_config_fits(tiny_folder, folder, "tiny_folder.yaml")
    with pytest.raises(EkError, match="tiny.yaml: 'input.channels' is ash, which needs contrail"):
        check_config_fits(tiny, folder, "tiny.yaml")
    with pytest.raises(EkError, match="'input.channels' is image, but task contrails"):
        check_config_fits(tiny_folder, builtin_task("contrails"), "x.yaml")
    soft = config_from_dict({"input": {"channels": "image"}, "label": {"soft": True}})
    with pytest.raises(EkError, match="'label.soft' is a contrail feature"):
        check_config_fits(soft, folder, "x.yaml")
    # one config, any number of classes: outputs follow the task
    assert model_channels(tiny_folder, folder) == (3, 2)
    assert model_channels(tiny_folder, builtin_task("steel")) == (1, 4)
    assert model_channels(tiny, builtin_task("contrails")) == (9, 1)


def test_cv_refuses_a_config_for_another_task(folder_root, tmp_path):
    workdir = tmp_path / "folds"
    assert (
        run("folds", "--data", folder_root, "--task", "folder", "--workdir", workdir).exit_code == 0
    )
    one_line_error(
        run("cv", "--workdir", workdir, REPO / "configs/tiny.yaml"), "tiny.yaml", "input.channels"
    )


def test_model_outputs_one_channel_per_class():
    import torch

    from ensemble_kit.config import load_config
    from ensemble_kit.models import build_model

    config = load_config(REPO / "configs/tiny_folder.yaml")
    model = build_model(config, pretrained=False, channels=(1, 4)).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 64, 96)).shape == (2, 4, 64, 96)


def test_several_classes_default_to_mean_dice_and_refuse_global_dice():
    two = task_from_dict({"extends": "folder", "classes": ["a", "b"]})
    assert two.metric == "mean_dice"
    assert task_from_dict({"extends": "folder"}).metric == "global_dice"
    assert task_from_dict({"classes": ["a", "b"], "size": [4, 4]}).metric == "mean_dice"
    with pytest.raises(EkError, match="global_dice scores one class"):
        task_from_dict({"extends": "folder", "classes": ["a", "b"], "metric": "global_dice"})


def test_synth_folder_writes_the_task_file_to_pass_to_folds(tmp_path):
    result = run("synth", "--task", "folder", "--classes", "3", "--out", str(tmp_path / "d"),
                 "--train", "4", "--validation", "0", "--test", "2", "--size", "32")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"--task {tmp_path / 'd'}/task.yaml" in result.output
    task = load_task(tmp_path / "d" / "task.yaml")
    assert task.classes == ("class_1", "class_2", "class_3") and task.metric == "mean_dice"
    assert task.size == (32, 32)
