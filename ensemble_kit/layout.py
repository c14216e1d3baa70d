"""Every path ensemble-kit reads or writes, in one place.

A run writes under a *workdir* (``folds/`` by default, relative to the current directory)::

    folds/
      splits.csv            record_id,split,fold   (fold -1: holdout)
      splits.json           how the splits were made (data root, K, seed, digest; task)
      task.yaml             the resolved task of `ek folds --task` (absent: contrails)
      cache/                memory-mappable caches, each a folder of meta.json, ids.csv,
                            sources.npy and one <array>.npy per array:
        <split>-<digest>/   inputs of a split, per input-spec digest
        <split>-labels/     labels and soft labels of a split
        stats-<key>.json    per-band statistics of the training pool
      <config name>/
        config.yaml         the resolved config
        fold_<i>/           best.pt, last.pt, metrics.csv, config.yaml, DONE,
                            RUNNING (while training), oof_part.npy, holdout_part.npy,
                            top_<k>.pt (train.average_top_k: K + 1 slots)
        oof.npy             uint8 (N, H, W): probability x 255, rows as oof_ids.csv
                            (oof_sparse.ekz / holdout_sparse.ekz instead with oof.format
                            sparse: codes >= oof.floor only; see sparse_oof.py)
        oof_ids.csv         record_id,fold
        holdout.npy         uint8 (M, H, W): mean over the K fold models
        holdout_ids.csv     record_id
        summary.json        per-fold, pooled OOF and holdout dice; digests
        curves.png
      pseudo/<name>/        `ek pseudo`: labels.npy uint8 (N, F, H, W), ids.csv, manifest.json
      blend.json            weights, threshold, postprocessing, scores, digests
      blend/                report (plots, report.txt), gallery; show/<record>.png (`ek show`)
      export/               `ek export`: <config>.fold_<i>.pt, manifest.json, blend.json
    submissions/
      submission.csv, submission.json
      kaggle/               `ek kaggle`: the bundle as a Kaggle dataset, with the notebook
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKDIR = Path("folds")
DEFAULT_SUBMISSION = Path("submissions") / "submission.csv"
DEFAULT_KAGGLE_DIR = Path("submissions") / "kaggle"
SPLITS = ("train", "validation", "test")
# entries of the workdir itself: no config or pseudo-label set may take these names
RESERVED_NAMES = (
    "blend",
    "cache",
    "pseudo",
    "export",
    "splits.csv",
    "splits.json",
    "blend.json",
    "submissions",
)


@dataclass(frozen=True)
class Layout:
    """Paths under one workdir."""

    workdir: Path = DEFAULT_WORKDIR

    @property
    def splits_csv(self) -> Path:
        return self.workdir / "splits.csv"

    @property
    def splits_meta(self) -> Path:
        return self.workdir / "splits.json"

    @property
    def task_yaml(self) -> Path:
        return self.workdir / "task.yaml"

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"

    def cache_entry(self, split: str, spec_digest: str) -> Path:
        return self.cache_dir / f"{split}-{spec_digest}"

    def labels_cache(self, split: str) -> Path:
        return self.cache_dir / f"{split}-labels"

    def band_stats_json(self, key: str) -> Path:
        return self.cache_dir / f"stats-{key}.json"

    def config_dir(self, name: str) -> Path:
        return self.workdir / name

    def config_names(self) -> list[str]:
        """Names of configs that have a folder under the workdir (sorted)."""
        if not self.workdir.is_dir():
            return []
        return sorted(p.name for p in self.workdir.iterdir() if self.config_yaml(p.name).is_file())

    def config_yaml(self, name: str) -> Path:
        return self.config_dir(name) / "config.yaml"

    def fold_dir(self, name: str, fold: int) -> Path:
        return self.config_dir(name) / f"fold_{fold}"

    def oof_npy(self, name: str) -> Path:
        """The config's OOF file: ``oof.npy``, or ``oof_sparse.ekz`` where only that exists."""
        return _existing(self.oof_path(name, False), self.oof_path(name, True))

    def oof_path(self, name: str, sparse: bool) -> Path:
        """Where ``ek cv`` writes the OOF in one format (dense ``.npy`` or sparse ``.ekz``)."""
        return self.config_dir(name) / ("oof_sparse.ekz" if sparse else "oof.npy")

    def oof_ids(self, name: str) -> Path:
        return self.config_dir(name) / "oof_ids.csv"

    def holdout_npy(self, name: str) -> Path:
        """The holdout codes: ``holdout.npy``, or ``holdout_sparse.ekz`` where only that exists."""
        return _existing(self.holdout_path(name, False), self.holdout_path(name, True))

    def holdout_path(self, name: str, sparse: bool) -> Path:
        return self.config_dir(name) / ("holdout_sparse.ekz" if sparse else "holdout.npy")

    def holdout_ids(self, name: str) -> Path:
        return self.config_dir(name) / "holdout_ids.csv"

    def summary(self, name: str) -> Path:
        return self.config_dir(name) / "summary.json"

    def curves_png(self, name: str) -> Path:
        return self.config_dir(name) / "curves.png"

    def pseudo_dir(self, name: str) -> Path:
        return self.workdir / "pseudo" / name

    @property
    def blend_json(self) -> Path:
        return self.workdir / "blend.json"

    @property
    def blend_report_dir(self) -> Path:
        return self.workdir / "blend"

    @property
    def blend_lock(self) -> Path:
        return self.workdir / ".blend.lock"

    @property
    def blend_report_txt(self) -> Path:
        return self.blend_report_dir / "report.txt"

    def show_png(self, record_id: str) -> Path:
        """Where ``ek show`` writes one record's gallery row without ``--out``."""
        return self.blend_report_dir / "show" / f"{record_id}.png"

    @property
    def export_dir(self) -> Path:
        return self.workdir / "export"


