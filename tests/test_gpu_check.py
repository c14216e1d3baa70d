"""benchmarks/gpu_check.py: refuses without CUDA, and its --smoke run prints the full table."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(SCRIPT.parent))
    yield importlib.import_module("gpu_check")
    sys.path.remove(str(SCRIPT.parent))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_without_cuda(gpu_check):
    with pytest.raises(SystemExit, match="no CUDA device here.*--smoke"):
        gpu_check.main([])


def test_smoke_run_prints_every_row(gpu_check, capsys):
    gpu_check.main(["--smoke", "--device", "cpu"])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    labels = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert labels[:2] == ["train: ek default", "train: plain fp32"]
    assert labels[2:] == [
        "cache -> GPU input + augmentation",
        "TTA 4 flips, batched",
        "TTA 4 flips, per flip",
        "ek submit (2 folds x 4 flips)",
    ]
    assert all(float(row.split(" | ")[1]) > 0 for row in rows[1:])
