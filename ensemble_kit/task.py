"""The task: what a competition's data, classes, metric and submission look like.

A task is YAML loaded into frozen dataclasses, like a config. Three are built in, shipped as
YAML inside the package (``ensemble_kit/tasks/*.yaml``): ``contrails`` (the default, today's
behaviour), ``steel`` (Severstal 2019) and ``folder`` (a generic image/mask layout). A task
file may start from a built-in with ``extends: NAME`` and override any key; an unknown key
is an :class:`EkError` with a did-you-mean.

``ek folds --task`` records the resolved task in ``folds/task.yaml`` (its digest in
``splits.json``); every later command reads it from there (:func:`workdir_task`). A workdir
without ``task.yaml`` is a contrails workdir, so contrails files stay exactly as before.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import (
    Config,
    InputSpec,
    LabelSpec,
    dataclass_from_dict,
    plain_data,
    read_yaml_mapping,
)
from .errors import EkError
from .files import digest_json, write_text
from .layout import Layout
from .registry import did_you_mean

TASK_VERSION = 1
BUILTIN_TASKS = ("contrails", "steel", "folder")
DEFAULT_TASK = "contrails"
KINDS = ("contrails", "images")
METRICS = ("global_dice", "mean_dice")
MASK_SOURCES = ("records", "files", "csv")
ORDERS = ("column", "row")
ROW_ORDERS = ("sample_submission", "sorted")
IMAGE_IDS = ("stem", "name")
CLASS_NAME = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class ImageFolders:
    """Where each split's images are, relative to the data folder."""

    train: str = "train/images"  # the training images (with masks)
    validation: str | None = "validation/images"  # optional holdout split; null: none
    test: str | None = "test/images"  # the images to submit for (no masks)
    id: str = "stem"  # stem (file name without extension) | name (with it, as Severstal's)


@dataclass(frozen=True)
class MaskSpec:
    """Where the masks are: per-image files, or RLE strings in a CSV."""

    source: str = "files"  # records (contrails) | files (PNG per image) | csv (RLE per row)
    train: str = "train/masks"  # a folder (files) or a CSV file (csv), relative to the data
    validation: str | None = "validation/masks"  # the holdout's masks; null: none
    id_column: str = "ImageId"  # csv: the image id column
    class_column: str | None = "ClassId"  # csv: the class id (1..C); null: one class
    rle_column: str = "EncodedPixels"  # csv: the RLE column
    order: str = "column"  # pixel order of the RLE: column (top to bottom first) | row
    index_base: int = 1  # number of the first pixel in the RLE: 1 | 0


@dataclass(frozen=True)
class SubmissionSpec:
    """The submission CSV: columns, row ids, RLE convention, row order."""

    header: tuple[str, ...] = ("id", "rle")  # the two columns: row id, RLE
    id: str = ""  # row id pattern with {image} and {class}; "": {image} (C = 1) else both
    rle_order: str = "column"  # column | row
    empty: str = ""  # how an empty mask is written
    row_order: str = "sample_submission"  # sample_submission (when present) | sorted
    sample: str | None = "sample_submission.csv"  # in the data folder; null: none


@dataclass(frozen=True)
class Task:
    """A competition's data layout, classes, metric and submission format."""

    version: int = TASK_VERSION  # the task file format: 1
    name: str = "folder"  # the task's name (recorded in splits.json)
    kind: str = "images"  # contrails (Kaggle records of bands) | images (PNG/JPG/TIFF/.npy)
    kaggle_slug: str = ""  # /kaggle/input/<slug> in the notebook
    classes: tuple[str, ...] = ("mask",)  # class names, [a-z0-9_]+; class id k is the k-th
    size: tuple[int, int] = (0, 0)  # (H, W); (0, 0): that of the first training image
    channels: int = 0  # image channels given to the model: 1 | 3; 0: the first image's
    metric: str = "global_dice"  # global_dice | mean_dice
    empty_score: float = 1.0  # mean_dice: score of a pair empty in truth and prediction
    images: ImageFolders = dataclasses.field(default_factory=ImageFolders)
    masks: MaskSpec = dataclasses.field(default_factory=MaskSpec)
    submission: SubmissionSpec = dataclasses.field(default_factory=SubmissionSpec)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def row_id(self) -> str:
        """The submission's row id pattern, ``{image}`` or ``{image}_{class}`` by default."""
        if self.submission.id:
            return self.submission.id
        return "{image}" if self.n_classes == 1 else "{image}_{class}"

    @property
    def digest(self) -> str:
        """Digest of the resolved task (what later steps check)."""
        return digest_json(task_dict(self))

    def row_ids(self, image_id: str) -> list[str]:
        """The submission row ids of one image, one per class in class order."""
        return [self.row_id.format(image=image_id, **{"class": c}) for c in self.classes]

    def save(self, path: Path | str) -> None:
        """Write the resolved task as YAML, atomically."""
        write_text(path, dump_task(self))

    @classmethod
    def load(cls, path: Path | str) -> Task:
        """Load a task file (``extends:`` a built-in allowed)."""
        return load_task(path)