def split_dir(data_root: Path | str, split: str) -> Path:
    """Folder of one split's records in the Kaggle layout: ``<data_root>/<split>/``."""
    return Path(data_root) / split


def record_dir(data_root: Path | str, split: str, record_id: str) -> Path:
    """Folder of one Kaggle record: ``<data_root>/<split>/<record_id>/``."""
    return split_dir(data_root, split) / str(record_id)


def cache_files(entry: Path) -> dict[str, Path]:
    """The files of a cache entry besides its arrays (at :func:`cache_array`)."""
    return {
        "meta": entry / "meta.json",
        "ids": entry / "ids.csv",
        "sources": entry / "sources.npy",
    }


def cache_array(entry: Path, name: str) -> Path:
    """One array of a cache entry (``inputs``, ``labels``, ``soft``)."""
    return entry / f"{name}.npy"


def _existing(dense: Path, sparse: Path) -> Path:
    return sparse if sparse.is_file() and not dense.is_file() else dense


def fold_files(fold_dir: Path, top_k: int = 0) -> dict[str, Path]:
    """The files one fold writes; ``top_k`` adds the ``top_0`` ... ``top_<K>`` weight slots."""
    slots = {f"top_{k}": fold_dir / f"top_{k}.pt" for k in range(top_k + 1)} if top_k else {}
    return {
        "best": fold_dir / "best.pt",
        "last": fold_dir / "last.pt",
        "metrics": fold_dir / "metrics.csv",
        "config": fold_dir / "config.yaml",
        "done": fold_dir / "DONE",
        "running": fold_dir / "RUNNING",
        "oof_part": fold_dir / "oof_part.npy",
        "oof_part_sparse": fold_dir / "oof_part_sparse.ekz",
        "holdout_part": fold_dir / "holdout_part.npy",
        **slots,
    }


def pseudo_files(pseudo_dir: Path) -> dict[str, Path]:
    """The files ``ek pseudo`` writes: labels, their record ids, the manifest."""
    return {
        "labels": pseudo_dir / "labels.npy",
        "ids": pseudo_dir / "ids.csv",
        "manifest": pseudo_dir / "manifest.json",
    }


def bundle_files(folder: Path | str) -> dict[str, Path]:
    """The files of a prediction bundle (``ek export``'s folder, or ``ek kaggle``'s dataset,
    which adds the Kaggle files); models are at :func:`bundle_model`."""
    folder = Path(folder)
    return {
        "manifest": folder / "manifest.json",
        "blend": folder / "blend.json",
        "metadata": folder / "dataset-metadata.json",
        "notebook": folder / "inference.ipynb",
        "readme": folder / "README.md",
    }


def bundle_model(folder: Path | str, name: str, fold: int, fmt: str = "torchscript") -> Path:
    """A bundle's exported model of one config's fold: ``<config>.fold_<k>.pt`` (or ``.onnx``).

    Flat, because ``kaggle datasets create -p DIR`` skips sub-folders unless told otherwise.
    """
    return Path(folder) / f"{name}.fold_{fold}.{'pt' if fmt == 'torchscript' else 'onnx'}"
