"""The command-line shell: help without torch, one-line errors with exit code 2."""

import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from ensemble_kit.cli import main


def test_help_lists_commands_without_importing_torch():
    code = "import sys; from ensemble_kit.cli import main; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
        == "False"
    )
    result = CliRunner().invoke(main, ["--help"])
    for command in ("synth", "folds", "prepare", "cv", "status", "blend", "submit", "export"):
        assert command in result.output


def test_folds_written_once(tmp_path, sample_root):
    args = ["folds", "--data", str(sample_root), "--workdir", str(tmp_path / "f"), "--folds", "3"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and "records per fold" in first.output
    before = (tmp_path / "f" / "splits.csv").read_text()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "exists" in again.output
    assert (tmp_path / "f" / "splits.csv").read_text() == before


def test_prepare_names_the_bad_file(tmp_path, sample_copy, tiny_config_path):
    bad = next((sample_copy / "train").iterdir()) / "band_15.npy"
    array = np.load(bad)
    array[0, 0, 0] = np.nan
    np.save(bad, array)
    result = CliRunner().invoke(
        main,
        [
            "prepare",
            "--data",
            str(sample_copy),
            "--workdir",
            str(tmp_path / "f"),
            "--split",
            "train",
            str(tiny_config_path),
        ],
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"ek: error: {bad}: contains NaN or infinite values"
    ]


def test_data_folder_without_train(tmp_path, tiny_config_path):
    result = CliRunner().invoke(
        main,
        ["cv", "--data", str(tmp_path), "--workdir", str(tmp_path / "w"), str(tiny_config_path)],
    )
    assert result.exit_code == 2 and "no 'train/' folder" in result.output


def test_status_of_an_empty_workdir(tmp_path):
    result = CliRunner().invoke(main, ["status", "--workdir", str(tmp_path)])
    assert result.exit_code == 0 and "no configs" in result.output


def test_synth_command(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "synth",
            "--out",
            str(tmp_path / "d"),
            "--train",
            "4",
            "--validation",
            "2",
            "--test",
            "2",
            "--size",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "d" / "train").iterdir())) == 4


def test_ray_backend_without_ray_is_a_clear_error(tmp_path, sample_root, tiny_config_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed")
    result = CliRunner().invoke(
        main,
        [
            "cv",
            "--data",
            str(sample_root),
            "--workdir",
            str(tmp_path / "w"),
            "--folds",
            "3",
            "--backend",
            "ray",
            str(tiny_config_path),
        ],
    )
    assert result.exit_code == 2 and "pip install 'ensemble-kit[ray]'" in result.output
