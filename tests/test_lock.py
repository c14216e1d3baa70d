"""The fold lock: exclusive creation, live vs stale holders, heartbeat, two `ek cv` at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ensemble_kit.cli import main
from ensemble_kit.layout import Layout
from ensemble_kit.training import lock as fold_lock
from ensemble_kit.training.lock import FoldLock, LockInfo, acquire, read_lock

REPO = Path(__file__).resolve().parents[1]


def _write_lock(path: Path, **fields) -> None:
    now = time.time()
    info = {"host": "elsewhere", "pid": 1, "pidns": "", "started": now, "heartbeat": now}
    path.write_text(json.dumps({**info, "token": "theirs", **fields}))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_is_exclusive_in_one_process_and_released(tmp_path):
    path = tmp_path / "fold_0" / "RUNNING"
    held = acquire(path)
    assert isinstance(held, FoldLock)
    written = json.loads(path.read_text())
    assert written["host"] == socket.gethostname() and written["pid"] == os.getpid()
    assert written["started"] <= written["heartbeat"] <= time.time()
    second = acquire(path)
    assert isinstance(second, LockInfo) and second.token == written["token"]
    held.release()
    assert not path.exists()


def test_a_dead_process_lock_on_this_host_is_taken_over(tmp_path, caplog):
    path = tmp_path / "RUNNING"
    _write_lock(path, host=socket.gethostname(), pidns=fold_lock._pidns(), pid=_dead_pid())
    with acquire(path) as held:
        assert isinstance(held, FoldLock) and read_lock(path).pid == os.getpid()
    assert "taking over a stale lock" in caplog.text


def test_an_older_bare_pid_lock_of_a_live_process_is_live(tmp_path):
    path = tmp_path / "RUNNING"
    path.write_text(str(os.getpid()))
    assert isinstance(acquire(path), LockInfo)
    path.write_text(str(_dead_pid()))
    acquire(path).release()


def test_another_host_is_live_while_its_heartbeat_is_recent(tmp_path):
    path = tmp_path / "RUNNING"
    limit = fold_lock.STALE_AFTER  # intervals, here of 1 s
    _write_lock(path, heartbeat=time.time() - (limit - 0.5))
    held = acquire(path, interval=1.0)
    assert isinstance(held, LockInfo) and held.host == "elsewhere"
    assert "host elsewhere" in held.describe()
    _write_lock(path, heartbeat=time.time() - (limit + 0.5))
    taken = acquire(path, interval=1.0)
    assert isinstance(taken, FoldLock)
    taken.release()


def test_the_heartbeat_advances_and_the_file_is_always_whole(tmp_path):
    path = tmp_path / "RUNNING"
    held = acquire(path, interval=0.02)
    first = read_lock(path).heartbeat
    deadline = time.time() + 0.5
    while time.time() < deadline:
        json.loads(path.read_text())  # never a half-written file
    assert read_lock(path).heartbeat > first
    held.release()


def test_a_holder_that_was_taken_over_notices_and_leaves_the_new_lock(tmp_path):
    path = tmp_path / "RUNNING"
    held = acquire(path, interval=0.02)
    _write_lock(path, token="newcomer")
    deadline = time.time() + 5
    while not held.lost and time.time() < deadline:
        time.sleep(0.01)
    assert held.lost
    held.release()
    assert read_lock(path).token == "newcomer"


def _race(path: str, barrier, results) -> None:
    barrier.wait()
    held = acquire(Path(path), interval=1.0)
    results.put("won" if isinstance(held, FoldLock) else "skipped")
    # the winner exits holding the lock: later comers must not see a free lock


@pytest.mark.parametrize("start", ["free", "stale"])
def test_of_many_processes_racing_exactly_one_takes_the_lock(tmp_path, start):
    path = tmp_path / "RUNNING"
    if start == "stale":
        _write_lock(path, heartbeat=time.time() - 60)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(6), context.Queue()
    workers = [context.Process(target=_race, args=(str(path), barrier, results)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in workers)
    assert outcomes == ["skipped"] * 5 + ["won"]
    assert not list(tmp_path.glob("*takeover*"))


def _ek_cv(workdir: Path, data: Path, config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "ensemble_kit.cli", "cv", "--data", str(data)]
    command += ["--workdir", str(workdir), "--folds", "2", "--epochs", "1", str(config)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_two_ek_cv_at_once_train_each_fold_once_and_match_one(
    tmp_path, synth_root, fast_tiny_config
):
    """Two `ek cv` processes on one folds/ train each fold once; the OOF is one process's."""
    config = fast_tiny_config
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    processes = [_ek_cv(shared, synth_root, config) for _ in range(2)]
    args = ["cv", "--data", str(synth_root), "--workdir", str(alone), "--folds", "2"]
    reference = CliRunner().invoke(main, [*args, "--epochs", "1", str(config)])
    outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
    assert reference.exit_code == 0, reference.output
    assert [p.returncode for p in processes] == [0, 0], outputs
    together = outputs[0] + outputs[1]
    for fold in (0, 1):
        assert len(re.findall(rf"tiny fold {fold} epoch 1/1:", together)) == 1, together
        assert len(re.findall(rf"tiny fold {fold}: best epoch", together)) == 1, together
    assert "\r" not in together  # no progress-bar frames without a terminal
    for fold in (0, 1):
        files = {p.name for p in Layout(shared).fold_dir("tiny", fold).iterdir()}
        assert "DONE" in files and "RUNNING" not in files
    for name in ("oof_npy", "holdout_npy"):
        a = np.load(getattr(Layout(shared), name)("tiny"))
        b = np.load(getattr(Layout(alone), name)("tiny"))
        assert np.array_equal(a, b), name


def test_status_shows_where_a_fold_runs(tmp_path):
    from ensemble_kit.training.status import _fold_cell, fold_state

    fold_dir = tmp_path / "fold_0"
    fold_dir.mkdir()
    _write_lock(fold_dir / "RUNNING")
    state = fold_state(fold_dir)
    assert state["state"] == "running" and _fold_cell(state) == "running@elsewhere"
    _write_lock(fold_dir / "RUNNING", heartbeat=time.time() - 3600)
    assert fold_state(fold_dir)["state"] == "missing"
    with acquire(fold_dir / "RUNNING") as held:
        assert isinstance(held, FoldLock) and _fold_cell(fold_state(fold_dir)) == "running"
