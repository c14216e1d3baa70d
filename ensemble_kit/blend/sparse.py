"""Blending members stored sparse (:mod:`~ensemble_kit.sparse_oof`): the members' floor rule.

A sparse file does not know a member's codes below its floor, so the blend sum cannot be
exact there. The rule: when any member of a blend is sparse, every member's codes below
that floor (the highest of the sparse members' floors) count as 0, dense members included;
the search never goes below it. All-dense blends are untouched.

The candidate pass then needs only the rows where some member stores a pixel: a row where
every (sparse) member is empty adds its pixels and positives to the code-0 counts and no
candidate (:func:`active_rows`, :func:`expand`). Only those rows are ever made dense, a
chunk at a time.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from ..errors import EkError
from ..sparse_oof import FlooredCodes, SparseCodes

log = logging.getLogger(__name__)


def members_floor(members: list) -> int:
    """The highest floor of the sparse members (0 when every member is dense)."""
    return max((m.floor for m in members if isinstance(m, SparseCodes)), default=0)


def floored(members: list) -> list:
    """The members with the floor rule applied: dense ones read as :class:`FlooredCodes`
    when any member is sparse (unchanged when none is)."""
    floor = members_floor(members)
    if not floor:
        return list(members)
    return [
        m if isinstance(m, SparseCodes | FlooredCodes) else FlooredCodes(m, floor) for m in members
    ]


def floor_pool(pool: list) -> list:
    """:class:`~ensemble_kit.oof.OofSet` s with :func:`floored` OOF and holdout codes."""
    floor = members_floor([o.probs for o in pool])
    if not floor:
        return pool
    log.info("blend: sparse OOF (floor %d = p %.3f): codes below it count as 0", floor, floor / 255)
    probs = floored([o.probs for o in pool])
    holdouts = [o.holdout for o in pool]
    if all(h is not None for h in holdouts):
        holdouts = floored(holdouts)
    return [dataclasses.replace(o, probs=p, holdout=h) for o, p, h in zip(pool, probs, holdouts)]


def class_of(codes: Any, c: int) -> Any:
    """Class ``c`` of ``(N, C, H, W)`` codes (dense, sparse or floored) as ``(N, H, W)``,
    without making a sparse file dense."""
    if isinstance(codes, SparseCodes):
        return codes.class_view(c)
    if isinstance(codes, FlooredCodes):
        return FlooredCodes(codes.array[:, c], codes.floor)
    return codes[:, c]


def check_rule_floor(blend: dict, floor: int, source: str) -> None:
    """Refuse a stored rule whose threshold lies below the members' floor (one line).

    Args:
        blend: The ``blend.json`` dict (``configs`` weights, ``threshold_sum``).
        floor: :func:`members_floor` of the members it is applied to.
        source: What to name in the error (the blend.json path).
    """
    lowest = floor * int(sum(blend["configs"].values()))
    if floor and int(blend["threshold_sum"]) < lowest:
        raise EkError(
            f"{source}: threshold_sum {blend['threshold_sum']} lies below the members' floor "
            f"(code {floor} x weights = {lowest}); sparse OOF does not know codes below it"
        )


class Rows:
    """Rows ``rows`` of an array (dense, sparse or floored), read like an array."""

    def __init__(self, array: Any, rows: np.ndarray):
        self.array, self.rows = array, rows
        self.shape = (len(rows), *array.shape[1:])
        self.dtype, self.ndim = np.dtype(np.uint8), len(self.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self.array[self.rows[key]])


def active_rows(members: list) -> np.ndarray | None:
    """Rows where some member stores a pixel; None when a dense member makes every row
    count."""
    if not all(isinstance(m, SparseCodes) for m in members):
        return None
    active = np.zeros(len(members[0]), dtype=bool)
    for member in members:
        active |= member.row_counts() > 0
    if not active.any():
        active[0] = True  # keep one (all-zero) row so the chunked pass has something to read
    return active


def inactive_positives(members: list, labels: Any, inactive: np.ndarray) -> np.ndarray:
    """Labelled positives of each inactive row: the files' ``below_positives`` when known
    (nothing is stored there, so they are all of them), else counted from ``labels``."""
    rows = np.flatnonzero(inactive)
    known = members[0].below_positives.reshape(len(members[0]), -1)[rows]
    if len(rows) == 0 or (known >= 0).all():
        return known.sum(axis=1).astype(np.int64)
    if isinstance(labels, SparseCodes):
        return labels.row_counts()[rows].astype(np.int64)
    counts = np.empty(len(rows), dtype=np.int64)
    for lo in range(0, len(rows), 256):
        chunk = np.asarray(labels[rows[lo : lo + 256]])
        counts[lo : lo + 256] = np.count_nonzero(chunk.reshape(len(chunk), -1), axis=1)
    return counts


def expand(cands, active: np.ndarray, folds: np.ndarray, positives: np.ndarray):
    """Candidates built on the active rows, back on every row (inactive rows: no candidate,
    their pixels and ``positives`` in the code-0 counts)."""
    counts = np.zeros(len(active), dtype=np.int64)
    counts[active] = np.diff(cands.image_start)
    image_positives = np.zeros(len(active), dtype=np.int64)
    image_positives[active] = cands.image_positives
    image_positives[~active] = positives
    n_folds = cands.config_histograms.shape[1]
    hist = cands.config_histograms.copy()
    pixels = cands.shape[0] * cands.shape[1]
    rows = np.bincount(folds[~active], minlength=n_folds)
    lost = np.bincount(folds[~active], positives, minlength=n_folds).astype(np.int64)
    hist[:, :, 0, 1] += lost
    hist[:, :, 0, 0] += rows * pixels - lost
    return dataclasses.replace(
        cands,
        image_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        folds=folds,
        fold_positives=np.bincount(folds, image_positives, n_folds).astype(np.int64),
        fold_pixels=np.bincount(folds, minlength=n_folds) * pixels,
        config_histograms=hist,
        image_positives=image_positives,
    )