def builtin_text(name: str) -> str:
    """The YAML text of a built-in task; EkError naming the built-ins for another name."""
    if name not in BUILTIN_TASKS:
        raise EkError(
            f"unknown task '{name}'{did_you_mean(name, BUILTIN_TASKS)}; "
            f"built-in tasks: {', '.join(BUILTIN_TASKS)} (or a task YAML file)"
        )
    return resources.files("ensemble_kit").joinpath(f"tasks/{name}.yaml").read_text()


def builtin_task(name: str) -> Task:
    """One of the built-in tasks by name."""
    return task_from_dict(yaml.safe_load(builtin_text(name)), source=f"task '{name}'")


def resolve_task(name_or_file: str | Path | None) -> Task:
    """A built-in task by name, or a task file by path; ``None`` is ``contrails``."""
    if name_or_file is None:
        return builtin_task(DEFAULT_TASK)
    text = str(name_or_file)
    if text in BUILTIN_TASKS or not (text.endswith((".yaml", ".yml")) or Path(text).exists()):
        return builtin_task(text)
    return load_task(text)


def load_task(path: Path | str) -> Task:
    """Load a task YAML file; ``extends: NAME`` starts from a built-in task."""
    path = Path(path)
    return task_from_dict(read_yaml_mapping(path, "task"), source=str(path))


def task_from_dict(raw: dict, source: str = "<dict>") -> Task:
    """Build a :class:`Task` from a plain dict, resolving ``extends`` and checking every key."""
    raw = dict(raw)
    if "metric" not in raw and len(raw.get("classes") or ()) > 1:
        raw["metric"] = "mean_dice"  # several classes, no metric named: the pairs' metric
    base = raw.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise EkError(f"{source}: 'extends' must name a built-in task")
        try:
            parent = yaml.safe_load(builtin_text(base))
        except EkError as err:
            raise EkError(f"{source}: 'extends': {err}") from None
        raw = _merged(parent, raw)
    task = dataclass_from_dict(Task, raw, source)
    _validate(task, source)
    return task


