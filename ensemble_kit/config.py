"""YAML configs loaded into frozen dataclasses.

Every key has a default; an unknown or mistyped key is an :class:`EkError` that names the
key and the file. ``resolved_dict`` gives back the complete config (what is saved beside
every output) and ``config_digest`` its digest.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import EkError
from .files import digest_json
from .names import check_name
from .registry import (
    AMP_MODES,
    CHANNELS,
    LOSSES,
    NORMALIZATIONS,
    OPTIMIZERS,
    SCHEDULES,
    TEMPORAL,
    TTA_MERGES,
    TTA_NAMES,
    Registry,
    did_you_mean,
)
from .sparse_oof import FORMATS as OOF_FORMATS

ALL_BANDS = (8, 9, 10, 11, 12, 13, 14, 15, 16)


@dataclass(frozen=True)
class InputSpec:
    """Which channels a model sees. ``frames`` are 0-based indices (4 is the labelled frame)."""

    channels: str = "ash"  # ash | bands (contrail records) | image (the task's image channels)
    bands: tuple[int, ...] = ALL_BANDS
    normalize: str = "meanstd"  # meanstd | minmax (bands only; ash is already in [0, 1])
    frames: tuple[int, ...] = (4,)

    @property
    def channels_per_frame(self) -> int:
        """Channels of one frame (``image``: 3 here; the task's channel count decides)."""
        return 3 if self.channels in ("ash", "image") else len(self.bands)

    @property
    def in_channels(self) -> int:
        return self.channels_per_frame * len(self.frames)


@dataclass(frozen=True)
class LabelSpec:
    soft: bool = False  # mean of the individual masks where they exist
    smoothing: float = 0.0  # y -> y * (1 - s) + s / 2
    shift_correct: bool = False  # undo the +0.5 px label offset so flips are exact
    pseudo: str | None = None  # `ek pseudo --out NAME`: train on its pseudo-labelled frames too
    pseudo_weight: float = 0.5  # weight of a pseudo-labelled sample's loss
    pseudo_fraction: float = 0.5  # share of each batch drawn from pseudo-labelled frames


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "Unet"
    encoder: str = "tu-test_resnet"
    encoder_weights: str | None = None  # imagenet | None
    upsample: float = 1.0  # input scale factor; output is brought back to label size
    upsample_size: int | None = None  # or an absolute input size (overrides upsample)
    temporal: str = "none"  # none (frames as channels) | mix (encoder per frame, mixed)
    decoder: dict = field(default_factory=dict)  # extra kwargs for the smp architecture


@dataclass(frozen=True)
class LossTerm:
    name: str = "dice"  # dice | bce | focal | logcosh_dice | lovasz
    weight: float = 1.0


@dataclass(frozen=True)
class OptimSpec:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only


@dataclass(frozen=True)
class ScheduleSpec:
    name: str = "cosine"  # none | cosine | onecycle
    warmup_iters: int = 0  # linear warm-up, in optimiser steps
    min_lr: float = 0.0


@dataclass(frozen=True)
class AugmentSpec:
    """Probabilities of each augmentation (0 disables it); applied on tensors."""

    hflip: float = 0.0
    vflip: float = 0.0
    rot90: float = 0.0
    crop: float | tuple[int, int] = 0.0  # probability of a random resized crop; or [h, w]
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_masked: float = 0.0  # crop: [h, w]: share of crops centred on a masked pixel
    cutout: float = 0.0
    cutout_holes: int = 4
    cutout_size: float = 0.125  # fraction of the side
    cutmix: float = 0.0
    mixup: float = 0.0
    mixup_alpha: float = 0.4


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = 10
    batch_size: int = 16
    accumulate: int = 1
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | none | bf16 | fp16
    channels_last: str | bool = "auto"  # auto: on CUDA only
    compile: bool = False  # torch.compile(mode="reduce-overhead")
    clip_grad: float = 0.0
    ema: float = 0.0  # EMA decay of the weights; 0 disables
    early_stop: int = 0  # patience in epochs on validation dice; 0 disables
    seed: int = 0
    num_workers: int = 0
    max_steps_per_epoch: int = 0  # 0: the whole fold
    average_top_k: int = 0  # best.pt = weight average of the K best epochs; 0 (or 1): off
    seeds: tuple[int, ...] = ()  # one member `<name>-s<seed>` per seed; () = just train.seed


@dataclass(frozen=True)
class OofSpec:
    """How ``ek cv`` stores OOF and holdout codes (storage only: not in the config digest)."""

    format: str = "auto"  # auto (sparse past 4 GB of dense OOF per config) | dense | sparse
    floor: int = 13  # sparse: codes below this uint8 code (p = 0.05) are not stored


@dataclass(frozen=True)
class Config:
    name: str = "config"
    input: InputSpec = field(default_factory=InputSpec)
    label: LabelSpec = field(default_factory=LabelSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    loss: tuple[LossTerm, ...] = (LossTerm("dice", 1.0), LossTerm("bce", 1.0))
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    tta: tuple[str, ...] = ("identity",)
    tta_merge: str = "mean"  # mean of probabilities | logit (mean of logits)
    tta_chunk: int = 0  # flipped copies per forward pass; 0 picks by model size
    oof: OofSpec = field(default_factory=OofSpec)


CHOICES: dict[tuple[str, ...], Registry] = {
    ("input", "channels"): CHANNELS,
    ("input", "normalize"): NORMALIZATIONS,
    ("model", "temporal"): TEMPORAL,
    ("loss", "name"): LOSSES,
    ("optim", "name"): OPTIMIZERS,
    ("schedule", "name"): SCHEDULES,
    ("train", "amp"): AMP_MODES,
    ("tta_merge",): TTA_MERGES,
}


# (low, high, bounds): the allowed range of each numeric key; "[]" closed, "[)" high open...
RANGES: dict[tuple[str, ...], tuple[float, float, str]] = {
    ("train", "epochs"): (1, math.inf, "[]"),
    ("train", "batch_size"): (1, math.inf, "[]"),
    ("train", "accumulate"): (1, math.inf, "[]"),
    ("train", "clip_grad"): (0, math.inf, "[]"),
    ("train", "ema"): (0, 1, "[)"),
    ("train", "early_stop"): (0, math.inf, "[]"),
    ("train", "num_workers"): (0, math.inf, "[]"),
    ("train", "max_steps_per_epoch"): (0, math.inf, "[]"),
    ("optim", "lr"): (0, math.inf, "(]"),
    ("optim", "weight_decay"): (0, math.inf, "[]"),
    ("optim", "momentum"): (0, 1, "[)"),
    ("schedule", "warmup_iters"): (0, math.inf, "[]"),
    ("schedule", "min_lr"): (0, math.inf, "[]"),
    ("label", "smoothing"): (0, 1, "[)"),
    ("label", "pseudo_weight"): (0, math.inf, "[]"),
    ("label", "pseudo_fraction"): (0, 1, "[)"),
    ("model", "upsample"): (0, math.inf, "(]"),
    ("loss", "weight"): (0, math.inf, "[]"),
    ("tta_chunk",): (0, math.inf, "[]"),
    **{("augment", p): (0, 1, "[]") for p in ("hflip", "vflip", "rot90", "cutout")},
    ("augment", "crop_masked"): (0, 1, "[]"),
    **{("augment", p): (0, 1, "[]") for p in ("cutmix", "mixup")},
}


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The mapping a YAML file holds (empty file: ``{}``); one-line EkErrors naming the file
    for a missing file, invalid YAML or anything but a mapping. ``what``: ``config``,
    ``task``."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise EkError(f"{path}: {what} file not found") from None
    except yaml.YAMLError as err:
        raise EkError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise EkError(f"{path}: a {what} must be a mapping of keys")
    return raw


def load_config(path: Path | str) -> Config:
    """Load a YAML config file; the config's name defaults to the file's stem."""
    path = Path(path)
    raw = read_yaml_mapping(path, "config")
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Build a :class:`Config` from a plain dict, validating every key and choice."""
    config = _build(Config, raw, source, prefix="")
    _validate(config, source)
    return config


def resolved_dict(config: Config) -> dict:
    """The complete config as plain YAML-friendly data (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def config_digest(config: Config) -> str:
    """Digest of everything in the config but its name."""
    data = resolved_dict(config)
    data.pop("name")
    data.pop("oof")  # how OOF is stored changes no prediction
    return digest_json(data)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(resolved_dict(config), sort_keys=False)


def dataclass_from_dict(cls: Any, raw: Any, source: str, prefix: str = "") -> Any:
    """Build any frozen dataclass from a plain dict with the config's checks.

    An unknown key is an :class:`EkError` naming it (with a did-you-mean), values are
    coerced to the field types. :mod:`ensemble_kit.task` builds tasks with it.
    """
    return _build(cls, raw, source, prefix)


def plain_data(value: Any) -> Any:
    """``value`` with tuples turned into lists, for YAML or JSON."""
    return _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _build(cls: Any, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise EkError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise EkError(f"{source}: unknown key '{prefix}{key}'{did_you_mean(key, names)}")
        values[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    return cls(**values)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, prefix=f"{key}.")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            value = [value]
        item = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, v, source, key) for v in value)
        if len(value) != len(args):
            raise EkError(f"{source}: '{key}' must be a list of {len(args)} values")
        return tuple(_coerce(a, v, source, key) for a, v in zip(args, value))
    if hint == (str | bool):  # train.channels_last: true, false or auto
        if not (isinstance(value, bool) or value == "auto"):
            raise EkError(f"{source}: '{key}' must be true, false or auto, got {value!r}")
        return value
    if hint == (float | tuple[int, int]):  # augment.crop: a probability, or [h, w]
        if isinstance(value, list | tuple):
            return _coerce(tuple[int, int], value, source, key)
        return _number(float, value, source, key)
    if hint == (int | None) and value is not None:
        return _number(int, value, source, key)
    if hint is float:
        return _number(float, value, source, key)
    if hint is int:
        return _number(int, value, source, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise EkError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if hint is dict and not isinstance(value, dict):
        raise EkError(f"{source}: '{key}' must be a mapping")
    if hint == (str | None) and isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    return value


def _number(kind: type, value: Any, source: str, key: str) -> Any:
    if isinstance(value, bool):
        raise EkError(f"{source}: '{key}' must be a number, got {value!r}")
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise EkError(f"{source}: '{key}' must be a number, got {value!r}") from None
    if kind is int and float(value) != number:
        raise EkError(f"{source}: '{key}' must be a whole number, got {value!r}")
    if not math.isfinite(number):
        raise EkError(f"{source}: '{key}' must be a finite number, got {value!r}")
    return number


def _validate(config: Config, source: str) -> None:
    check_name(config.name, f"{source}: 'name'")
    _validate_ranges(config, source)
    for path, allowed in CHOICES.items():
        for value in _values_at(config, path):
            if value not in allowed:
                raise EkError(
                    f"{source}: '{'.'.join(path)}' is {value!r}"
                    f"{did_you_mean(value, allowed.names)}; "
                    f"choose one of {', '.join(allowed.names)}"
                )
    for name in config.tta:
        if name not in TTA_NAMES + ("d4",):
            raise EkError(
                f"{source}: unknown tta '{name}'{did_you_mean(name, TTA_NAMES)}; "
                f"choose from {', '.join(TTA_NAMES)} or d4"
            )
    for frame in config.input.frames:
        if not 0 <= frame <= 7:
            raise EkError(f"{source}: 'input.frames' has {frame}; frames are 0..7 (4 is labelled)")
    for band in config.input.bands:
        if band not in ALL_BANDS:
            raise EkError(f"{source}: 'input.bands' has {band}; bands are 8..16")
    if config.oof.format not in OOF_FORMATS:
        raise EkError(
            f"{source}: 'oof.format' is {config.oof.format!r}; choose one of "
            f"{', '.join(OOF_FORMATS)}"
        )
    if not 1 <= config.oof.floor <= 255:
        raise EkError(f"{source}: 'oof.floor' is {config.oof.floor}; a uint8 code in 1..255")
    if not config.loss:
        raise EkError(f"{source}: 'loss' needs at least one term")
    _validate_winners(config, source)


def _validate_ranges(config: Config, source: str) -> None:
    for path, (low, high, bounds) in RANGES.items():
        for value in _values_at(config, path):
            above = value > low if bounds[0] == "(" else value >= low
            below = value < high if bounds[1] == ")" else value <= high
            if not (above and below):
                shown = f"{bounds[0]}{low}, {'inf' if math.isinf(high) else high}{bounds[1]}"
                raise EkError(f"{source}: '{'.'.join(path)}' is {value!r}; it must be in {shown}")
    if config.model.upsample_size is not None and config.model.upsample_size < 1:
        raise EkError(f"{source}: 'model.upsample_size' must be at least 1")
    crop = config.augment.crop
    if isinstance(crop, tuple) and min(crop) < 1:
        raise EkError(f"{source}: 'augment.crop' [h, w] needs sides of at least 1, got {crop}")
    if not isinstance(crop, tuple) and not 0 <= crop <= 1:
        raise EkError(f"{source}: 'augment.crop' is {crop!r}; a probability in [0, 1] or [h, w]")
    if not config.input.frames:
        raise EkError(f"{source}: 'input.frames' needs at least one frame")
    if not config.input.bands:
        raise EkError(f"{source}: 'input.bands' needs at least one band")


def _validate_winners(config: Config, source: str) -> None:
    train = config.train
    if train.average_top_k < 0:
        raise EkError(f"{source}: 'train.average_top_k' must be 0 (off) or positive")
    if len(set(train.seeds)) != len(train.seeds):
        raise EkError(f"{source}: 'train.seeds' has a seed twice")


def _values_at(config: Config, path: tuple[str, ...]) -> list[Any]:
    node: Any = getattr(config, path[0])
    if len(path) == 1:
        return [node]
    items = node if isinstance(node, tuple) else (node,)
    return [getattr(item, path[1]) for item in items]


def seed_members(config: Config) -> list[Config]:
    """The members a config trains: itself, or one ``<name>-s<seed>`` per ``train.seeds``.

    Each member is the config with ``train.seed`` set and ``train.seeds`` emptied, so it is an
    ordinary config that shares the caches and splits of the others.
    """
    if not config.train.seeds:
        return [config]
    return [
        dataclasses.replace(
            config,
            name=f"{config.name}-s{seed}",
            train=dataclasses.replace(config.train, seed=seed, seeds=()),
        )
        for seed in config.train.seeds
    ]


def tta_list(config: Config) -> tuple[str, ...]:
    """The config's TTA names with ``d4`` expanded to all eight dihedral transforms."""
    names: list[str] = []
    for name in config.tta:
        for expanded in TTA_NAMES if name == "d4" else (name,):
            if expanded not in names:
                names.append(expanded)
    return tuple(names)
