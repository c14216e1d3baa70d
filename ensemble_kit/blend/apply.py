"""Apply a chosen blend (``blend.json``) to probabilities, and check that it is not stale.

The one code path that ``ek submit`` also uses, :func:`top_fraction_threshold` included (the
nested search applies it to each held-out fold the same way). One rule holds everywhere: no
threshold below the search floor (``threshold_floor_sum``) is ever applied; a top fraction that
reaches below it is raised to it, in the nested estimate, on the holdout and at submission
(:func:`fraction_threshold`, and :func:`apply_blend` itself). It imports nothing of the
search, so submission loads only this module of the package.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import postprocess
from ..errors import EkError
from ..files import digest_file, digest_json


def blend_sums(blend: dict, probs: dict[str, np.ndarray]) -> np.ndarray:
    """Integer blend sum ``sum_i w_i * u_i`` of uint8 ``(B, H, W)`` codes: int32 ``(B, H, W)``."""
    sums = None
    for name, weight in blend["configs"].items():
        if name not in probs:
            raise EkError(
                f"blend.json: config '{name}' has weight {weight} but no probabilities were given"
            )
        codes = np.asarray(probs[name])
        if codes.dtype != np.uint8 or (sums is not None and codes.shape != sums.shape):
            raise EkError(
                f"{name}: expected uint8 codes shaped like the others, "
                f"got {codes.dtype} {codes.shape}"
            )
        term = codes.astype(np.int32) * np.int32(weight)
        sums = term if sums is None else sums + term
    if sums is None:
        raise EkError("blend.json: no config has a non-zero weight")
    return sums


def blend_histogram(blend: dict, probs: dict[str, np.ndarray]) -> np.ndarray:
    """Counts of each blend sum value ``0..255 * sum(w)``, for :func:`top_fraction_threshold`.

    Sum the histograms of every batch of a test set before taking the threshold.
    """
    size = 255 * sum(blend["configs"].values()) + 1
    return np.bincount(blend_sums(blend, probs).ravel(), minlength=size).astype(np.int64)


def apply_blend(
    blend: dict, probs: dict[str, np.ndarray], threshold_sum: int | None = None
) -> np.ndarray:
    """The blend's binary masks: weighted sum, threshold, min-pixel, min-component.

    Args:
        blend: The ``blend.json`` dict.
        probs: uint8 ``(B, H, W)`` codes per config name (every weighted config).
        threshold_sum: Threshold on the integer sum; default ``blend["threshold_sum"]``. In
            ``top_fraction`` mode pass the threshold of the whole set being predicted
            (:func:`top_fraction_threshold` of the summed :func:`blend_histogram`).

    Returns:
        bool ``(B, H, W)``. A threshold below the search floor (:func:`floor_sum`) is raised
        to it.
    """
    threshold = blend["threshold_sum"] if threshold_sum is None else int(threshold_sum)
    threshold = max(threshold, floor_sum(blend))
    predicted = blend_sums(blend, probs) >= threshold
    predicted = postprocess.apply_min_pixels(predicted, int(blend["min_pixels"]))
    return postprocess.remove_small_components_batch(predicted, int(blend["min_component"]))


def top_fraction_threshold(counts: np.ndarray, fraction: float) -> int:
    """Smallest threshold that marks at most ``fraction`` of all pixels positive.

    Args:
        counts: A 1-d histogram of blend sums (``counts[v]`` = pixels with sum ``v``), e.g.
            summed :func:`blend_histogram` over test batches; or an array of blend sums of
            any other shape, which is histogrammed first.
        fraction: Fraction of all pixels to mark, e.g. 0.0016.

    Returns:
        ``t`` such that ``count(S >= t) <= fraction * total`` and ``t`` is the smallest such
        value; ``len(counts)`` (predict nothing) when even the largest value is too many.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1:
        counts = np.bincount(counts.ravel().astype(np.int64))
    at_or_above = np.append(np.cumsum(counts[::-1])[::-1], 0)
    limit = np.floor(fraction * at_or_above[0] + 1e-6)
    return int(np.argmax(at_or_above <= limit))


def fraction_threshold(counts: np.ndarray, fraction: float, lowest: int) -> int:
    """The threshold ``top_fraction`` mode applies to a set: never below ``lowest``.

    Args:
        counts: Histogram of the set's blend sums (see :func:`top_fraction_threshold`).
        fraction: The blend's ``top_fraction``.
        lowest: The search floor on the sum (:func:`floor_sum`); the search scored no
            threshold below it, so none is applied.
    """
    return max(top_fraction_threshold(counts, fraction), int(lowest))


def floor_sum(blend: dict) -> int:
    """The smallest ``threshold_sum`` the blend applies: the search floor code x ``sum(w)``.

    Read from ``threshold_floor_sum``; a blend.json written before that field derives it
    from ``scores.search_floor`` (0 when neither is there).
    """
    if "threshold_floor_sum" in blend:
        return int(blend["threshold_floor_sum"])
    floor = blend.get("scores", {}).get("search_floor")
    return 0 if floor is None else int(round(floor * 255)) * int(sum(blend["configs"].values()))


def verify_blend(layout) -> dict:
    """Load ``blend.json`` and check that no OOF it was chosen on changed since.

    Raises:
        EkError: blend.json is missing or unreadable, or an OOF/holdout file or the splits
            changed ("stale blend.json").
    """
    path = layout.blend_json
    if not path.is_file():
        raise EkError(f"{path}: missing; run `ek blend --oof` first")
    try:
        blend = json.loads(path.read_text())
        digests = blend["digests"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise EkError(f"{path}: unreadable or without digests; rerun ek blend --oof") from None
    files = [(layout.oof_npy(n), d) for n, d in digests.get("oof", {}).items()]
    files += [(layout.holdout_npy(n), d) for n, d in digests.get("holdout", {}).items()]
    for name in digests.get("oof", {}):
        summary = layout.summary(name)
        if not summary.is_file() or _splits_digest(summary) != digests.get("splits"):
            _stale(summary)
        if (
            name in digests.get("sources", {})
            and _sources_digest(summary) != digests["sources"][name]
        ):
            _stale(summary)  # re-assembled from changed data files (e.g. holdout labels)
    for file, digest in files:
        if not file.is_file() or _digest(file) != digest:
            _stale(file)
    return blend


def _stale(file: Path) -> None:
    raise EkError(f"stale blend.json: {file} changed since `ek blend`; rerun ek blend --oof")


def _splits_digest(summary: Path) -> str | None:
    try:
        return json.loads(summary.read_text()).get("splits_digest")
    except json.JSONDecodeError:
        return None


def _sources_digest(summary: Path) -> str | None:
    try:
        return digest_json(json.loads(summary.read_text()).get("sources"))
    except json.JSONDecodeError:
        return None


def _digest(path: Path) -> str:
    return digest_file(path)
