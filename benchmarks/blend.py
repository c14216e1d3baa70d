"""Benchmark of the blend kernels and search (a script, not a test).

    python benchmarks/blend.py                 # 2,200 images of 256x256, 10 configs
    python benchmarks/blend.py --images 200    # a quick small run

Prints, each measured in this run:
1. one 256-threshold sweep of one config: numba vs the numpy reference (target >= 200x);
2. the full search (10 configs, 25 greedy steps, exact threshold, min-pixel, nested
   estimate) on uint8 memmaps at N and N/2 images: seconds, tracemalloc peak and max RSS
   (target < 5 s and < 2 GB at 2,200 images; time at most linear in N);
3. connected components of the same masks: numba batch vs a loop of scipy.ndimage.label
   (and the min-component filter vs scipy label + bincount; target >= 10x).
Each search runs in a fresh subprocess, so its max RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ensemble_kit import blend, metrics, postprocess  # noqa: E402


def make_data(folder: Path, n_images: int, n_configs: int, side: int = 256, seed: int = 0) -> None:
    """Synthetic labels (thin line segments in ~40 % of images) and OOF memmaps per config."""
    rng = np.random.default_rng(seed)
    labels = np.lib.format.open_memmap(
        folder / "labels.npy", "w+", np.uint8, (n_images, side, side)
    )
    oofs = [
        np.lib.format.open_memmap(folder / f"oof_{c}.npy", "w+", np.uint8, (n_images, side, side))
        for c in range(n_configs)
    ]
    for lo in range(0, n_images, 64):
        hi = min(lo + 64, n_images)
        truth, signal = _chunk_signal(rng, hi - lo, side)
        labels[lo:hi] = truth
        for c, oof in enumerate(oofs):
            oof[lo:hi] = _config_codes(rng, signal, 0.6 + 0.04 * c)
    for array in (labels, *oofs):
        array.flush()
    np.save(folder / "folds.npy", np.arange(n_images) % 5)


def _chunk_signal(rng, n, side):
    truth = np.zeros((n, side, side), np.uint8)
    distractor = np.zeros((n, side, side), np.float32)
    for i in range(n):
        for target, strength in ((truth, 1), (distractor, 0.5)):
            for _ in range(rng.integers(1, 5) if rng.random() < 0.4 else 0):
                _draw_segment(rng, target[i], side, strength)
    signal = truth.astype(np.float32) + distractor
    blurred = signal.copy()  # a cheap 3x3 box blur spreads each line's probability
    for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        blurred += 0.5 * np.roll(signal, (dr, dc), axis=(1, 2))
    return truth, np.clip(blurred / 2.0, 0, 1)


def _draw_segment(rng, image, side, strength):
    r0, c0 = rng.integers(0, side, 2)
    length, angle = rng.integers(15, 120), rng.random() * np.pi
    t = np.arange(length)
    rows, cols = (r0 + t * np.sin(angle)).astype(int), (c0 + t * np.cos(angle)).astype(int)
    ok = (rows >= 0) & (rows < side - 1) & (cols >= 0) & (cols < side)
    image[rows[ok], cols[ok]] = strength
    image[rows[ok] + 1, cols[ok]] = strength


def _config_codes(rng, signal, gain):
    codes = rng.standard_exponential(signal.shape, dtype=np.float32) * 0.006
    hot = signal > 0
    codes[hot] += (
        signal[hot] * gain * (1 + 0.5 * rng.standard_normal(int(hot.sum()), dtype=np.float32))
    )
    return np.rint(np.clip(codes, 0, 1) * 255).astype(np.uint8)


def bench_sweep(folder: Path, n_images: int) -> dict:
    probs = np.load(folder / "oof_0.npy", mmap_mode="r")[:n_images]
    labels = np.load(folder / "labels.npy", mmap_mode="r")[:n_images]
    probs, labels = np.ascontiguousarray(probs), np.ascontiguousarray(labels)
    metrics.threshold_sweep(probs[:2], labels[:2])  # compile
    fast = _best_of(lambda: metrics.threshold_sweep(probs, labels), 5)
    slow = _best_of(lambda: metrics.threshold_sweep_reference(probs, labels), 1)
    return {"images": n_images, "numba_s": fast, "numpy_s": slow, "ratio": slow / fast}


def bench_components(folder: Path, n_images: int) -> dict:
    from scipy import ndimage

    probs = np.load(folder / "oof_0.npy", mmap_mode="r")[:n_images]
    masks = np.ascontiguousarray(probs >= 100)
    labels_out, kept_out = np.empty(masks.shape, np.int32), np.empty(masks.shape, bool)
    postprocess.label_components_batch(masks[:2])
    postprocess.remove_small_components_batch(masks[:2], 10)
    numba_label = _best_of(lambda: postprocess.label_components_batch(masks, labels_out), 5)
    numba_filter = _best_of(
        lambda: postprocess.remove_small_components_batch(masks, 10, kept_out), 5
    )
    structure = np.ones((3, 3), bool)
    scipy_label = _best_of(lambda: [ndimage.label(m, structure=structure) for m in masks], 2)
    scipy_filter = _best_of(
        lambda: [postprocess.remove_small_components_reference(m, 10) for m in masks], 2
    )
    return {
        "images": n_images,
        "label_numba_s": numba_label,
        "label_scipy_s": scipy_label,
        "label_ratio": scipy_label / numba_label,
        "filter_numba_s": numba_filter,
        "filter_scipy_s": scipy_filter,
        "filter_ratio": scipy_filter / numba_filter,
    }


def run_search_child(folder: Path, n_images: int, component_grid: tuple[int, ...]) -> dict:
    """In a fresh process: compile on a tiny problem, then time one full search."""
    oofs = [_first_rows(p, n_images) for p in sorted(folder.glob("oof_*.npy"))]
    labels = _first_rows(folder / "labels.npy", n_images)
    folds = np.load(folder / "folds.npy")[:n_images]
    blend.search([o[:10] for o in oofs[:2]], np.asarray(labels[:10]), folds[:10], steps=2)
    tracemalloc.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    labels = np.array(labels)  # labels are loaded into memory by run_blend too
    result = blend.search(oofs, labels, folds, steps=25, min_component_grid=component_grid)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    return {
        "images": n_images,
        "seconds": seconds,
        "tracemalloc_peak_mb": peak / 2**20,
        "cpu_seconds": time.process_time() - cpu_start,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "dice": result.choice.dice,
        "nested": result.nested.pooled(),
        "weights": result.choice.weights.tolist(),
        "min_pixels": result.choice.min_pixels,
    }


def _first_rows(path: Path, n_rows: int) -> np.memmap:
    """A memmap of the first rows of a .npy file (a file-backed memmap, not a view)."""
    whole = np.load(path, mmap_mode="r")
    return np.memmap(path, np.uint8, "r", offset=whole.offset, shape=(n_rows, *whole.shape[1:]))


def bench_search(folder: Path, n_images: int, component_grid: tuple[int, ...]) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        str(folder),
        "--images",
        str(n_images),
        "--components",
        ",".join(map(str, component_grid)),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2200)
    parser.add_argument("--configs", type=int, default=10)
    parser.add_argument(
        "--sweep-images", type=int, default=256, help="images for the sweep comparison"
    )
    parser.add_argument("--data", type=Path, help="reuse/keep the synthetic data in this folder")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--components", default="0", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        grid = tuple(int(x) for x in args.components.split(","))
        print(json.dumps(run_search_child(args.child, args.images, grid)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "folds.npy").is_file() or len(np.load(folder / "folds.npy")) < args.images:
            start = time.perf_counter()
            make_data(folder, args.images, args.configs)
            print(
                f"data: {args.images} images x {args.configs} configs in {time.perf_counter() - start:.1f} s"
            )
        report(folder, args)


def report(folder: Path, args) -> None:
    print(
        f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (timings are wall-clock, shared machine)"
    )
    sweep = bench_sweep(folder, min(args.sweep_images, args.images))
    print(
        f"sweep ({sweep['images']} images, {sweep['images'] * 65536 / 1e6:.0f} M pixels): numba {sweep['numba_s'] * 1e3:.1f} ms, numpy {sweep['numpy_s']:.2f} s, ratio {sweep['ratio']:.0f}x"
    )
    for grid, label in (
        ((0,), "min-pixel"),
        (blend.MIN_COMPONENT_GRID, "min-pixel + min-component"),
    ):
        full = bench_search(folder, args.images, grid)
        half = bench_search(folder, args.images // 2, grid)
        print(
            f"search [{label}] {full['images']} images: {full['seconds']:.2f} s (CPU {full['cpu_seconds']:.1f} s), tracemalloc peak {full['tracemalloc_peak_mb']:.0f} MB, "
            f"max RSS {full['max_rss_mb']:.0f} MB; {half['images']} images: {half['seconds']:.2f} s (CPU {half['cpu_seconds']:.1f} s) "
            f"(time ratio full/half {full['seconds'] / half['seconds']:.2f}); OOF dice {full['dice']:.4f}, nested {full['nested']:.4f}, "
            f"weights {full['weights']}, min_pixels {full['min_pixels']}"
        )
    comps = bench_components(folder, min(args.images, 1000))
    print(
        f"components ({comps['images']} masks): label numba {comps['label_numba_s'] * 1e3:.0f} ms vs scipy loop "
        f"{comps['label_scipy_s'] * 1e3:.0f} ms ({comps['label_ratio']:.1f}x); min-component filter numba "
        f"{comps['filter_numba_s'] * 1e3:.0f} ms vs scipy {comps['filter_scipy_s'] * 1e3:.0f} ms ({comps['filter_ratio']:.1f}x)"
    )


if __name__ == "__main__":
    main()
