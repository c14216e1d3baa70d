"""The blend rule: the one place that turns member predictions into masks.

``ek blend --oof`` chooses a :class:`BlendRule` (integer member weights, a threshold on the
integer weighted sum of uint8 codes, min-pixel and min-component postprocessing) and saves
it in ``blend.json`` beside its scores and digests (:class:`BlendFile`). ``ek submit``, the
Kaggle notebook, ``ek pseudo``, the gallery and the holdout scores all apply it through
three steps that callers compose:

- :meth:`BlendRule.sums`: the weighted sums ``S = sum_i w_i * u_i`` of the members' codes;
- :meth:`BlendRule.threshold_for`: the integer threshold for a histogram of ``S`` (the
  stored ``threshold_sum`` in ``value`` mode; the top fraction of the histogram's pixels in
  ``top_fraction`` mode), never below the search floor ``floor_sum``;
- :meth:`BlendRule.apply`: the masks.

The float :attr:`BlendRule.threshold` is derived from ``threshold_sum``, never stored. This
module imports nothing of the search, so submission loads only it and :mod:`.verify`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import postprocess, registry
from ..errors import EkError
from ..files import write_json

RULE_VERSION = 1
MODES = ("value", "top_fraction")
THRESHOLD_SOURCES = registry.THRESHOLD_SOURCES.names  # declared once, in the registry
RERUN = "re-run `ek blend --oof`"


@dataclass(frozen=True)
class ClassRule:
    """One class's threshold and postprocessing in a rule of several classes.

    Attributes:
        name: The class name (the task's).
        threshold_sum: This class's threshold on its blend sum.
        top_fraction: As :attr:`BlendRule.top_fraction`, for this class's pixels.
        min_pixels: A record's mask of this class with fewer pixels is emptied.
        min_component: This class's connected components smaller than this are removed.
        weights: Per-class member weights; None: the rule's shared weights.
    """

    name: str
    threshold_sum: int
    top_fraction: float | None = None
    min_pixels: int = 0
    min_component: int = 0
    weights: dict[str, int] | None = None


@dataclass(frozen=True)
class BlendRule:
    """A chosen blend: member weights, threshold and postprocessing.

    With one class (contrails) codes and masks are ``(N, H, W)`` and the rule's own
    threshold and postprocessing fields apply. With several classes codes and masks are
    ``(N, C, H, W)`` and each class has its own :class:`ClassRule` in :attr:`classes` (the
    rule's scalar threshold fields are then unused and left at their defaults).

    Attributes:
        weights: Member (config) name -> positive integer weight, in blend order.
        mode: ``value`` (predict ``S >= threshold_sum``) or ``top_fraction`` (mark the top
            ``top_fraction`` of the predicted set's pixels; see :meth:`threshold_for`).
        threshold_sum: The threshold on the integer sum ``S`` chosen on OOF (or the holdout).
        top_fraction: Fraction of pixels at or above ``threshold_sum`` on the set it was
            chosen on; applied in ``top_fraction`` mode, None in ``value`` mode.
        floor: The search floor code (0-255): no threshold below ``floor * sum(w)``
            (:attr:`floor_sum`) is ever applied.
        min_pixels: A record's mask with fewer positive pixels is emptied.
        min_component: Connected components smaller than this are removed.
        threshold_from: ``oof`` or ``holdout``: where the threshold was chosen.
        classes: Per-class rules for several classes; empty for one class.
        version: The rule format's version.
    """

    weights: dict[str, int]
    mode: str = "value"
    threshold_sum: int = 0
    top_fraction: float | None = None
    floor: int = 0
    min_pixels: int = 0
    min_component: int = 0
    threshold_from: str = "oof"
    classes: tuple[ClassRule, ...] = ()
    version: int = RULE_VERSION

    def __post_init__(self) -> None:
        for weights in [self.weights] + [c.weights for c in self.classes if c.weights]:
            if not weights or any(int(w) < 1 for w in weights.values()):
                raise EkError(f"blend rule: weights {weights} must be positive integers")
        if self.mode not in MODES:
            raise EkError(f"blend rule: mode {self.mode!r} is not one of {MODES}")
        fractions = (
            [self.top_fraction] if not self.classes else [c.top_fraction for c in self.classes]
        )
        if self.mode == "top_fraction" and None in fractions:
            raise EkError("blend rule: top_fraction mode without a top_fraction")
        if not 0 <= self.floor <= 255:
            raise EkError(f"blend rule: floor {self.floor} is not a code in 0..255")

    @property
    def weight_total(self) -> int:
        """``sum(w)``: ``S`` lies in ``0 .. 255 * weight_total``."""
        return int(sum(self.weights.values()))

    @property
    def floor_sum(self) -> int:
        """The smallest threshold on ``S`` ever applied: ``floor * sum(w)``."""
        return self.floor * self.weight_total

    @property
    def threshold(self) -> float:
        """The threshold as a probability of the weighted mean: ``threshold_sum / (255 sum w)``."""
        return self.threshold_sum / (255.0 * self.weight_total)

    @property
    def members(self) -> list[str]:
        """Every member with a weight (in any class)."""
        names = dict.fromkeys(self.weights)
        for rule in self.classes:
            names.update(dict.fromkeys(rule.weights or {}))
        return list(names)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def class_rule(self, index: int) -> BlendRule:
        """The one-class rule of class ``index`` (its threshold, postprocessing, weights)."""
        own = self.classes[index]
        return replace(
            self,
            weights=dict(own.weights or self.weights),
            threshold_sum=own.threshold_sum,
            top_fraction=own.top_fraction,
            min_pixels=own.min_pixels,
            min_component=own.min_component,
            classes=(),
        )

    def sums(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        """Integer blend sums ``sum_i w_i * u_i`` of uint8 codes: int32, shaped as the codes.

        Args:
            codes: Member name -> uint8 ``(N, H, W)`` codes (``holdout.npy`` rows), or
                ``(N, C, H, W)`` with several classes; members without weight are ignored.
        """
        if self.classes:
            return np.stack(
                [self.class_rule(c).sums(_class_codes(codes, c)) for c in range(len(self.classes))],
                axis=1,
            )
        sums = None
        for name, weight in self.weights.items():
            if name not in codes:
                raise EkError(f"blend rule: member '{name}' has weight {weight} but no codes")
            member = np.asarray(codes[name])
            if member.dtype != np.uint8 or (sums is not None and member.shape != sums.shape):
                raise EkError(
                    f"{name}: expected uint8 codes shaped like the other members', "
                    f"got {member.dtype} {member.shape}"
                )
            term = member.astype(np.int32) * np.int32(weight)
            sums = term if sums is None else sums + term
        assert sums is not None  # weights is never empty (__post_init__)
        return sums

    def histogram(self, codes: dict[str, np.ndarray]) -> np.ndarray:
        """Counts of each sum value ``0 .. 255 * sum(w)``; add the histograms of every batch
        of a set to get the set's, for :meth:`threshold_for`. With several classes, one row
        per class ``(C, 255 * max sum(w) + 1)``."""
        if self.classes:
            rows = [
                self.class_rule(c).histogram(_class_codes(codes, c))
                for c in range(len(self.classes))
            ]
            return np.stack([np.pad(r, (0, max(map(len, rows)) - len(r))) for r in rows])
        size = 255 * self.weight_total + 1
        return np.bincount(self.sums(codes).ravel(), minlength=size).astype(np.int64)

    def threshold_for(self, histogram: np.ndarray | None = None):
        """The integer threshold applied to a set whose sums have this histogram.

        ``value`` mode: ``threshold_sum`` (the histogram is not needed). ``top_fraction``
        mode: the smallest threshold that marks at most ``top_fraction`` of the set's pixels.
        Either way never below :attr:`floor_sum`: the search scored no lower threshold. With
        several classes, a tuple of one threshold per class (``histogram`` ``(C, V)``).
        """
        if self.classes:
            return tuple(
                self.class_rule(c).threshold_for(None if histogram is None else histogram[c])
                for c in range(len(self.classes))
            )
        if self.mode == "value":
            return max(int(self.threshold_sum), self.floor_sum)
        if histogram is None:
            raise EkError("blend rule: top_fraction mode needs the histogram of the set")
        assert self.top_fraction is not None
        return fraction_threshold(histogram, self.top_fraction, self.floor_sum)

    def apply(self, codes: dict[str, np.ndarray], threshold_sum=None) -> np.ndarray:
        """The blend's masks: weighted sum, threshold, min-pixel, then min-component.

        Args:
            codes: Member name -> uint8 ``(N, H, W)`` codes (``(N, C, H, W)`` with several
                classes).
            threshold_sum: The threshold on ``S``; None takes it from these codes' own
                histogram (:meth:`threshold_for`), the whole-split answer when given the whole
                split. A streaming caller passes the threshold of its whole split (one per
                class with several classes). A value below :attr:`floor_sum` is raised to it.

        Returns:
            bool ``(N, H, W)``, or ``(N, C, H, W)`` with several classes.
        """
        if self.classes:
            thresholds = threshold_sum or (None,) * len(self.classes)
            return np.stack(
                [
                    self.class_rule(c).apply(_class_codes(codes, c), thresholds[c])
                    for c in range(len(self.classes))
                ],
                axis=1,
            )
        sums = self.sums(codes)
        if threshold_sum is None:
            histogram = None
            if self.mode == "top_fraction":
                histogram = np.bincount(sums.ravel(), minlength=255 * self.weight_total + 1)
            threshold_sum = self.threshold_for(histogram)
        predicted = sums >= max(int(threshold_sum), self.floor_sum)
        predicted = postprocess.apply_min_pixels(predicted, self.min_pixels)
        return postprocess.remove_small_components_batch(predicted, self.min_component)

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["weights"] = {name: int(w) for name, w in self.weights.items()}
        fields["classes"] = [asdict(c) for c in self.classes]
        return fields

    @classmethod
    def from_dict(cls, fields: Any, source: str = "blend rule") -> BlendRule:
        """A rule from its saved fields; one-line :class:`EkError` naming ``source`` otherwise."""
        if not isinstance(fields, dict):
            raise EkError(f"{source}: the rule is not a mapping; {RERUN}")
        version = fields.get("version")
        if version != RULE_VERSION:
            raise EkError(f"{source}: rule version {version!r}, this ek reads {RULE_VERSION}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise EkError(f"{source}: unknown rule field '{unknown[0]}'; {RERUN}")
        try:
            classes = tuple(ClassRule(**c) for c in fields.get("classes") or ())
            weights = {str(n): int(w) for n, w in fields["weights"].items()}
            rule = cls(**{**fields, "weights": weights, "classes": classes})
        except EkError as exc:
            raise EkError(f"{source}: {str(exc).removeprefix('blend rule: ')}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EkError(f"{source}: unreadable rule ({exc}); {RERUN}") from None
        rule.check_floor(source)
        return rule

    def check_floor(self, source: str = "blend rule") -> None:
        """Refuse a threshold below the members' floor: nothing was scored there, and sparse
        members do not even know their codes below it."""
        for one in [self] if not self.classes else map(self.class_rule, range(len(self.classes))):
            if one.threshold_sum < one.floor_sum:
                raise EkError(
                    f"{source}: threshold_sum {one.threshold_sum} lies below the members' floor "
                    f"({one.floor} x {one.weight_total} = {one.floor_sum}); {RERUN}"
                )

    @classmethod
    def load(cls, path: Path | str) -> BlendRule:
        """The rule of a ``blend.json`` (this version's, or 0.2.0's flat layout)."""
        return BlendFile.load(path).rule

    def save(self, path: Path | str, **beside: Any) -> None:
        """Write ``blend.json`` atomically: the rule, and ``beside`` sections (scores, cost,
        digests) next to it."""
        BlendFile(self, **beside).save(path)


@dataclass(frozen=True)
class BlendFile:
    """``blend.json``: the rule, and beside it what it was chosen on and how it scored."""

    rule: BlendRule
    scores: dict = field(default_factory=dict)
    cost: dict | None = None
    digests: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.to_dict(),
            "scores": self.scores,
            "cost": self.cost,
            "digests": self.digests,
        }

    def save(self, path: Path | str) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path | str) -> BlendFile:
        """Read ``blend.json``; one-line :class:`EkError` naming it when it is missing or
        unreadable."""
        path = Path(path)
        if not path.is_file():
            raise EkError(f"{path}: missing; run `ek blend --oof` first")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise EkError(f"{path}: unreadable ({type(exc).__name__}); {RERUN}") from None
        if not isinstance(data, dict):
            raise EkError(f"{path}: not a blend.json; {RERUN}")
        if "rule" not in data and "configs" in data:
            data = _from_flat_layout(data, path)
        rule = BlendRule.from_dict(data.get("rule"), source=str(path))
        return cls(rule, data.get("scores") or {}, data.get("cost"), data.get("digests") or {})


def _class_codes(codes: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """Each member's ``(N, H, W)`` codes of one class from its ``(N, C, H, W)`` codes."""
    return {name: np.asarray(member)[:, index] for name, member in codes.items()}


def _from_flat_layout(data: dict, path: Path) -> dict:
    """0.2.0's blend.json kept the rule's fields at the top level, read by string keys."""
    try:
        weights = {str(n): int(w) for n, w in data["configs"].items()}
        scores = data.get("scores") or {}
        total = sum(weights.values())
        floor = data.get("threshold_floor_sum")
        if floor is not None:
            floor = int(floor) // total
        else:
            search_floor = scores.get("search_floor")
            floor = 0 if search_floor is None else int(round(search_floor * 255))
        rule = {
            "weights": weights,
            "mode": data["threshold_mode"],
            "threshold_sum": int(data["threshold_sum"]),
            "top_fraction": data.get("top_fraction"),
            "floor": int(floor),
            "min_pixels": int(data["min_pixels"]),
            "min_component": int(data["min_component"]),
            "threshold_from": data.get("threshold_from", "oof"),
            "version": RULE_VERSION,
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        raise EkError(f"{path}: a blend.json of an older ek without its rule; {RERUN}") from None
    return {key: data.get(key) for key in ("scores", "cost", "digests")} | {"rule": rule}


def top_fraction_threshold(counts: np.ndarray, fraction: float) -> int:
    """Smallest threshold that marks at most ``fraction`` of all pixels positive.

    Args:
        counts: A 1-d histogram of blend sums (``counts[v]`` = pixels with sum ``v``), e.g.
            summed :meth:`BlendRule.histogram` over test batches; or an array of blend sums
            of any other shape, which is histogrammed first.
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
        fraction: The rule's ``top_fraction``.
        lowest: The search floor on the sum (``floor_sum``); the search scored no threshold
            below it, so none is applied.
    """
    return max(top_fraction_threshold(counts, fraction), int(lowest))