def _merged(base: dict, override: dict) -> dict:
    """``override`` over ``base``, mappings merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _choice(source: str, key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise EkError(
            f"{source}: '{key}' is {value!r}{did_you_mean(value, [str(a) for a in allowed])}; "
            f"choose one of {', '.join(str(a) for a in allowed)}"
        )


def _validate(task: Task, source: str) -> None:
    if task.version != TASK_VERSION:
        raise EkError(f"{source}: 'version' is {task.version}; this ek reads task version 1")
    for key, value, allowed in (
        ("kind", task.kind, KINDS),
        ("metric", task.metric, METRICS),
        ("images.id", task.images.id, IMAGE_IDS),
        ("masks.source", task.masks.source, MASK_SOURCES),
        ("masks.order", task.masks.order, ORDERS),
        ("masks.index_base", task.masks.index_base, (0, 1)),
        ("submission.rle_order", task.submission.rle_order, ORDERS),
        ("submission.row_order", task.submission.row_order, ROW_ORDERS),
    ):
        _choice(source, key, value, allowed)
    _validate_classes(task, source)
    if task.channels not in (0, 1, 3):
        raise EkError(f"{source}: 'channels' is {task.channels}; images have 1 or 3 channels")
    if any(side < 0 for side in task.size) or (0 in task.size and task.size != (0, 0)):
        raise EkError(f"{source}: 'size' must be two positive sides [H, W] (or [0, 0]: auto)")
    if (task.kind == "contrails") != (task.masks.source == "records"):
        raise EkError(f"{source}: 'masks.source' records goes with kind contrails, and only it")
    if task.metric == "global_dice" and task.n_classes > 1:
        raise EkError(
            f"{source}: 'metric' global_dice scores one class; with {task.n_classes} classes "
            "use mean_dice (mean over (image, class) pairs)"
        )
    if not 0.0 <= task.empty_score <= 1.0:
        raise EkError(f"{source}: 'empty_score' must be in [0, 1]")
    _validate_submission(task, source)


def _validate_classes(task: Task, source: str) -> None:
    if not task.classes:
        raise EkError(f"{source}: 'classes' needs at least one class name")
    for name in task.classes:
        if not isinstance(name, str) or not CLASS_NAME.fullmatch(name):
            raise EkError(
                f"{source}: class name {name!r} must match [a-z0-9_]+ (it goes into row ids)"
            )
    if len(set(task.classes)) != len(task.classes):
        raise EkError(f"{source}: 'classes' names a class twice")


def _validate_submission(task: Task, source: str) -> None:
    spec = task.submission
    if len(spec.header) != 2 or not all(spec.header):
        raise EkError(f"{source}: 'submission.header' must name two columns: row id, RLE")
    try:
        ids = task.row_ids("x")
    except (KeyError, IndexError, ValueError):
        raise EkError(
            f"{source}: 'submission.id' {spec.id!r} may use only {{image}} and {{class}}"
        ) from None
    if task.n_classes > 1 and len(set(ids)) != len(ids):
        raise EkError(f"{source}: 'submission.id' needs {{class}} with several classes")
    if any(ch in spec.empty for ch in ',"\r\n'):
        raise EkError(f"{source}: 'submission.empty' may not hold a comma, quote or line break")


def task_dict(task: Task) -> dict:
    """The complete task as plain YAML-friendly data."""
    return plain_data(dataclasses.asdict(task))


def dump_task(task: Task) -> str:
    return yaml.safe_dump(task_dict(task), sort_keys=False)


def task_path(layout: Layout) -> Path:
    """``folds/task.yaml``: the resolved task of a workdir (absent: contrails)."""
    return layout.task_yaml


def workdir_task(layout: Layout, splits_meta: dict | None = None) -> Task:
    """The task a workdir was made for; checks ``task.yaml`` against ``splits.json``.

    Args:
        layout: The workdir's layout.
        splits_meta: ``splits.json`` as read, when the caller has it (its ``task_digest``).

    Raises:
        EkError: ``task.yaml`` was edited since ``ek folds`` wrote it, or is not valid.
    """
    path = task_path(layout)
    if not path.is_file():
        return builtin_task(DEFAULT_TASK)
    task = load_task(path)
    expected = (splits_meta or {}).get("task_digest")
    if expected is not None and expected != task.digest:
        raise EkError(f"{path}: changed since `ek folds` wrote it; restore it or start over")
    return task


def check_config_fits(config: Config, task: Task, source: str) -> None:
    """EkError, one line, when a config's inputs or labels need data the task does not have.

    Ash false colour, bands and frames need contrail records; ``input.channels: image`` needs
    an image task; soft labels, the label shift and pseudo-labels are contrail features.
    """
    spec, default = config.input, InputSpec()
    if task.kind == "contrails" and spec.channels == "image":
        raise EkError(
            f"{source}: 'input.channels' is image, but task {task.name} has contrail records "
            "(use ash or bands)"
        )
    if task.kind == "contrails":
        return
    if spec.channels != "image":
        raise EkError(
            f"{source}: 'input.channels' is {spec.channels}, which needs contrail records; "
            f"task {task.name} has images (use input.channels: image)"
        )
    if spec.frames != default.frames:
        raise EkError(f"{source}: 'input.frames' needs contrail records; task {task.name} has none")
    label, plain = config.label, LabelSpec()
    for key in ("soft", "shift_correct", "pseudo"):
        if getattr(label, key) != getattr(plain, key):
            raise EkError(
                f"{source}: 'label.{key}' is a contrail feature; task {task.name} has images"
            )


def model_channels(config: Config, task: Task) -> tuple[int, int]:
    """``(input, output)`` channels of a config's model on a task.

    Inputs: the config's contrail channels times its frames, or the task's image channels
    (``input.channels: image``). Outputs: one per class (multilabel sigmoid).
    """
    if config.input.channels == "image":
        if not task.channels:
            raise EkError(f"task {task.name}: channels unknown until `ek folds` reads the data")
        return task.channels, task.n_classes
    return config.input.in_channels, task.n_classes
