"""`ek blend` writes its report, gallery and blend.json as one unit, under a lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_blend import _write_workdir

import ensemble_kit.blend.gallery as gallery
from ensemble_kit.blend.run import run_blend
from ensemble_kit.cli import main
from ensemble_kit.files import digest_file, exclusive_lock

REPO = Path(__file__).resolve().parents[1]


def snapshot(layout) -> dict:
    """Every file of blend.json and the report folder, with its bytes."""
    files = {layout.blend_json: layout.blend_json.read_bytes()}
    files.update({p: p.read_bytes() for p in layout.blend_report_dir.rglob("*") if p.is_file()})
    return files


def test_blend_killed_while_drawing_the_gallery_changes_nothing(tmp_path, monkeypatch):
    layout, _ = _write_workdir(tmp_path)
    run_blend(layout, steps=2)
    before = snapshot(layout)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gallery, "draw_gallery", killed)
    with pytest.raises(KeyboardInterrupt):
        run_blend(layout, steps=3, refine=True)
    assert snapshot(layout) == before
    assert sorted(p.name for p in layout.workdir.iterdir() if p.name.startswith(".")) == [
        ".blend.lock"
    ]


def test_report_and_gallery_describe_the_blend_json_beside_them(tmp_path):
    layout, _ = _write_workdir(tmp_path)
    run_blend(layout, steps=2)
    meta = json.loads((layout.blend_report_dir / "gallery" / "meta.json").read_text())
    assert meta["blend_json_digest"] == digest_file(layout.blend_json)
    assert (layout.blend_report_dir / "report.txt").is_file()


def test_second_blend_refused_in_one_line_while_one_runs(tmp_path):
    layout, _ = _write_workdir(tmp_path)
    with exclusive_lock(layout.blend_lock, "ek blend"):
        result = CliRunner().invoke(main, ["blend", "--oof", "--workdir", str(layout.workdir)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"ek: error: {layout.blend_lock}: another ek blend is running")
    assert not layout.blend_json.exists()


def test_blend_says_which_configs_it_skipped(tmp_path, caplog):
    layout, _ = _write_workdir(tmp_path)
    unfinished = layout.config_dir("gamma")
    (unfinished / "fold_0").mkdir(parents=True)
    (unfinished / "fold_0" / "DONE").write_text("")
    (unfinished / "fold_1").mkdir()
    (unfinished / "config.yaml").write_text("name: gamma\n")
    with caplog.at_level("WARNING"):
        run_blend(layout, steps=2)
    assert "skipped gamma: no summary.json (1 of 2 folds done)" in caplog.text


def test_ctrl_c_inside_the_numba_search_prints_aborted_and_keeps_the_old_blend(tmp_path):
    """SIGINT to a real `ek blend --oof` once its log says the search started: numba's
    compiled code does not check signals, so Python raises KeyboardInterrupt when the
    running kernel returns; click prints `Aborted!`, and the old outputs stay as they were."""
    layout, _ = _write_workdir(tmp_path, configs=("a", "b", "c", "d"), n_train=120, side=64)
    layout.blend_json.write_text('{"old": "blend"}')
    layout.blend_report_dir.mkdir()
    (layout.blend_report_dir / "report.txt").write_text("the old report\n")
    before = snapshot(layout)
    command = [sys.executable, "-m", "ensemble_kit.cli", "blend", "--oof", "--refine"]
    process = subprocess.Popen(
        [*command, "--workdir", str(layout.workdir)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    logged = []
    for line in process.stderr:  # the search starts right after this log line
        logged.append(line)
        if "candidate pixels" in line:
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, after = process.communicate(timeout=300)
    assert any("candidate pixels" in line for line in logged), "".join(logged)
    assert process.returncode == 1 and after.strip() == "Aborted!", after
    assert snapshot(layout) == before
    hidden = sorted(p.name for p in layout.workdir.iterdir() if p.name.startswith("."))
    assert hidden == [".blend.lock"]
