"""Benchmark of the blend kernels and search (a script, not a test).

    python benchmarks/blend.py                 # 2,200 images of 256x256, 10 configs
    python benchmarks/blend.py --images 200    # a quick small run
    python benchmarks/blend.py --images 20529 --data /big/disk/blend   # the full size (15 GB)

Prints, each measured in this run:
1. one 256-threshold sweep of one config: numba vs the numpy reference (target >= 200x);
2. the full search (10 configs, 25 greedy steps, exact threshold, min-pixel, nested
   estimate) on uint8 memmaps at N images with the labels in memory as bytes (as run_blend
   loaded them before) and file-backed (as it does now), and at N/2: seconds and peak
   anonymous memory (RssAnon, sampled from /proc; memmapped pages are page cache and do
   not count). Targets: < 5 s at 2,200 images; < 30 s and < 2 GB at 20,529; at most
   linear in N;
3. connected components of the same masks: numba batch vs a loop of scipy.ndimage.label
   (and the min-component filter vs scipy label + bincount; target >= 10x).
Each search runs in a fresh subprocess, so its memory is its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ensemble_kit import metrics, postprocess  # noqa: E402
from ensemble_kit.blend.ensemble_search import MIN_COMPONENT_GRID, search  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from measure import load_note, run_measured  # noqa: E402


def make_data(folder: Path, n_images: int, n_configs: int, side: int = 256, seed: int = 0) -> None:
    """Synthetic labels (thin line segments in ~40 % of images) and OOF memmaps per config.

    Background noise codes are drawn once into a bank and sliced at random offsets, so 20,529
    images x 10 configs take minutes, not half an hour; only the line pixels are computed.
    """
    rng = np.random.default_rng(seed)
    shape = (n_images, side, side)
    labels = np.lib.format.open_memmap(folder / "labels.npy", "w+", np.uint8, shape)
    oofs = [
        np.lib.format.open_memmap(folder / f"oof_{c}.npy", "w+", np.uint8, shape)
        for c in range(n_configs)
    ]
    bank = _noise_codes(rng, 4 * 64 * side * side)
    for lo in range(0, n_images, 64):
        hi = min(lo + 64, n_images)
        truth, signal = _chunk_signal(rng, hi - lo, side)
        labels[lo:hi] = truth
        hot = np.flatnonzero(signal)
        for c, oof in enumerate(oofs):
            start = rng.integers(0, len(bank) - truth.size)
            codes = bank[start : start + truth.size].copy()
            codes[hot] = _hot_codes(rng, codes[hot], signal.reshape(-1)[hot], 0.6 + 0.04 * c)
            oof[lo:hi] = codes.reshape(truth.shape)
    for array in (labels, *oofs):
        array.flush()
    np.save(folder / "folds.npy", np.arange(n_images) % 5)


def _noise_codes(rng, size: int) -> np.ndarray:
    noise = rng.standard_exponential(size, dtype=np.float32) * 0.006
    return np.rint(np.clip(noise, 0, 1) * 255).astype(np.uint8)


def _hot_codes(rng, background, signal, gain):
    jitter = 1 + 0.5 * rng.standard_normal(len(signal), dtype=np.float32)
    value = background / 255.0 + signal * gain * jitter
    return np.rint(np.clip(value, 0, 1) * 255).astype(np.uint8)


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


def run_search_child(
    folder: Path, n_images: int, component_grid: tuple[int, ...], labels_mode: str
) -> dict:
    """In a fresh process: compile on a tiny problem, then time one full search.

    ``labels_mode``: ``memmap`` passes the labels file-backed, as ``run_blend`` does now;
    ``bytes`` loads them into memory first (a byte per pixel), as it did before.
    """
    oofs = [first_rows(p, n_images) for p in sorted(folder.glob("oof_*.npy"))]
    labels = first_rows(folder / "labels.npy", n_images)
    folds = np.load(folder / "folds.npy")[:n_images]
    search([o[:10] for o in oofs[:2]], np.asarray(labels[:10]), folds[:10], steps=2)
    start, cpu_start = time.perf_counter(), time.process_time()
    if labels_mode == "bytes":
        labels = np.array(labels)
    result = search(oofs, labels, folds, steps=25, min_component_grid=component_grid)
    seconds = time.perf_counter() - start
    return {
        "images": n_images,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,
        "dice": result.choice.dice,
        "nested": result.nested.pooled(),
        "weights": result.choice.weights.tolist(),
        "min_pixels": result.choice.min_pixels,
    }


def first_rows(path: Path, n_rows: int) -> np.memmap:
    """A memmap of the first rows of a .npy file (a file-backed memmap, not a view)."""
    whole = np.load(path, mmap_mode="r")
    return np.memmap(path, np.uint8, "r", offset=whole.offset, shape=(n_rows, *whole.shape[1:]))


def bench_search(
    folder: Path, n_images: int, component_grid: tuple[int, ...], labels_mode: str = "memmap"
) -> dict:
    """The search in a child process; its peak anonymous memory sampled from here."""
    command = [
        sys.executable,
        __file__,
        "--child",
        str(folder),
        "--images",
        str(n_images),
        "--components",
        ",".join(map(str, component_grid)),
        "--labels",
        labels_mode,
    ]
    result = run_measured(command)
    return {**result.last_json, "peak_rss_anon_mb": result.peak_mb}


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
    parser.add_argument(
        "--labels",
        choices=("memmap", "bytes", "both"),
        default="both",
        help="labels file-backed (as run_blend), in memory (as before), or both",
    )
    args = parser.parse_args()
    if args.child:
        grid = tuple(int(x) for x in args.components.split(","))
        print(json.dumps(run_search_child(args.child, args.images, grid, args.labels)))
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
    print(f"{load_note()} at start (timings are wall-clock, shared machine)")
    sweep = bench_sweep(folder, min(args.sweep_images, args.images))
    print(
        f"sweep ({sweep['images']} images, {sweep['images'] * 65536 / 1e6:.0f} M pixels): numba {sweep['numba_s'] * 1e3:.1f} ms, numpy {sweep['numpy_s']:.2f} s, ratio {sweep['ratio']:.0f}x"
    )
    modes = ("bytes", "memmap") if args.labels == "both" else (args.labels,)
    for grid, label in (
        ((0,), "min-pixel"),
        (MIN_COMPONENT_GRID, "min-pixel + min-component"),
    ):
        runs = [(mode, bench_search(folder, args.images, grid, mode)) for mode in modes]
        runs.append(("memmap", bench_search(folder, args.images // 2, grid, "memmap")))
        for mode, run in runs:
            print(
                f"search [{label}] {run['images']} images, labels {mode}: {run['seconds']:.1f} s "
                f"(CPU {run['cpu_seconds']:.1f} s), peak RssAnon {run['peak_rss_anon_mb']:.0f} MB; "
                f"OOF dice {run['dice']:.4f}, nested {run['nested']:.4f}, weights {run['weights']}, "
                f"min_pixels {run['min_pixels']}"
            )
        full, half = runs[-2][1], runs[-1][1]
        print(
            f"  growth N/2 -> N: time x{full['seconds'] / half['seconds']:.2f}, "
            f"RssAnon x{full['peak_rss_anon_mb'] / half['peak_rss_anon_mb']:.2f} (linear: x2.00)"
        )
    comps = bench_components(folder, min(args.images, 1000))
    print(
        f"components ({comps['images']} masks): label numba {comps['label_numba_s'] * 1e3:.0f} ms vs scipy loop "
        f"{comps['label_scipy_s'] * 1e3:.0f} ms ({comps['label_ratio']:.1f}x); min-component filter numba "
        f"{comps['filter_numba_s'] * 1e3:.0f} ms vs scipy {comps['filter_scipy_s'] * 1e3:.0f} ms ({comps['filter_ratio']:.1f}x)"
    )


if __name__ == "__main__":
    main()
