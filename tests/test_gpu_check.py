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


@pytest.mark.slow  # about 4 minutes on 2 cores since the Kaggle-hardware rows (make test-all)
def test_smoke_run_prints_every_row(gpu_check, capsys, tmp_path):
    gpu_check.main(["--smoke", "--device", "cpu", "--out", str(tmp_path / "gpu.md")])
    table = capsys.readouterr().out
    assert (tmp_path / "gpu.md").read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    labels = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert labels[:2] == ["train: ek default", "train: plain fp32"]
    assert labels[2:] == [
        "cache -> GPU input + augmentation",
        "TTA 4 flips, batched",
        "TTA 4 flips, per flip",
        "ek submit (2 folds x 4 flips)",
        "inference fp32, 4 flips",
        "inference fp16, 4 flips",
        "inference bf16, 4 flips",
        "records split, 1 device, 2 workers",
        "OOM injected, batch 2 halved to 1",
    ]
    assert all(float(row.split(" | ")[1]) > 0 for row in rows[1:])
    assert "; 0 of " in table.split("records split")[1].splitlines()[0]  # CPU: same bytes
