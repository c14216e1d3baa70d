"""``ek kaggle``: the blended fold models as one Kaggle dataset with an offline notebook.

The folder (default ``submissions/kaggle/``) is uploaded with ``kaggle datasets create -p
DIR`` and attached to a notebook with the competition data; the notebook runs with the
internet off on Kaggle's image. It holds:

- ``dataset-metadata.json``: the Kaggle API's ``title``, ``id`` (``<user>/<slug>``, the user
  a placeholder to replace) and ``licenses``;
- the ``ek export`` bundle: ``<config>.fold_<k>.pt`` for every config with a blend weight
  (parity-checked against the eager models), ``manifest.json`` and ``blend.json``;
- ``ensemble_kit-<version>-py3-none-any.whl`` (:mod:`.wheel`, built without network);
- ``inference.ipynb`` (:mod:`.notebook`) and ``README.md``.

Then it measures the bundle on this machine by running the notebook's own code path
(:func:`.bundle.predict_bundle`) on a few records of the training data folder, and reports
records/s and the projected time for 2,000 records (about the hidden test set).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..blend.verify import verify_blend
from ..data.images import image_files, list_images, split_folder
from ..data.records import list_records
from ..data.splits import read_meta
from ..errors import EkError
from ..files import write_json, write_text
from ..layout import DEFAULT_KAGGLE_DIR, Layout, bundle_files
from ..task import Task, workdir_task
from .bundle import TORCH_MIN, predict_bundle
from .export import write_bundle
from .notebook import notebook_json
from .staged import staged_folder
from .wheel import build_wheel

log = logging.getLogger(__name__)
PLACEHOLDER_USER = "KAGGLE_USERNAME"
DEFAULT_SLUG = "contrails-ensemble-kit"
DEFAULT_TITLE = "Contrails ensemble (ensemble-kit)"
LICENSE = "CC0-1.0"
SLUG = re.compile(r"[a-z0-9][a-z0-9-]{4,48}[a-z0-9]")  # Kaggle: 6-50 characters
MEASURE_RECORDS = 16
WARMUP_RECORDS = 2
README = """# {title}

Written by `ek kaggle` (ensemble-kit {version}): {configs} config(s) x {folds} folds,
{models} TorchScript models. A Kaggle dataset for the code competition, whose notebook runs
with the internet off.

## Upload, attach, run

1. In `dataset-metadata.json`, replace `{user}` in `"id"` with your Kaggle user name
   (the `username` in `~/.kaggle/kaggle.json`, from kaggle.com > Settings > Create New Token).
2. `kaggle datasets create -p .` in this folder (private by default; later versions:
   `kaggle datasets version -p . -m "new models"`).
3. On the competition page, New Notebook; File > Import Notebook: `inference.ipynb`.
   Add Input: the competition data and this dataset (`{slug}`). Settings: Internet off.
4. Run all, then Submit. The notebook writes `/kaggle/working/submission.csv` and prints
   records/s and the projected time for 2,000 records (the limit is 9 hours).

## Files

| file | what |
|---|---|
| `dataset-metadata.json` | title, id (`<user>/{slug}`), licence, for `kaggle datasets` |
| `<config>.fold_<k>.pt` | traced fold models, checked against the eager models |
| `manifest.json` | resolved configs, band statistics, parity, wheel and version |
| `blend.json` | weights, threshold and postprocessing chosen by `ek blend` |
| `{wheel}` | ensemble-kit, installed offline with `pip install --no-index --no-deps --target` |
| `inference.ipynb` | the notebook; its first cell holds the paths (env: `EK_DATA`, ...) |
"""


@dataclass(frozen=True)
class KaggleRequest:
    """What ``ek kaggle`` was asked to do."""

    layout: Layout
    out: Path = DEFAULT_KAGGLE_DIR
    slug: str = DEFAULT_SLUG
    title: str = DEFAULT_TITLE
    device: str | None = None


def build_kaggle_bundle(request: KaggleRequest) -> dict:
    """Write the Kaggle dataset folder and measure it; returns what was written and measured.

    Returns:
        ``{"out", "manifest", "wheel", "measured"}``; ``measured`` is a
        :func:`.bundle.predict_bundle` result, or ``{"skipped": reason}``.

    The folder is built staged and swapped in whole (:mod:`.staged`): a failure or a full
    disk (one line) leaves an earlier folder as it was, with no ``.tmp`` files in it.

    Raises:
        EkError: bad slug or title, ``out`` holds something else, ``blend.json`` missing or
            stale, a model fails its parity check, the disk is full.
    """
    _check_names(request.slug, request.title)
    out = Path(request.out)
    _check_out(out)
    rule = verify_blend(request.layout)
    user = _user_of(bundle_files(out)["metadata"])
    with staged_folder(out) as staging:
        manifest = write_dataset(request, rule.members, user, staging)
    measured = measure_bundle(out, request.layout, request.device)
    return {"out": out, "manifest": manifest, "wheel": out / manifest["wheel"],
            "measured": measured}  # fmt: skip


def write_dataset(request: KaggleRequest, names: list[str], user: str, folder: Path) -> dict:
    """Every file of the dataset, written into ``folder`` (staged by the caller)."""
    manifest = write_bundle(request.layout, "torchscript", names, None, folder)
    wheel = build_wheel(folder)
    manifest.update(
        ensemble_kit_version=__version__, wheel=wheel.name, slug=request.slug, torch_min=TORCH_MIN
    )
    files = bundle_files(folder)
    write_json(files["manifest"], manifest)
    write_json(files["metadata"], dataset_metadata(request.slug, request.title, user))
    task = workdir_task(request.layout)
    notebook = notebook_json(request.slug, request.title, wheel.name, __version__, task)
    write_text(files["notebook"], notebook)
    write_text(files["readme"], bundle_readme(request.slug, request.title, wheel.name, manifest))
    return manifest


def dataset_metadata(slug: str, title: str, user: str = PLACEHOLDER_USER) -> dict:
    """``dataset-metadata.json`` in the Kaggle API's format (a placeholder user by default)."""
    return {"title": title, "id": f"{user}/{slug}", "licenses": [{"name": LICENSE}]}


