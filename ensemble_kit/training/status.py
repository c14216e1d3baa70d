"""``ek status``: configs x folds, best epochs and scores, pooled OOF and holdout dice."""

from __future__ import annotations

import socket
from pathlib import Path

from ..files import read_json
from ..layout import Layout, fold_files
from .lock import is_live, read_lock


def fold_state(fold_dir: Path) -> dict:
    """``done`` / ``running`` / ``stopped`` (interrupted, resumable) / ``missing`` with details.

    ``running`` (a live lock, :mod:`.lock`) also gives ``host`` and ``pid``.
    """
    files = fold_files(fold_dir)
    if files["done"].is_file():
        return {"state": "done", **read_json(files["done"])}
    held = read_lock(files["running"])
    if held is not None and is_live(held):
        return {"state": "running", "host": held.host, "pid": held.pid}
    if files["last"].is_file():
        return {"state": "stopped"}
    return {"state": "missing"}


def where_running(layout: Layout, name: str, folds: list[int]) -> str:
    """Where the given folds of a config run, as a note for a log line ('' if nowhere)."""
    running = []
    for fold in folds:
        held = read_lock(fold_files(layout.fold_dir(name, fold))["running"])
        if held is not None and is_live(held):
            running.append(f"fold {fold} on {held.describe()}")
    if not running:
        return ""
    return f" ({'; '.join(running)}: the process that finishes the last fold assembles)"


def status_rows(layout: Layout) -> list[dict]:
    """One row per config: fold states and scores."""
    n_folds = _n_folds(layout)
    rows = []
    for name in layout.config_names():
        summary_path = layout.summary(name)
        summary = read_json(summary_path) if summary_path.is_file() else {}
        folds = [fold_state(layout.fold_dir(name, k)) for k in range(n_folds)]
        rows.append(
            {
                "config": name,
                "folds": folds,
                "oof_dice": summary.get("oof_dice"),
                "holdout_dice": summary.get("holdout_dice_at_oof_threshold"),
                "seconds": sum(f.get("seconds_total", 0.0) for f in folds),
            }
        )
    return rows


def _n_folds(layout: Layout) -> int:
    if layout.splits_meta.is_file():
        return int(read_json(layout.splits_meta)["n_folds"])
    return 0


def format_status(rows: list[dict]) -> str:
    """The leaderboard as a text table."""
    if not rows:
        return "no configs under this workdir yet; run `ek cv CONFIG...`"
    n_folds = len(rows[0]["folds"])
    header = ["config"] + [f"fold {k}" for k in range(n_folds)] + ["oof dice", "holdout", "time"]
    table = [header]
    for row in sorted(rows, key=lambda r: -(r["oof_dice"] or -1)):
        cells = [row["config"]] + [_fold_cell(f) for f in row["folds"]]
        cells += [
            _number(row["oof_dice"]),
            _number(row["holdout_dice"]),
            f"{row['seconds'] / 60:.1f} min",
        ]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def reported_dice(summary: dict) -> float:
    """The dice of the model a fold uses: the averaged one with ``train.average_top_k``,
    else the best epoch's."""
    return float(summary.get("top_k_dice", summary["best_dice"]))


def _fold_cell(fold: dict) -> str:
    if fold["state"] == "done":
        epochs = f"avg{fold['top_k']}" if "top_k_dice" in fold else f"e{fold['best_epoch']}"
        return f"done {epochs} {reported_dice(fold):.4f}"
    if fold["state"] == "running" and fold["host"] != socket.gethostname():
        return f"running@{fold['host']}"
    return fold["state"]


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"
