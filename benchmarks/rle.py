"""Benchmark RLE encode/decode against the per-pixel Python loop reference.

Usage: python benchmarks/rle.py [--masks 1000] [--repeats 5] [--seed 0]

Builds contrail-like 256x256 masks (most empty; ~40% with a few thin, long, slightly
curved streaks 2-4 px wide), checks the fast functions agree with the references, and
prints timings and speed-up ratios measured in this same run. Each timing is the process
CPU time (``time.process_time``, so waiting for a busy shared CPU does not count) of the
best of ``--repeats`` passes over all masks; the slow references get at most 3 passes.
``--wall`` measures wall-clock time instead.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from ensemble_kit.inference.rle import (
    decode,
    decode_reference,
    encode,
    encode_batch,
    encode_reference,
)

SHAPE = (256, 256)


def streak(mask: np.ndarray, rng: np.random.Generator) -> None:
    """Draw one thin, long, slightly curved streak into ``mask`` in place."""
    height, width = mask.shape
    length, bend = rng.uniform(60, 220), rng.uniform(-12, 12)
    angle, half_width = rng.uniform(0, np.pi), rng.uniform(1.0, 2.0)
    centre = rng.uniform(0, [height, width])
    t = np.linspace(-0.5, 0.5, int(length * 2))
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]])
    points = centre + np.outer(t * length, direction) + np.outer(bend * (1 - 4 * t**2), normal)
    for dr in np.arange(-half_width, half_width + 0.01, 0.5):
        for dc in np.arange(-half_width, half_width + 0.01, 0.5):
            if dr * dr + dc * dc <= half_width**2:
                r = np.round(points[:, 0] + dr).astype(int)
                c = np.round(points[:, 1] + dc).astype(int)
                keep = (r >= 0) & (r < height) & (c >= 0) & (c < width)
                mask[r[keep], c[keep]] = True


def contrail_masks(count: int, seed: int) -> np.ndarray:
    """``(count, 256, 256)`` bool masks: ~60% empty, the rest with 1-4 streaks."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, *SHAPE), dtype=bool)
    for mask in masks:
        if rng.random() < 0.4:
            for _ in range(rng.integers(1, 5)):
                streak(mask, rng)
    return masks


CLOCK = time.process_time


def best_time(work: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = CLOCK()
        work()
        times.append(CLOCK() - start)
    return min(times)


def slice_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The common per-run slice-assignment decode (not per-pixel), for context."""
    height, width = shape
    flat = np.zeros(height * width, dtype=bool)
    numbers = [int(x) for x in rle.split() if x != "-"]
    for start, length in zip(numbers[0::2], numbers[1::2]):
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape(width, height).T.copy()


def check_agreement(masks: np.ndarray, rles: list[str]) -> None:
    """Fail loudly if the fast and reference functions disagree on these masks."""
    assert rles == [encode_reference(m) for m in masks], "encode differs from reference"
    assert rles == encode_batch(masks), "encode_batch differs from encode"
    for mask, rle in zip(masks, rles):
        assert np.array_equal(decode(rle, SHAPE), mask), "decode does not round-trip"
        assert np.array_equal(decode_reference(rle, SHAPE), mask), "reference decode differs"


def timings(masks: np.ndarray, rles: list[str], repeats: int) -> dict[str, float]:
    """Best-of timings (seconds for all masks) of every fast and slow function."""
    slow = min(repeats, 3)
    return {
        "encode": best_time(lambda: [encode(m) for m in masks], repeats),
        "encode_batch": best_time(lambda: encode_batch(masks), repeats),
        "encode_reference": best_time(lambda: [encode_reference(m) for m in masks], slow),
        "decode": best_time(lambda: [decode(r, SHAPE) for r in rles], repeats),
        "decode_reference": best_time(lambda: [decode_reference(r, SHAPE) for r in rles], slow),
        "slice_decode": best_time(lambda: [slice_decode(r, SHAPE) for r in rles], repeats),
    }


def report(label: str, masks: np.ndarray, rles: list[str], repeats: int) -> None:
    """Print timings per mask and speed-ups over the per-pixel references."""
    t = timings(masks, rles, repeats)
    per_mask = {name: seconds / len(masks) * 1e6 for name, seconds in t.items()}
    clock = "wall" if CLOCK is time.perf_counter else "CPU"
    print(f"\n{label} ({len(masks)} masks), {clock} microseconds per mask, best of {repeats}:")
    for name, micros in per_mask.items():
        print(f"  {name:<18} {micros:10.1f}")
    print(f"  encode       speed-up vs per-pixel loop: {t['encode_reference'] / t['encode']:7.1f}x")
    print(
        f"  encode_batch speed-up vs per-pixel loop: {t['encode_reference'] / t['encode_batch']:7.1f}x"
    )
    print(f"  decode       speed-up vs per-pixel loop: {t['decode_reference'] / t['decode']:7.1f}x")
    print(f"  decode       speed-up vs per-run slice loop: {t['slice_decode'] / t['decode']:5.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wall", action="store_true", help="time wall clock, not CPU")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.wall else time.process_time

    masks = contrail_masks(args.masks, args.seed)
    rles = [encode(m) for m in masks]
    check_agreement(masks, rles)
    nonempty = masks.any(axis=(1, 2))
    runs = [len(r.split()) // 2 for r, keep in zip(rles, nonempty) if keep]
    print(
        f"masks: {len(masks)} x {SHAPE}, {nonempty.mean():.0%} non-empty; non-empty ones have "
        f"{masks[nonempty].sum(axis=(1, 2)).mean():.0f} positive px and {np.mean(runs):.0f} runs "
        "on average. Outputs agree with the references."
    )
    report("all masks", masks, rles, args.repeats)
    report(
        "non-empty masks only",
        masks[nonempty],
        [r for r, k in zip(rles, nonempty) if k],
        args.repeats,
    )


if __name__ == "__main__":
    main()
