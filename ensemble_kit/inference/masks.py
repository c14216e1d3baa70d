"""Blended member codes to submission rows: threshold, postprocess and encode batch by batch
(:meth:`~ensemble_kit.blend.rule.BlendRule.apply` is the one code path), the per-stage clock.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..blend.rule import BlendRule
from .rle import encode

TOP_FRACTION_CHUNK = 64


@dataclass
class Timer:
    """Seconds spent per stage."""

    seconds: dict = field(default_factory=lambda: {"read": 0.0, "model": 0.0, "encode": 0.0})

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - since
        return now


def encode_records(ids: list[str], masks: np.ndarray) -> tuple[list[str], list[str]]:
    """Contrails' rows of one batch: one RLE per record."""
    return ids, [encode(mask) for mask in masks]


def blend_batches(
    rule: BlendRule, batches: Iterable, timer: Timer, encoder: Callable | None = None
) -> tuple[list[str], list[str], tuple[int, ...], int]:
    """Threshold, postprocess and encode batch by batch (:meth:`BlendRule.apply`);
    ``top_fraction`` mode first stores the whole split's codes in a temporary file, to take
    the threshold from the split's histogram.

    Args:
        encoder: ``encoder(ids, masks) -> (row ids, RLEs)`` of a batch; default one
            contrails row per record (:func:`encode_records`).

    Returns:
        ``(row ids, rles, mask shape, the threshold sum applied)``.
    """
    encoder = encoder or encode_records
    if rule.mode == "top_fraction":
        return _blend_top_fraction(rule, batches, timer, encoder)
    ids: list[str] = []
    rles: list[str] = []
    shape: tuple[int, ...] = (256, 256)
    threshold = rule.threshold_for()
    for batch_ids, codes in batches:
        clock = time.perf_counter()
        masks = rule.apply(codes, threshold)
        rows, batch_rles = encoder(batch_ids, masks)
        ids += rows
        rles += batch_rles
        shape = masks.shape[1:]
        timer.add("encode", clock)
    return ids, rles, shape, threshold


def _blend_top_fraction(rule: BlendRule, batches: Iterable, timer: Timer, encoder: Callable):
    members = rule.members
    ids: list[str] = []
    shape: tuple[int, ...] = (256, 256)
    with tempfile.TemporaryDirectory(prefix="ek-submit-") as scratch:
        paths = {name: Path(scratch) / f"{i}.u8" for i, name in enumerate(members)}
        handles = {name: open(path, "wb") for name, path in paths.items()}
        for batch_ids, codes in batches:
            ids += batch_ids
            shape = codes[members[0]].shape[1:]
            for name in members:
                handles[name].write(np.ascontiguousarray(codes[name]).tobytes())
        for handle in handles.values():
            handle.close()
        stored = {
            n: np.memmap(p, np.uint8, "r", shape=(len(ids), *shape)) for n, p in paths.items()
        }
        step = TOP_FRACTION_CHUNK
        histogram = np.zeros(255 * rule.weight_total + 1, dtype=np.int64)
        for start in range(0, len(ids), step):
            histogram += rule.histogram({n: stored[n][start : start + step] for n in members})
        threshold = rule.threshold_for(histogram)
        rows: list[str] = []
        rles: list[str] = []
        for start in range(0, len(ids), step):
            clock = time.perf_counter()
            chunk = {n: np.asarray(stored[n][start : start + step]) for n in members}
            chunk_rows, chunk_rles = encoder(
                ids[start : start + step], rule.apply(chunk, threshold)
            )
            rows += chunk_rows
            rles += chunk_rles
            timer.add("encode", clock)
        del stored
    return rows, rles, shape, threshold