def _user_of(path: Path) -> str:
    """The user name already set in an earlier ``dataset-metadata.json``, else the placeholder,
    so that rerunning ``ek kaggle`` keeps it."""
    try:
        user = str(json.loads(path.read_text())["id"]).split("/")[0]
    except (OSError, ValueError, KeyError, TypeError):
        return PLACEHOLDER_USER
    return user if re.fullmatch(r"[A-Za-z0-9_-]+", user) else PLACEHOLDER_USER


def bundle_readme(slug: str, title: str, wheel: str, manifest: dict) -> str:
    configs = len(manifest["configs"])
    return README.format(
        title=title, version=__version__, configs=configs, folds=manifest["n_folds"],
        models=configs * manifest["n_folds"], user=PLACEHOLDER_USER, slug=slug, wheel=wheel,
    )  # fmt: skip


def measure_bundle(folder: Path, layout: Layout, device: str | None) -> dict:
    """Run the notebook's code path on a few records of the training data folder.

    A warm-up on :data:`WARMUP_RECORDS` records (numba compiles, CUDA initialises) comes
    first; the result is the second run, on up to :data:`MEASURE_RECORDS` records.
    """
    data_root = Path(read_meta(layout)["data_root"])
    task = workdir_task(layout)
    split, ids = _records_to_time(data_root, task)
    if not ids:
        return {"skipped": f"no records under {data_root} to time the bundle on"}
    with tempfile.TemporaryDirectory(prefix="ek-kaggle-") as scratch:
        warmup = ids[:WARMUP_RECORDS]
        _time_on(folder, data_root, split, warmup, Path(scratch) / "warmup", device, task)
        result = _time_on(folder, data_root, split, ids[:MEASURE_RECORDS], Path(scratch), device,
                          task)  # fmt: skip
    return {**result, "split": split}


def _time_on(
    folder: Path,
    data_root: Path,
    split: str,
    ids: list[str],
    root: Path,
    device: str | None,
    task: Task,
) -> dict:
    """:func:`predict_bundle` on a data folder of links to the given records (or images)."""
    if task.kind == "contrails":
        paths = [data_root / split / rid for rid in ids]
    else:
        listed = image_files(task, data_root, split)  # listed once, not once per image
        paths = [listed[rid] for rid in ids]
    target = split_folder(task, root, split) or root / split  # contrails: ROOT/<split>
    target.mkdir(parents=True)
    for path in paths:
        (target / path.name).symlink_to(path.resolve())
    return predict_bundle(folder, root, root / "submission.csv", split, device)


def _records_to_time(data_root: Path, task: Task) -> tuple[str, list[str]]:
    """The first split of test, validation, train with enough records (else the largest)."""
    found = []
    for split in ("test", "validation", "train"):
        folder = split_folder(task, data_root, split)
        if folder is None or not folder.is_dir():
            continue
        if task.kind == "contrails":
            found.append((split, list_records(data_root, split)))
        else:
            found.append((split, list_images(task, data_root, split)))
    for split, ids in found:
        if len(ids) >= MEASURE_RECORDS:
            return split, ids
    return max(found, key=lambda item: len(item[1]), default=("test", []))


def _check_names(slug: str, title: str) -> None:
    if not SLUG.fullmatch(slug):
        raise EkError(
            f"--slug {slug!r}: Kaggle dataset slugs are 6-50 lowercase letters, digits and "
            "hyphens, starting and ending with a letter or digit"
        )
    if not 6 <= len(title) <= 50:
        raise EkError(f"--title {title!r}: Kaggle dataset titles are 6-50 characters")


def _check_out(out: Path) -> None:
    """Refuse to write into a non-empty folder that is not an earlier ``ek kaggle`` output."""
    if out.exists() and not out.is_dir():
        raise EkError(f"{out}: not a folder")
    if out.is_dir() and any(out.iterdir()) and not bundle_files(out)["metadata"].is_file():
        raise EkError(
            f"{out}: not empty and not an `ek kaggle` folder (no dataset-metadata.json); "
            "choose a new --out"
        )
