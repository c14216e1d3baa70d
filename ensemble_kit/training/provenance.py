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

from ..config import Config, config_digest, dump_config, load_config, resolved_dict
from ..data.cache import CacheEntry, split_labels
from ..data.sources import changed_sources
from ..data.splits import HOLDOUT_FOLD
from ..errors import EkError
from ..files import read_json, write_text
from ..layout import Layout, fold_files
from ..task import workdir_task


def refuse_changed_data(layout: Layout, data_root: Path, configs: list[Config], n_folds: int):
    """Refuse DONE folds trained on data files that changed since (stat calls only)."""
    memo: dict = {}
    for config in configs:
        for fold in range(n_folds):
            done = fold_files(layout.fold_dir(config.name, fold))["done"]
            recorded = read_json(done).get("sources") if done.is_file() else None
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
    task = workdir_task(layout)
    for split in pd.unique(holdout["split"]):
        sources[f"{split}/labels"] = split_labels(layout, data_root, split, task).sources
    return sources


def claim_config_dir(layout: Layout, config: Config) -> None:
    """Write the resolved config; refuse a changed config over folds that trained.

    A config folder none of whose folds has trained (a start that failed before the first
    epoch: offline weights, a bad arch) is taken over by the new config, so fixing the
    config as the error said is enough to rerun.

    Raises:
        EkError: The saved config differs and some fold trained; lists the keys that differ.
    """
    path = layout.config_dir(config.name) / "config.yaml"
    if path.is_file():
        saved = load_config(path)
        if config_digest(saved) == config_digest(config):
            return
        if any_fold_trained(layout, config.name):
            keys = changed_keys(resolved_dict(saved), resolved_dict(config))
            raise EkError(
                f"{path}: config '{config.name}' changed since its folds were trained "
                f"({', '.join(keys)}; --epochs sets train.epochs); rename it (a copied config "
                f"needs its own name:), or delete {path.parent} to retrain"
            )
    write_text(path, dump_config(config))


def any_fold_trained(layout: Layout, name: str) -> bool:
    """Whether any fold of config ``name`` saved a checkpoint or finished."""
    folds = layout.config_dir(name).glob("fold_*")
    return any(
        fold_files(fold)[kind].is_file() for fold in folds for kind in ("done", "last", "best")
    )


def changed_keys(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (``name`` excluded)."""
    keys = []
    for key in sorted(set(saved) | set(wanted)):
        dotted = f"{prefix}{key}"
        old, new = saved.get(key), wanted.get(key)
        if dotted == "name" or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            keys.extend(changed_keys(old, new, f"{dotted}."))
        else:
            keys.append(f"{dotted} {old!r} -> {new!r}")
    return keys
