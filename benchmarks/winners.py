"""The winners' three levers on `ek synth` data, each against a baseline trained in this run.

    python benchmarks/winners.py                   # ~7 CPU-minutes (1 thread per process)
    python benchmarks/winners.py --train 32 --size 32 --epochs 2  # a smoke run

One synthetic data set (64 px, train pooled into K folds, validation kept out as the
holdout), one tiny config (the `configs/tiny.yaml` U-Net, frames 3-5), the same number of
epochs for every arm. Arms:

1. ``base``: the config as it is (seed 0).
2. ``topk``: the same with ``train.average_top_k: 5`` (4th place's checkpoint averaging).
3. seeds: the same config with ``train.seeds: [1, 2]``, blended with ``base`` (seed 0): a
   3-seed ensemble. Its single members' spread is the noise floor of every comparison here.
4. ``round2``: ``ek pseudo`` from the blend of ``base`` alone (frames 0-3 and 5-7), then
   the config with ``label: {pseudo: round1}`` (fraction 0.5, weight 0.5): the 4th place's
   second round; same epochs and steps as ``base``.

Each arm is scored by ``ek blend --oof`` on just its configs: the nested dice (threshold
chosen on K-1 folds, scored on the held-out fold, pooled) and the holdout dice of that
choice (the validation records, which no model or pseudo-label saw). Prints a table with
each arm's difference from ``base`` and writes ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ensemble_kit.blend.run import run_blend  # noqa: E402
from ensemble_kit.data.synth import write_synthetic  # noqa: E402
from ensemble_kit.layout import Layout  # noqa: E402

BASE = """\
name: {name}
input: {{channels: ash, frames: [3, 4, 5]}}
model: {{arch: Unet, encoder: tu-test_resnet, encoder_weights: none}}
loss: [{{name: dice, weight: 1.0}}, {{name: bce, weight: 1.0}}]
optim: {{name: adam, lr: 0.003}}
schedule: {{name: cosine, warmup_iters: 5}}
augment: {{hflip: 0.5, vflip: 0.5}}
train: {{epochs: {epochs}, batch_size: 8, seed: 0{train}}}
tta: [identity, hflip, vflip, hvflip]
"""
# config file -> (config name, extra train keys); `seeds` members are named base-s1, base-s2
ARMS = {
    "base": ("base", ""),
    "topk": ("topk", ", average_top_k: 5"),
    "seeds": ("base", ", seeds: [1, 2]"),
}
ROUND2 = "label: {pseudo: round1, pseudo_weight: 0.5, pseudo_fraction: 0.5}\n"


def write_config(folder: Path, file: str, name: str, epochs: int, train="", extra="") -> Path:
    path = folder / f"{file}.yaml"
    path.write_text(BASE.format(name=name, epochs=epochs, train=train) + extra)
    return path


def ek(*args: str, threads: int) -> float:
    """Run an ``ek`` command in a fresh process; returns its CPU seconds.

    A fresh process per arm, so that every arm runs alike: numba's first parallel kernel
    resets OpenMP's thread count, which torch shares, and a run after it differs from one
    before it in the last bits. NUMBA_NUM_THREADS keeps that count at ``threads``; on a
    loaded machine 2 spinning OpenMP threads ran many times slower than 1.
    """
    counts = {k: str(threads) for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS")}
    env = {**os.environ, **counts, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, "-m", "ensemble_kit.cli", *args]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def score(layout: Layout, configs: list[str]) -> dict:
    blend = run_blend(layout, configs=configs)
    return {
        "configs": configs,
        "weights": blend.rule.weights,
        "nested": blend.scores["nested"]["pooled"],
        "holdout": blend.scores["holdout"],
    }


def run(args) -> dict:
    out = Path(args.out)
    data, layout = out / "data", Layout(out / "folds")
    if not (data / "train").is_dir():
        write_synthetic(data, args.train, args.validation, 2, args.size, seed=args.seed)
    common = ("--workdir", str(layout.workdir), "--device", "cpu")
    cv = ("cv", "--data", str(data), "--folds", str(args.folds), *common)
    seconds, results = {}, {}
    for file, (name, train_keys) in ARMS.items():
        path = write_config(out, file, name, args.epochs, train_keys)
        seconds[file] = ek(*cv, str(path), threads=args.threads)
    results["base"] = score(layout, ["base"])
    results["topk"] = score(layout, ["topk"])
    for seed in (1, 2):
        results[f"base-s{seed}"] = score(layout, [f"base-s{seed}"])
    results["seeds x3"] = score(layout, ["base", "base-s1", "base-s2"])
    score(layout, ["base"])  # the first round: blend.json of base alone
    frames = ("--frames", "0", "1", "2", "3", "5", "6", "7")
    seconds["pseudo"] = ek("pseudo", *frames, "--out", "round1", *common, threads=args.threads)
    path = write_config(out, "round2", "round2", args.epochs, extra=ROUND2)
    seconds["round2"] = ek(*cv, str(path), threads=args.threads)
    results["round2"] = score(layout, ["round2"])
    results["base + round2"] = score(layout, ["base", "round2"])
    return {"args": vars(args), "results": results, "cpu_seconds": seconds, "folds": folds(layout)}


def folds(layout: Layout) -> dict:
    """Per config and fold: the validation dice of the best epoch (and of the averaged one)."""
    table = {}
    for name in ("base", "topk", "base-s1", "base-s2", "round2"):
        summary = json.loads(layout.summary(name).read_text())
        table[name] = [
            {k: f[k] for k in ("best_epoch", "best_dice", "top_k_epochs", "top_k_dice") if k in f}
            for f in summary["folds"]
        ]
    return table


def report(outcome: dict) -> str:
    results = outcome["results"]
    base = results["base"]
    lines = [f"{'arm':<16}{'nested':>9}{'holdout':>9}{'d nested':>10}{'d holdout':>11}  weights"]
    for arm, r in results.items():
        lines.append(
            f"{arm:<16}{r['nested']:>9.4f}{r['holdout']:>9.4f}"
            f"{r['nested'] - base['nested']:>+10.4f}{r['holdout'] - base['holdout']:>+11.4f}"
            f"  {r['weights']}"
        )
    for name, rows in outcome["folds"].items():
        for fold, row in enumerate(rows):
            lines.append(f"{name} fold {fold}: {row}")
    spent = ", ".join(f"{k} {v / 60:.1f}" for k, v in outcome["cpu_seconds"].items())
    return "\n".join(lines + [f"CPU minutes: {spent}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="winners-bench", help="Working folder (reused).")
    parser.add_argument("--train", type=int, default=128, help="Synthetic training records.")
    parser.add_argument("--validation", type=int, default=48, help="Holdout records.")
    parser.add_argument("--size", type=int, default=64, help="Image side.")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic data.")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads (1: shared CPU).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    outcome = run(args)
    Path(args.out, "results.json").write_text(json.dumps(outcome, indent=2) + "\n")
    print(report(outcome))


if __name__ == "__main__":
    main()
