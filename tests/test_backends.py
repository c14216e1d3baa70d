"""Backends: `--jobs N` processes and Ray run the same fold function and write the same OOF."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from ensemble_kit import metrics
from ensemble_kit.cli import main
from ensemble_kit.errors import EkError
from ensemble_kit.layout import Layout
from ensemble_kit.training import backends
from ensemble_kit.training.backends import BackendOptions, FoldsFailed, run_jobs

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="the ray extra is not installed")


@pytest.fixture
def ray_sees_tests(monkeypatch):
    """Ray workers (started by the local Ray, with this environment) can import this module."""
    path = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))


def fake_fold(job):
    """A fold that fails in the ways real folds do: ``crash`` exits, ``raise`` raises."""
    if job == "crash":
        os._exit(3)
    if job == "raise":
        raise ValueError("bad fold")
    if isinstance(job, tuple):  # (name, file): write the file, then finish slowly
        Path(job[1]).write_text("x")
        time.sleep(1.0)
        return {"best_dice": 0.5, "pid": os.getpid()}
    return {
        "best_dice": 0.25,
        "job": job,
        "pid": os.getpid(),
        "threads": os.environ["OMP_NUM_THREADS"],
    }


def test_local_jobs_run_side_by_side_in_their_own_processes():
    seen = []
    summaries = run_jobs(["a", "b", "c"], fake_fold, "local", BackendOptions(jobs=2), seen.append)
    assert [s["job"] for s in summaries] == ["a", "b", "c"]
    assert len({s["pid"] for s in summaries} | {os.getpid()}) == 4
    assert sorted(r.job for r in seen) == ["a", "b", "c"]
    assert all(r.node and r.seconds > 0 for r in seen)


def test_a_crashed_fold_does_not_take_the_others_down():
    seen = []
    with pytest.raises(FoldsFailed) as caught:
        run_jobs(["crash", "a", "raise"], fake_fold, "local", BackendOptions(jobs=2), seen.append)
    message = str(caught.value)
    assert "2 fold(s) failed" in message
    assert "crash (process died with exit code 3)" in message
    assert "raise (ValueError: bad fold)" in message
    assert [r.job for r in seen] == ["a"]
    assert isinstance(caught.value, EkError)


def numba_then_threads(job):
    metrics.best_threshold(np.zeros((2, 8, 8), np.uint8), np.ones((2, 8, 8), np.uint8))
    return {"torch_threads": torch.get_num_threads()}


def test_a_fold_keeps_its_thread_count_through_numba_calls():
    """Numba's OpenMP layer used to reset torch's thread count mid-fold."""
    summary, _, _ = backends.timed_fold(numba_then_threads, "job", 1)
    assert summary["torch_threads"] == 1


def test_slots_pin_one_gpu_each_or_split_the_cpus(monkeypatch):
    monkeypatch.setattr(backends, "_visible_gpus", lambda: ["2", "5"])
    slots = backends._slot_environments(BackendOptions(jobs=3))
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["2", "5", "2"]
    cpu_slots = backends._slot_environments(BackendOptions(jobs=2, use_gpus=False))
    cpus = len(os.sched_getaffinity(0))
    assert all("CUDA_VISIBLE_DEVICES" not in s for s in cpu_slots)
    assert {s["OMP_NUM_THREADS"] for s in cpu_slots} == {str(max(1, cpus // 2))}
    explicit = backends._slot_environments(BackendOptions(jobs=2, cpus_per_job=3))
    assert {s["OMP_NUM_THREADS"] for s in explicit} == {"3"}


def test_visible_gpus_honour_the_parents_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(backends.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert backends._visible_gpus() == ["3", "1"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert backends._visible_gpus() == ["0", "1"]


@needs_ray
def test_ray_retries_a_killed_worker_and_names_a_failed_fold(tmp_path, monkeypatch, ray_sees_tests):
    """The kill hook ends one worker once: Ray runs that task again in a new process. A fold
    that raises is not retried; it is named after the others finished."""
    watched, marker = tmp_path / "written", tmp_path / "killed"
    job = ("job", str(watched))
    monkeypatch.setenv(backends.KILL_ONCE_ENV, f"{marker}|{job}|{watched}")
    seen = []
    with pytest.raises(FoldsFailed, match=r"1 fold\(s\) failed: raise \(ValueError: bad fold\)"):
        run_jobs([job, "raise"], fake_fold, "ray", BackendOptions(cpus_per_job=1), seen.append)
    assert marker.is_file(), "the worker was never killed"
    assert [(r.job, r.summary["best_dice"]) for r in seen] == [(job, 0.5)]


# ---- end to end on configs/tiny.yaml (small decoder): the OOF bytes do not depend on the
# backend ----


def cv(data: Path, workdir: Path, config: Path, *extra: str):
    args = ["cv", "--data", str(data), "--workdir", str(workdir), "--folds", "2"]
    return CliRunner().invoke(main, [*args, "--epochs", "2", *extra, str(config)])


def oof(workdir: Path) -> np.ndarray:
    return np.load(Layout(workdir).oof_npy("tiny"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_root, fast_tiny_config):
    """configs/tiny.yaml (small decoder), 2 folds, 2 epochs, one fold at a time, one thread
    per fold."""
    config = fast_tiny_config
    workdir = tmp_path_factory.mktemp("reference") / "w"
    result = cv(synth_root, workdir, config, "--cpus-per-job", "1")
    assert result.exit_code == 0, result.output
    return synth_root, config, oof(workdir)


def test_jobs_2_writes_the_same_oof_as_jobs_1(reference, tmp_path):
    data, config, expected = reference
    result = cv(data, tmp_path / "w", config, "--jobs", "2", "--cpus-per-job", "1")
    assert result.exit_code == 0, result.output
    assert "tiny fold 0: dice" in result.output and "tiny fold 1: dice" in result.output
    files = sorted(p.name for p in (tmp_path / "w" / "tiny" / "fold_1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w" / "tiny" / "fold_0").iterdir())
    assert np.array_equal(oof(tmp_path / "w"), expected)


@needs_ray
def test_ray_backend_writes_the_same_oof_as_local(reference, tmp_path):
    data, config, expected = reference
    result = cv(data, tmp_path / "w", config, "--backend", "ray", "--cpus-per-job", "1")
    assert result.exit_code == 0, result.output
    for fold in (0, 1):
        assert f"tiny fold {fold}: dice" in result.output and "min, node " in result.output
    assert "oof dice" in result.output  # then the status table
    assert np.array_equal(oof(tmp_path / "w"), expected)


def assert_resumed_from(snapshot: Path, fold_dir: Path) -> None:
    """The finished fold kept the epochs of the checkpoint the killed process left (their
    measured seconds would differ had it started over)."""
    history = torch.load(snapshot, weights_only=False)["state"]["history"]
    metrics = pd.read_csv(fold_dir / "metrics.csv")
    assert len(history) >= 1
    for row in history:
        assert metrics.loc[row["epoch"] - 1, "seconds"] == row["seconds"]


def kill_fold_0_once(tmp_path: Path, monkeypatch) -> tuple[Path, Path, Path]:
    """Arm the test hook: fold 0 of tiny dies once, right after its first ``last.pt``.

    Returns the workdir, the marker the hook writes (a copy of that checkpoint) and the
    fold's ``last.pt``.
    """
    workdir, marker = tmp_path / "w", tmp_path / "killed"
    last = Layout(workdir).fold_dir("tiny", 0) / "last.pt"
    monkeypatch.setenv(backends.KILL_ONCE_ENV, f"{marker}|tiny fold 0|{last}")
    return workdir, marker, last


@needs_ray
def test_ray_worker_killed_mid_fold_resumes_and_matches(reference, tmp_path, monkeypatch):
    data, config, expected = reference
    workdir, marker, last = kill_fold_0_once(tmp_path, monkeypatch)
    result = cv(data, workdir, config, "--backend", "ray", "--cpus-per-job", "1")
    assert result.exit_code == 0, result.output
    assert marker.is_file(), "the worker was never killed"
    assert_resumed_from(marker, last.parent)
    assert np.array_equal(oof(workdir), expected)


def test_jobs_crashed_fold_is_named_then_resumes(reference, tmp_path, monkeypatch):
    data, config, expected = reference
    workdir, marker, last = kill_fold_0_once(tmp_path, monkeypatch)
    result = cv(data, workdir, config, "--jobs", "2", "--cpus-per-job", "1")
    assert result.exit_code == 2
    assert "tiny fold 0 (process died with exit code 17)" in result.output
    assert (Layout(workdir).fold_dir("tiny", 1) / "DONE").is_file()
    assert last.is_file() and not (last.parent / "DONE").is_file()
    result = cv(data, workdir, config, "--jobs", "2", "--cpus-per-job", "1")
    assert result.exit_code == 0, result.output
    assert_resumed_from(marker, last.parent)
    assert np.array_equal(oof(workdir), expected)


def test_backend_option_mistakes_are_one_line_errors(tmp_path, synth_root):
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    for extra, message in (
        (("--backend", "ray", "--jobs", "2"), "--jobs is for the local backend"),
        (("--gpus-per-job", "1"), "need --backend ray"),
        (("--jobs", "2", "--device", "cuda:1"), "each fold gets its own GPU"),
        (("--jobs", "0"), "--jobs must be at least 1"),
    ):
        result = cv(synth_root, tmp_path / "w", config, *extra)
        assert result.exit_code == 2 and message in result.output, result.output
