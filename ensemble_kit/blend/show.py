"""``ek show``: the gallery row of any one record, from stored codes and ``blend.json``.

A pool or holdout record gets the row that :mod:`.gallery` draws (ash false colour, label,
blended probability, TP/FP/FN mask) computed from its stored uint8 codes with
:meth:`~ensemble_kit.blend.rule.BlendRule.apply`; its dice contribution needs the set totals that
``ek blend --oof`` wrote to ``folds/blend/gallery/meta.json``. A test record gets its false
colour only: ``ek submit`` keeps no test-set probabilities. Nothing is predicted or trained.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..data.records import load_mask
from ..data.splits import HOLDOUT_FOLD, read_meta, read_splits
from ..errors import EkError
from ..files import digest_file
from ..layout import Layout, record_dir
from ..oof import read_oof
from ..task import workdir_task
from .gallery import (
    GALLERY_DIR,
    META_JSON,
    Panel,
    blend_record,
    draw_panel,
    load_images,
    set_threshold,
    write_png,
)
from .rule import BlendRule
from .sparse import floor_pool
from .verify import verify_blend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shown:
    """What ``ek show`` wrote: the PNG, the panel and the arrays drawn."""

    path: Path
    panel: Panel
    drawn: dict


def show_record(
    layout: Layout,
    record_id: str,
    data_root: Path | None = None,
    out: Path | None = None,
    frames: bool = False,
) -> Shown:
    """``ek show``: draw one record of the OOF pool, the holdout or the test split.

    OOF and holdout records get the gallery row (false colour, label, blended probability,
    TP/FP/FN mask) from the stored codes and ``blend.json``; a test record gets its false
    colour only, since no test-set probabilities are stored. Nothing is predicted.

    Args:
        layout: The workdir :class:`~ensemble_kit.layout.Layout`.
        record_id: The record id, as a string.
        data_root: Kaggle data folder; default: ``splits.json``'s ``data_root``.
        out: PNG to write; default ``<workdir>/blend/show/<record_id>.png``.
        frames: Also draw the false colour of all 8 frames.

    Raises:
        EkError: Unknown record id, stale or missing ``blend.json``, missing files.
    """
    record_id = str(record_id)
    task = workdir_task(layout)
    if task.kind != "contrails":
        raise EkError(
            f"ek show draws contrail records; task {task.name} has images (not drawn yet)"
        )
    set_name, split, data_root = _locate(layout, record_id, data_root)
    if set_name == "test":
        panel = Panel(record_id, "test", None, None)
    else:
        panel = _set_panel(layout, verify_blend(layout), record_id, set_name)
        panel.label = load_mask(record_dir(data_root, split, record_id))
    load_images(panel, record_dir(data_root, split, record_id), frames)
    pixels, drawn = draw_panel(panel)
    path = write_png(out or layout.show_png(record_id), pixels)
    return Shown(Path(path), panel, drawn)


def _locate(layout: Layout, record_id: str, data_root: Path | None) -> tuple[str, str, Path]:
    """``(set name, split folder, data root)`` of a record id."""
    if not record_id.isdigit():
        raise EkError(f"record '{record_id}': not a record id (record ids are digits)")
    data_root = Path(data_root if data_root is not None else read_meta(layout)["data_root"])
    if layout.splits_csv.is_file():
        splits = read_splits(layout)
        row = splits[splits["record_id"] == record_id]
        if len(row):
            fold = int(row["fold"].iloc[0])
            return ("holdout" if fold == HOLDOUT_FOLD else "oof"), row["split"].iloc[0], data_root
    if record_dir(data_root, "test", record_id).is_dir():
        return "test", "test", data_root
    raise EkError(
        f"record {record_id}: not in {layout.splits_csv} (OOF pool or holdout) "
        f"nor in {data_root / 'test'}"
    )


def _set_panel(layout: Layout, rule: BlendRule, record_id: str, set_name: str) -> Panel:
    """The panel of a pool or holdout record, without images or label."""
    chosen = floor_pool([read_oof(layout, name) for name in rule.weights])
    first = chosen[0]
    if set_name == "oof":
        ids, source = first.ids, layout.oof_ids(first.name)
        codes = {o.name: o.probs for o in chosen}
    else:
        ids, source = first.holdout_ids, layout.holdout_ids(first.name)
        codes = {o.name: o.holdout for o in chosen if o.holdout is not None}
        missing = [o.name for o in chosen if o.holdout is None]
        if missing:
            raise EkError(f"{layout.holdout_npy(missing[0])}: missing; cannot show {record_id}")
    if record_id not in ids:
        raise EkError(f"record {record_id}: in {layout.splits_csv} but not in {source}")
    i = ids.index(record_id)
    threshold = set_threshold(rule, codes) if set_name == "holdout" else rule.threshold_sum
    probability, predicted = blend_record(rule, {n: c[i] for n, c in codes.items()}, threshold)
    fold = int(first.folds[i]) if set_name == "oof" else HOLDOUT_FOLD
    panel = Panel(record_id, set_name, fold, None, None, probability, predicted)
    panel.denominator = _stored_denominator(layout, set_name)
    return panel


def _stored_denominator(layout: Layout, set_name: str) -> int | None:
    """The set's ``2 TP + FP + FN`` from the gallery's ``meta.json``, if it matches blend.json."""
    path = layout.blend_report_dir / GALLERY_DIR / META_JSON
    try:
        meta = json.loads(path.read_text())
        if meta["blend_json_digest"] == digest_file(layout.blend_json):
            return int(meta["sets"][set_name]["denominator"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        pass
    log.warning("%s: missing or older than blend.json; no dice contribution", path)
    return None
