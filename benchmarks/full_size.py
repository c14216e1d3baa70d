"""The competition's size, measured: ``ek folds``, ``ek prepare`` and OOF assembly at 2,000
and 20,529 pool records (+ holdout in the real 1,856 / 20,529 ratio), 256 x 256.

    python benchmarks/full_size.py --root /big/disk/ek-full [--sizes 2000,20529] [--keep]

Records are synthetic (``ek synth``), written once (``--distinct`` of them) and hard-linked
under new ids up to the size, so the data set costs ~1.5 GB of disk instead of ~400 GB;
reads of the band files then mostly come from the page cache (a lower bound on read time).
Each step runs as its own process; its wall seconds and peak anonymous memory (RssAnon,
summed over its worker processes) are printed as a markdown table with the growth from
the smallest to the largest size (linear: the ratio of the sizes).

- folds: ``ek folds --folds 5`` (builds the label cache, then the stratified splits);
- prepare: ``ek prepare`` of the ash false colour of frames 3-5, uint8, train + validation;
- OOF assembly: one config's five ``oof_part.npy`` / ``holdout_part.npy`` (synthetic
  predictions) streamed into ``oof.npy`` / ``holdout.npy`` with the summary's dice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import ek_command, load_note, run_measured  # noqa: E402

from ensemble_kit.config import load_config  # noqa: E402
from ensemble_kit.layout import Layout, fold_files  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"  # ash false colour, frames 3-5
HOLDOUT_RATIO = 1856 / 20529
FIRST_ID = 7 * 10**18  # 19-digit record ids, as in the competition


def make_data(root: Path, n_train: int, distinct: Path) -> Path:
    """``root/data-<n>``: ``n_train`` + holdout records hard-linked to the distinct ones."""
    data = root / f"data-{n_train}"
    if data.is_dir():
        return data
    n_validation = round(n_train * HOLDOUT_RATIO)
    for split, count, offset in (("train", n_train, 0), ("validation", n_validation, 10**9)):
        sources = sorted((distinct / split).iterdir())
        target = data / split
        target.mkdir(parents=True)
        for i in range(count):
            record = target / str(FIRST_ID + offset + i)
            record.mkdir()
            for file in sources[i % len(sources)].iterdir():
                os.link(file, record / file.name)
    return data


def fake_fold_parts(workdir: Path, data: Path) -> None:
    """Five DONE folds of ``tiny`` with random predictions, as ``ek cv`` would leave them."""
    layout = Layout(workdir)
    splits = _read_splits(layout)
    config = load_config(CONFIG)
    config_dir = layout.config_dir(config.name)
    config_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFIG, config_dir / "config.yaml")
    rng = np.random.default_rng(0)
    bank = rng.integers(0, 40, 8 * 65536, dtype=np.uint8)
    holdout = int((splits["fold"] == -1).sum())
    for fold in range(5):
        files = fold_files(layout.fold_dir(config.name, fold))
        files["done"].parent.mkdir(parents=True, exist_ok=True)
        rows = int((splits["fold"] == fold).sum())
        _fill(files["oof_part"], (rows, 256, 256), np.uint8, bank)
        _fill(files["holdout_part"], (holdout, 256, 256), np.float32, bank)
        files["metrics"].write_text("epoch,train_loss,val_loss,val_dice\n1,1.0,1.0,0.1\n")
        summary = {"fold": fold, "best_epoch": 1, "best_dice": 0.1, "seconds_total": 1.0}
        files["done"].write_text(json.dumps(summary))


def _fill(path: Path, shape, dtype, bank: np.ndarray) -> None:
    array = np.lib.format.open_memmap(path, "w+", dtype, shape)
    flat = array.reshape(len(array), -1)
    for lo in range(0, len(array), 64):
        hi = min(lo + 64, len(array))
        codes = np.resize(np.roll(bank, lo), flat[lo:hi].size).reshape(hi - lo, -1)
        flat[lo:hi] = codes if dtype == np.uint8 else codes / np.float32(255)
    array.flush()
    del array


def _read_splits(layout: Layout):
    from ensemble_kit.data.splits import read_splits

    return read_splits(layout)


ASSEMBLE = """
import json, sys
from pathlib import Path
from ensemble_kit.config import load_config
from ensemble_kit.data.splits import read_meta, read_splits
from ensemble_kit.layout import Layout
from ensemble_kit.training.cv import assemble
layout = Layout(Path(sys.argv[1]))
summary = assemble(layout, load_config(Path(sys.argv[2])), Path(sys.argv[3]),
                   read_splits(layout), read_meta(layout))
print(json.dumps({"oof_dice": summary["oof_dice"]}))
"""


def measure_size(root: Path, n_train: int, distinct: Path) -> dict[str, tuple[float, float]]:
    data = make_data(root, n_train, distinct)
    workdir = root / f"folds-{n_train}"
    shutil.rmtree(workdir, ignore_errors=True)
    results = {}
    steps = {
        "ek folds": ek_command("folds", "--data", data, "--workdir", workdir, "--folds", 5),
        "ek prepare (ash t3-t5, uint8)": ek_command(
            "prepare",
            "--data",
            data,
            "--workdir",
            workdir,
            "--split",
            "train",
            "--split",
            "validation",
            CONFIG,
        ),  # fmt: skip
    }
    for label, command in steps.items():
        run = run_measured(command)
        results[label] = (run.seconds, run.peak_mb)
        print(f"  {n_train}: {label}: {run.seconds:.1f} s, {run.peak_mb:.0f} MB", flush=True)
    fake_fold_parts(workdir, data)
    run = run_measured([sys.executable, "-c", ASSEMBLE, str(workdir), str(CONFIG), str(data)])
    results["OOF assembly (one config)"] = (run.seconds, run.peak_mb)
    print(f"  {n_train}: OOF assembly: {run.seconds:.1f} s, {run.peak_mb:.0f} MB", flush=True)
    return results


def table(sizes: list[int], results: dict[int, dict]) -> str:
    small, large = sizes[0], sizes[-1]
    head = "| step | " + " | ".join(f"{n:,} records" for n in sizes)
    lines = [
        head + f" | growth {small:,} -> {large:,} (linear x{large / small:.1f}) |",
        "|---|" + "---:|" * len(sizes) + "---|",
    ]
    for step in results[small]:
        cells = [f"{results[n][step][0]:.1f} s, {results[n][step][1]:.0f} MB" for n in sizes]
        time_ratio = results[large][step][0] / results[small][step][0]
        memory_ratio = results[large][step][1] / results[small][step][1]
        growth = f"time x{time_ratio:.1f}, memory x{memory_ratio:.1f}"
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="scratch folder (big disk)")
    parser.add_argument("--sizes", default="2000,20529")
    parser.add_argument("--distinct", type=int, default=64)
    parser.add_argument("--keep", action="store_true", help="keep the data and workdirs")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    distinct = args.root / "distinct"
    if not distinct.is_dir():
        n_validation = max(1, args.distinct // 4)
        synth = ("--train", args.distinct, "--validation", n_validation, "--test", 1)
        run_measured(ek_command("synth", "--out", distinct, *synth, "--size", 256))
    print(f"{load_note()} at start", flush=True)
    results = {n: measure_size(args.root, n, distinct) for n in sizes}
    print(f"{load_note()} at the end")
    print(table(sizes, results))
    if not args.keep:
        shutil.rmtree(args.root)


if __name__ == "__main__":
    main()
