"""Where the blend search's time goes as the data doubles (issue 21: why x2.4-2.6 per doubling).

    python benchmarks/blend_growth.py --images 2200 4400 --data /tmp/growth

For each size, in a fresh process on the first N rows of ``benchmarks/blend.py``'s synthetic
data (10 configs, 256 x 256), one full search (``ek blend``'s: 25 greedy steps, min-pixel and
min-component grids, fully nested) with each phase timed (wall and process CPU seconds) and
the work each did counted: candidate pixels, greedy passes over them (one per distinct base
weight vector of a step) and scored moves, and threshold tables (one per distinct weight
vector of the 16 sets, each a pass over every candidate with every postprocessing pair).
A cost per candidate and pass that stays flat while the counts grow says the growth is in
the work the search chooses to do, not in the cost of each pixel.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blend import first_rows, make_data  # noqa: E402
from measure import load_note, run_measured  # noqa: E402

CONFIGS = 10


def child(folder: Path, n_images: int) -> dict:
    """One timed, counted search on the first ``n_images`` rows (compiled on a tiny one first)."""
    from ensemble_kit.blend import ensemble_search, nested, scorer

    oofs = [first_rows(p, n_images) for p in sorted(folder.glob("oof_*.npy"))]
    labels = first_rows(folder / "labels.npy", n_images)
    folds = np.load(folder / "folds.npy")[:n_images]
    ensemble_search.search([o[:10] for o in oofs[:2]], np.asarray(labels[:10]), folds[:10], 2)
    out: dict = {"passes": 0, "moves": 0, "tables": 0}
    _count(scorer, "score_moves", out, lambda args: ("passes", len(args[0]), "moves", len(args[2])))
    _count(nested, "threshold_tables", out, lambda args: ("tables", 1, None, 0))
    for module, name, key in [
        (ensemble_search, "build_candidates", "candidates"),
        (nested, "greedy_paths", "greedy"),
        (nested, "threshold_tables", "tables"),
    ]:
        _time(module, name, key, out)
    started, cpu = time.perf_counter(), time.process_time()
    result = ensemble_search.search(oofs, labels, folds, steps=25)
    out |= {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu}
    out |= {"weights": result.choice.weights.tolist(), "dice": result.choice.dice}
    return out


def _count(module, name: str, out: dict, what) -> None:
    fn = getattr(module, name)

    def counted(*args, **kwargs):
        key, n, key2, n2 = what(args)
        out[key] += n
        if key2:
            out[key2] += n2
        return fn(*args, **kwargs)

    setattr(module, name, counted)


def _time(module, name: str, key: str, out: dict) -> None:
    fn = getattr(module, name)

    def timed(*args, **kwargs):
        started, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        if key == "candidates":
            out["pixels"] = len(result.labels)
        out[f"wall_{key}"] = out.get(f"wall_{key}", 0.0) + time.perf_counter() - started
        out[f"cpu_{key}"] = out.get(f"cpu_{key}", 0.0) + time.process_time() - cpu
        return result

    setattr(module, name, timed)


def measured(folder: Path, n_images: int) -> dict:
    command = [sys.executable, __file__, "--child", str(folder), "--images", str(n_images)]
    command += ["--data", str(folder)]
    result = run_measured(command)
    return {**result.last_json, "mb": result.peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2200, 4400])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.images[0])))
        return
    if not (args.data / "labels.npy").is_file():
        args.data.mkdir(parents=True, exist_ok=True)
        make_data(args.data, max(args.images), CONFIGS)
    print(f"# blend search growth, {CONFIGS} configs, {load_note()}")
    print(
        "| images | candidates | wall s (CPU s) | candidate pass | greedy: passes, moves | "
        "threshold tables | ns / candidate / greedy pass | ns / candidate / table | peak MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.images:
        r = measured(args.data, n)
        print(
            f"| {n:,} | {r['pixels']:,} | {r['wall']:.1f} ({r['cpu']:.1f}) | "
            f"{r['cpu_candidates']:.1f} | {r['cpu_greedy']:.1f} s: {r['passes']}, {r['moves']} | "
            f"{r['cpu_tables']:.1f} s: {r['tables']} | "
            f"{r['cpu_greedy'] / r['passes'] / r['pixels'] * 1e9:.1f} | "
            f"{r['cpu_tables'] / r['tables'] / r['pixels'] * 1e9:.1f} | {r['mb']:,.0f} |"
        )


if __name__ == "__main__":
    main()
