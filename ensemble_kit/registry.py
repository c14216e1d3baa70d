"""Every named choice, defined once: the names a config may use and what implements each.

Names live here, at the bottom of the package, so :mod:`ensemble_kit.config` validates
against them without importing torch; the modules that implement a choice register
against the same :class:`Registry` (as timm's ``_registry.py`` keeps names apart from the
models they create), and a test checks that every name has its implementation.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .errors import EkError

TTA_NAMES = (
    "identity",
    "hflip",
    "vflip",
    "hvflip",
    "transpose",
    "rot90",
    "rot270",
    "antitranspose",
)


def did_you_mean(name: object, choices: Iterable[str], n: int = 3) -> str:
    """`` (did you mean a, b?)`` for the closest of ``choices`` (case-insensitive), or ``''``."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else ""


class Registry:
    """The names of one choice and, once registered, the object behind each name.

    Example:
        >>> OPTIMIZERS = Registry("optim.name", ("adam", "sgd"))
        >>> @OPTIMIZERS.register("adam")
        ... def adam(spec, params): ...
        >>> OPTIMIZERS.get("adma")  # EkError: unknown optim.name 'adma' (did you mean adam?)
    """

    def __init__(self, kind: str, names: Sequence[str]):
        self.kind = kind
        self.names = tuple(names)
        self._items: dict[str, Any] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: ``obj`` implements ``name``, which must be one of the declared names."""
        if name not in self.names:
            raise ValueError(
                f"{self.kind}: '{name}' is not a declared name ({', '.join(self.names)})"
            )

        def add(obj: Any) -> Any:
            self._items[name] = obj
            return obj

        return add

    def check(self, name: object, where: str = "") -> str:
        """``name`` itself, or an :class:`EkError` naming ``where``, the choices and the closest."""
        if name not in self.names:
            prefix = f"{where}: " if where else ""
            raise EkError(
                f"{prefix}unknown {self.kind} '{name}'{did_you_mean(name, self.names)}; "
                f"choose one of {', '.join(self.names)}"
            )
        return str(name)

    def get(self, name: str) -> Any:
        """What implements ``name``."""
        return self._items[self.check(name)]

    __getitem__ = get

    def missing(self) -> tuple[str, ...]:
        """Declared names that nothing registered (a test keeps this empty)."""
        return tuple(name for name in self.names if name not in self._items)


CHANNELS = Registry("input.channels", ("ash", "bands", "image"))
NORMALIZATIONS = Registry("input.normalize", ("meanstd", "minmax"))
TEMPORAL = Registry("model.temporal", ("none", "mix"))
LOSSES = Registry("loss", ("dice", "bce", "focal", "logcosh_dice", "lovasz"))
OPTIMIZERS = Registry("optim.name", ("adam", "adamw", "sgd"))
SCHEDULES = Registry("schedule.name", ("none", "cosine", "onecycle"))
AMP_MODES = Registry("amp", ("auto", "none", "bf16", "fp16"))
TTA = Registry("tta", TTA_NAMES)
TTA_MERGES = Registry("tta_merge", ("mean", "logit"))
BACKENDS = Registry("backend", ("local", "ray"))
THRESHOLD_SOURCES = Registry("threshold source", ("oof", "holdout"))
EXPORT_FORMATS = Registry("export format", ("torchscript", "onnx"))
