"""Cost of the cache fingerprints (size and mtime_ns of every source file) at full size.

Makes a split of ``--records`` record folders in the Kaggle layout whose files are hard
links of one small file each (a ``stat`` costs the same whatever the file's size), then
times, warm (metadata in the page cache, as on a second run):

- listing the split (``list_records``, which every cache open already did): the reference;
- the fingerprint of the ash inputs (3 band files per record) and of the labels (2 mask
  files per record, only the records that have a mask), as ``ensure_inputs`` and
  ``ensure_labels`` take them on each open;
- the fingerprint of all nine bands (a ``bands`` config).

    .venv/bin/python benchmarks/fingerprint.py [--records 20529] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ensemble_kit.config import InputSpec
from ensemble_kit.data.records import INDIVIDUAL_FILE, MASK_FILE, band_file, list_records
from ensemble_kit.data.sources import LABEL_FILES, input_files, read_sources

BANDS = tuple(range(8, 17))


def make_split(root: Path, n: int) -> None:
    """``n`` records under ``root/train``, every file a hard link of one original."""
    originals = root / "originals"
    originals.mkdir(parents=True)
    names = [band_file(b) for b in BANDS] + [MASK_FILE, INDIVIDUAL_FILE]
    for name in names:
        np.save(originals / name, np.zeros((4, 4, 1), np.float32))
    split = root / "train"
    for i in range(n):
        folder = split / str(1_000_000_000_000_000_000 + i)
        folder.mkdir(parents=True)
        for name in names:
            os.link(originals / name, folder / name)


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20529)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        make_split(root, args.records)
        print(f"{args.records} records written in {time.perf_counter() - start:.1f} s")
        ash = input_files(InputSpec(channels="ash"))
        bands = tuple(band_file(b) for b in BANDS)
        cases = {
            "list_records (reference)": lambda: list_records(root, "train"),
            "inputs, ash (3 files/record)": lambda: read_sources(root, "train", ash).fingerprint,
            "labels (2 files/record)": lambda: (
                read_sources(root, "train", LABEL_FILES, labelled_only=True).fingerprint
            ),
            "inputs, 9 bands": lambda: read_sources(root, "train", bands).fingerprint,
        }
        reference = None
        print(f"{'what':32s} {'seconds':>8s} {'us/record':>10s} {'x listing':>10s}")
        for name, fn in cases.items():
            seconds = best_of(args.repeat, fn)
            reference = reference or seconds
            per_record = seconds / args.records * 1e6
            print(f"{name:32s} {seconds:8.3f} {per_record:10.1f} {seconds / reference:10.1f}")


if __name__ == "__main__":
    main()
