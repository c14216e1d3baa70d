"""What a fold and a config's OOF were made from, and refusing those whose data changed.

A fold's ``DONE`` records ``sources``: the fingerprints (size and ``mtime_ns`` of every file,
see :mod:`ensemble_kit.data.sources`) of the inputs of every split it predicted and of the
labels it trained on. ``summary.json`` records the same plus the holdout's labels (used only
for its scores). ``ek cv`` refuses a DONE fold whose files changed since; ``ek blend``
refuses a summary whose files changed since (see ``blend.run``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..config import Config
from ..data.cache import CacheEntry, ensure_labels
from ..data.sources import changed_sources
from ..data.splits import HOLDOUT_FOLD
from ..errors import EkError
from ..layout import Layout, fold_files


def refuse_changed_data(layout: Layout, data_root: Path, configs: list[Config], n_folds: int):
    """Refuse DONE folds trained on data files that changed since (stat calls only)."""
    memo: dict = {}
    for config in configs:
        for fold in range(n_folds):
            done = fold_files(layout.fold_dir(config.name, fold))["done"]
            recorded = json.loads(done.read_text()).get("sources") if done.is_file() else None
            changed = changed_sources(data_root, recorded or {}, memo)
            if changed:
                raise EkError(
                    f"{done.parent}: trained on data that changed since ({changed[0]}); "
                    f"delete {layout.config_dir(config.name)} to retrain on the new data, "
                    "or restore the files"
                )


def fold_sources(caches: dict[str, tuple[CacheEntry, CacheEntry]], splits: pd.DataFrame) -> dict:
    """What a fold depends on: the inputs of every split, the labels of the pool's splits."""
    pool = set(splits.loc[splits["fold"] != HOLDOUT_FOLD, "split"])
    sources = {f"{split}/inputs": inputs.sources for split, (inputs, _) in caches.items()}
    sources.update({f"{s}/labels": caches[s][1].sources for s in sorted(pool)})
    return sources


def summary_sources(layout: Layout, data_root: Path, name: str, n_folds: int, holdout) -> dict:
    """The sources of a config's OOF: its folds' (all equal) and the holdout's labels."""
    recorded = [
        json.loads(fold_files(layout.fold_dir(name, k))["done"].read_text()).get("sources")
        for k in range(n_folds)
    ]
    for fold, sources in enumerate(recorded):
        if sources != recorded[0]:
            raise EkError(
                f"{layout.fold_dir(name, fold)}: trained on other data than fold 0; "
                f"delete {layout.config_dir(name)} to retrain every fold on the same data"
            )
    sources = dict(recorded[0] or {})
    for split in pd.unique(holdout["split"]):
        sources[f"{split}/labels"] = ensure_labels(layout, data_root, split).sources
    return sources
