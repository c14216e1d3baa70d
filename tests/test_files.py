"""Atomic writes: groups and folders swapped in as units, umask modes, full disks."""

from __future__ import annotations

import os

import pytest

import ensemble_kit.files as files
from ensemble_kit.errors import EkError
from ensemble_kit.files import atomic_group, staged_folder, write_text


def test_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with staged_folder(tmp_path / "report") as staged:
            (staged / "r.txt").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "report").stat().st_mode & 0o777 == 0o755


def test_group_killed_before_the_seal_leaves_no_stale_seal(tmp_path, monkeypatch):
    csv, seal = tmp_path / "s.csv", tmp_path / "s.json"
    csv.write_text("old"), seal.write_text("old provenance")
    real_replace = os.replace

    def killed_at_the_seal(src, dst):
        if str(dst) == str(seal):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", killed_at_the_seal)
    with pytest.raises(KeyboardInterrupt), atomic_group(csv, seal) as (a, b):
        a.write_text("new"), b.write_text("new provenance")
    assert csv.read_text() == "new" and not seal.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]


def test_group_failing_inside_changes_nothing(tmp_path):
    csv, seal = tmp_path / "s.csv", tmp_path / "s.json"
    csv.write_text("old"), seal.write_text("old provenance")
    with pytest.raises(RuntimeError), atomic_group(csv, seal) as (a, b):
        a.write_text("new")
        raise RuntimeError
    assert csv.read_text() == "old" and seal.read_text() == "old provenance"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.json"]


def test_staged_folder_is_all_old_or_all_new(tmp_path):
    folder = tmp_path / "blend"
    with staged_folder(folder) as staged:
        (staged / "report.txt").write_text("first")
        (staged / "plot.png").write_text("first")
    with pytest.raises(RuntimeError), staged_folder(folder) as staged:
        (staged / "report.txt").write_text("second")
        raise RuntimeError
    assert {p.name: p.read_text() for p in folder.iterdir()} == {
        "report.txt": "first",
        "plot.png": "first",
    }
    with staged_folder(folder) as staged:
        (staged / "report.txt").write_text("third")
    assert [p.name for p in folder.iterdir()] == ["report.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blend"]


def test_full_disk_is_one_line_naming_the_path_and_leaves_no_temp(tiny_disk):
    target = tiny_disk / "big.txt"
    with pytest.raises(EkError, match=r"big.txt.*: no space left on device$"):
        write_text(target, "x" * (3 << 20))
    assert list(tiny_disk.iterdir()) == []


def test_full_disk_with_a_known_size_says_how_much(monkeypatch, tmp_path):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npy"))

    with pytest.raises(EkError, match=r"x.npy: no space left on device \(needed ~3 MB\)$"):
        with files.user_errors(needed_bytes=3 << 20):
            full()
