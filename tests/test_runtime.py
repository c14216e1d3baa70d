"""Thread counts: set at the process edge and re-set only through ``ensemble_kit.runtime``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import pytest
import torch
from click.testing import CliRunner

from ensemble_kit import runtime
from ensemble_kit.cli import EkCommand, main

PACKAGE = Path(__file__).resolve().parents[1] / "ensemble_kit"
TWO_CPUS = pytest.mark.skipif(
    numba.config.NUMBA_NUM_THREADS < 2, reason="needs numba with at least 2 threads"
)


@pytest.fixture(autouse=True)
def restored_threads():
    """Each test leaves torch and numba on the counts it found."""
    with runtime.fixed_threads(torch.get_num_threads()):
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        yield


def test_default_threads_follow_omp_num_threads_or_split_the_cpus(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3
    cpus = len(os.sched_getaffinity(0))
    assert runtime.default_threads(2) == max(1, cpus // 2)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert runtime.default_threads() == cpus


def test_set_process_threads_sets_torch_and_numba():
    assert runtime.set_process_threads(1) == 1
    assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)


@TWO_CPUS
def test_fixed_threads_restores_the_counts_before_it():
    runtime.set_process_threads(2)
    with runtime.fixed_threads(1) as threads:
        assert threads == 1
        assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
    assert (torch.get_num_threads(), numba.get_num_threads()) == (2, 2)


def threads_in_a_fresh_process(body: str) -> list[int]:
    """Torch's counts printed by ``body``, run after a torch op in a new interpreter (numba's
    OpenMP layer starts once per process, so only a fresh one shows what it does)."""
    script = (
        "import numba, numpy as np, torch\n"
        "from ensemble_kit import metrics, runtime\n"
        "def kernel():\n"
        "    metrics.best_threshold(np.zeros((2, 8, 8), np.uint8), np.ones((2, 8, 8), np.uint8))\n"
        "x = torch.ones(64, 64); x @ x\n"
        f"{body}\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [int(word) for word in done.stdout.split()]


@TWO_CPUS
def test_torch_threads_kept_undoes_numba_starting_its_layer():
    inside, after = threads_in_a_fresh_process(
        "torch.set_num_threads(1)\n"
        "with runtime.torch_threads_kept():\n"
        "    kernel(); print(torch.get_num_threads())\n"
        "print(torch.get_num_threads())"
    )
    assert (inside, after) == (numba.config.NUMBA_NUM_THREADS, 1)


@TWO_CPUS
def test_after_the_process_edge_numba_kernels_leave_torch_alone():
    assert threads_in_a_fresh_process(
        "runtime.set_process_threads(1); kernel(); print(torch.get_num_threads())"
    ) == [1]


def test_every_command_starts_with_the_process_thread_count(tmp_path, monkeypatch):
    runtime.set_process_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = CliRunner().invoke(main, ["status", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)


def test_only_runtime_sets_thread_counts():
    setters = re.compile(r"\bset_num_(interop_)?threads\(")
    found = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "runtime.py" and setters.search(path.read_text())
    ]
    assert found == []


def test_every_command_sets_the_counts_but_its_help_does_not_import_torch():
    assert all(isinstance(command, EkCommand) for command in main.commands.values())
    script = (
        "import sys\n"
        "from ensemble_kit.cli import main\n"
        "try:\n"
        "    main(['status', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'numba' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == "False False", done.stderr
