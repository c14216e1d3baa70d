"""The command-line shell: help without torch, one-line errors with exit code 2."""

import subprocess
import sys

import click
import numpy as np
from click.testing import CliRunner

from ensemble_kit.cli import join_values, main


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


def one_line_error(args: list[str]) -> str:
    """Run ``ek ARGS``; assert exit code 2 and a single ``ek: error:`` line; return it."""
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("ek: error: "), result.output
    return lines[0]


def test_typos_are_one_line_errors_before_any_work(tmp_path, tiny_config_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    work = ["--workdir", str(tmp_path / "f")]
    cases = {
        "--data /no/such/dir: no such folder": [
            "prepare",
            "--data",
            "/no/such/dir",
            *work,
            str(tiny_config_path),
        ],
        "--split tset: unknown split (did you mean test?)": [
            "prepare",
            "--data",
            str(data),
            "--split",
            "tset",
            *work,
            str(tiny_config_path),
        ],
        "--folds 0: --folds must be at least 1": [
            "cv",
            "--folds",
            "0",
            *work,
            str(tiny_config_path),
        ],
        "--epochs 0: --epochs must be at least 1": [
            "cv",
            "--epochs",
            "0",
            *work,
            str(tiny_config_path),
        ],
        "--max-seconds-per-record nan: must be": [
            "blend",
            "--oof",
            "--max-seconds-per-record",
            "nan",
            *work,
        ],
        "--device tpu: expected auto, cpu, cuda or cuda:N": ["submit", "--device", "tpu", *work],
        f"--out {tmp_path}: is a folder": ["submit", "--out", str(tmp_path), *work],
    }
    for message, args in cases.items():
        assert one_line_error(args).startswith(f"ek: error: {message}")
    assert not (tmp_path / "f").exists()


def test_full_disk_and_read_only_are_one_line_errors(tmp_path, monkeypatch):
    import errno

    import ensemble_kit.data.synth as synth

    for code, what in ((errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only")):

        def refuse(out, code=code, **kwargs):
            raise OSError(code, "refused", str(out / "train"))

        monkeypatch.setattr(synth, "write_synthetic", refuse)
        line = one_line_error(["synth", "--out", str(tmp_path / "d")])
        assert line.startswith(f"ek: error: {tmp_path / 'd' / 'train'}: {what}")


def test_ctrl_c_prints_aborted_and_nothing_else(tmp_path, monkeypatch):
    import ensemble_kit.data.synth as synth

    def interrupted(out, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "write_synthetic", interrupted)
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "d")])
    assert result.output.strip() == "Aborted!" and result.exit_code == 1


def test_ctrl_c_that_numba_wrapped_prints_aborted_and_a_real_system_error_is_kept(
    tmp_path, monkeypatch
):
    """A SIGINT during a kernel surfaces as numba's SystemError caused by KeyboardInterrupt
    (the real kernel: test_blend_writes.py::test_ctrl_c_inside_the_numba_search_...)."""
    import ensemble_kit.data.synth as synth

    def wrapped(out, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise SystemError("CPUDispatcher(score_moves) returned a result") from interrupt

    monkeypatch.setattr(synth, "write_synthetic", wrapped)
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "d")])
    assert result.output.strip() == "Aborted!" and result.exit_code == 1

    def broken(out, **kwargs):
        raise SystemError("a real bug")

    monkeypatch.setattr(synth, "write_synthetic", broken)
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "d")])
    assert isinstance(result.exception, SystemError) and "Aborted!" not in result.output


def test_every_option_has_help_and_the_group_shows_the_workflow():
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"ek {name} {param.opts[0]} has no help text"
    shown = CliRunner().invoke(main, ["--help"]).output
    assert "Workflow" in shown and "docs/README.md" in shown
    assert shown.index("ek folds") < shown.index("ek cv") < shown.index("ek blend")


def test_frames_take_spaces_commas_and_repeats():
    assert join_values(["--frames", "0", "1", "2", "--out", "x"], {"--frames"}) == [
        "--frames",
        "0 1 2",
        "--out",
        "x",
    ]
    assert join_values(["--frames", "0,1", "--frames", "3"], {"--frames"}) == [
        "--frames",
        "0,1",
        "--frames",
        "3",
    ]
    assert join_values(["--out", "x", "--frames", "5", "6"], {"--frames"}) == [
        "--out",
        "x",
        "--frames",
        "5 6",
    ]
    assert join_values(["--frames"], {"--frames"}) == ["--frames"]


def test_option_choices_come_from_the_registries():
    from ensemble_kit.blend.run import THRESHOLD_SOURCES
    from ensemble_kit.inference.export import FORMATS
    from ensemble_kit.registry import EXPORT_FORMATS
    from ensemble_kit.registry import THRESHOLD_SOURCES as SOURCES

    assert SOURCES.names == THRESHOLD_SOURCES and EXPORT_FORMATS.names == FORMATS
    blend = {p.name: p for p in main.commands["blend"].params}
    assert list(blend["threshold_from"].type.choices) == list(SOURCES.names)


def test_status_shows_the_averaged_dice_rounded_and_names_a_corrupt_summary(tmp_path):
    import json

    workdir = tmp_path / "folds"
    (workdir / "quick" / "fold_0").mkdir(parents=True)
    (workdir / "splits.json").write_text(json.dumps({"n_folds": 1}))
    (workdir / "quick" / "config.yaml").write_text("name: quick\n")
    done = {"best_epoch": 3, "best_dice": 0.0261234, "top_k": 3, "top_k_dice": 0.0191234}
    (workdir / "quick" / "fold_0" / "DONE").write_text(json.dumps(done))
    shown = CliRunner().invoke(main, ["status", "--workdir", str(workdir)])
    assert shown.exit_code == 0 and "done avg3 0.0191" in shown.output, shown.output
    summary = workdir / "quick" / "summary.json"
    summary.write_text('{"oof_dice": 0.5')
    line = one_line_error(["status", "--workdir", str(workdir)])
    assert line.startswith(f"ek: error: {summary}: corrupt JSON")
