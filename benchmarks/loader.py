"""Samples/s of a training DataLoader reading the cache vs reading per-record .npy files.

Same records, batch size, shuffling and workers in one run; prints the ratio (target >= 10x).

    .venv/bin/python benchmarks/loader.py [--records 96] [--size 256] [--workers 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ensemble_kit.config import InputSpec
from ensemble_kit.data import records
from ensemble_kit.data.cache import ensure_inputs, ensure_labels
from ensemble_kit.data.loader import ArraySet, batches, labels_to_float, to_float
from ensemble_kit.data.synth import write_synthetic
from ensemble_kit.layout import Layout


class PerRecordFiles(Dataset):
    """The common baseline: every sample re-reads its record's .npy files."""

    def __init__(self, folders: list[Path], spec: InputSpec):
        self.folders, self.spec = folders, spec

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int):
        folder = self.folders[index]
        return torch.from_numpy(records.build_input(folder, self.spec)), torch.from_numpy(
            records.load_mask(folder)
        )


def rate(loader, epochs: int, decode: bool) -> float:
    """Samples/s delivered by a loader; ``decode`` also turns them into float tensors here.

    In training the decode runs on the device (a GPU does it in microseconds); on a CPU-only
    machine it is part of the step, so both numbers are printed.
    """
    count, started = 0, time.perf_counter()
    for _ in range(epochs):
        for inputs, labels in loader:
            if decode:
                inputs, labels = to_float(inputs), labels_to_float(labels, soft=False)
            count += len(inputs)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    spec = InputSpec(channels="ash", frames=(3, 4, 5))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_synthetic(
            root, n_train=args.records, n_validation=2, n_test=2, size=args.size, seed=0
        )
        layout = Layout(Path(tmp) / "folds")
        started = time.perf_counter()
        inputs = ensure_inputs(layout, root, "train", spec)
        labels = ensure_labels(layout, root, "train")
        build = time.perf_counter() - started
        rows = np.c_[np.zeros(len(inputs.ids), np.int64), np.arange(len(inputs.ids))]
        cached = ArraySet(((inputs.arrays["inputs"], labels.arrays["labels"]),), rows)
        folders = [root / "train" / rid for rid in inputs.ids]
        rates = {}
        for decode in (False, True):
            cache_loader = batches(cached, args.batch_size, shuffle=True, num_workers=args.workers)
            naive = DataLoader(
                PerRecordFiles(folders, spec),
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=args.workers,
            )
            rates[decode] = (rate(naive, 1, decode), rate(cache_loader, 5, decode))
    print(
        f"records {args.records} at {args.size} px, ash frames 3-5, batch {args.batch_size}, workers {args.workers}"
    )
    print(f"cache build (once): {build:.1f} s")
    for decode, label in ((False, "loader output"), (True, "loader + decode to float on this CPU")):
        naive_rate, cache_rate = rates[decode]
        print(
            f"{label}: per-record .npy {naive_rate:7.1f} samples/s, cache {cache_rate:7.1f} samples/s, "
            f"ratio {cache_rate / naive_rate:.1f}x"
        )
    print(f"ratio (loader output): {rates[False][1] / rates[False][0]:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
