"""The prediction gallery of ``ek blend --oof`` and the one-record view of ``ek show``.

``ek blend --oof`` calls :func:`write_gallery`: it applies the blend to every OOF (and
holdout) record with :meth:`~ensemble_kit.blend.rule.BlendRule.apply`, the code path of ``ek
submit``, counts TP / FP / FN pixels per record, and draws one row per record for the records
where the blend loses most (FP + FN pixels), a few where it does best and a few empty records
it wrongly fills. ``ek show`` (:mod:`.show`) draws the same row for any record. Both read
only files that exist (OOF codes, ``blend.json``, the data) and never run a model.

A record's *dice contribution* is ``-(FP + FN) / (2 TP + FP + FN)``, the set's totals in the
denominator: the share of the set's global dice that this record loses. The contributions of
a set sum to ``global dice - 1`` exactly, so the worst rows are where dice goes.

Files under ``folds/blend/``: ``gallery.png`` (every row), ``gallery/<nn>_<kind>_<id>.png``
(one per row), ``gallery/records.csv`` (every record's counts; OOF, then holdout, each
worst first) and
``gallery/meta.json`` (the set totals and the digest of the ``blend.json`` they belong to,
which ``ek show`` needs for a contribution). The selection and drawing functions take and
return arrays; matplotlib is imported on first use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..data.cache import load_labels
from ..data.records import N_FRAMES, ash_false_color, band_file, load_bands
from ..data.splits import HOLDOUT_FOLD, read_splits
from ..files import atomic_path, digest_file, write_json
from ..layout import Layout, record_dir
from ..oof import write_ids
from ..plots import pyplot
from .rule import BlendRule

log = logging.getLogger(__name__)

GALLERY_PNG = "gallery.png"
GALLERY_DIR = "gallery"
RECORDS_CSV = "records.csv"
META_JSON = "meta.json"
ASH_BANDS = (11, 14, 15)
LABELLED_FRAME = 4
BATCH = 256
# How many rows of each kind the gallery draws.
N_WORST, N_BEST, N_EMPTY = 6, 3, 3
# Outcome colours on a dark background; Okabe-Ito orange and sky blue stay apart for
# colour-blind readers.
BACKGROUND = (40, 40, 40)
OUTCOME_COLOURS = {"TP": (255, 255, 255), "FP": (230, 159, 0), "FN": (86, 180, 233)}
OUTCOME_LEGEND = "mask: TP white, FP orange, FN blue"
FIGURE_WIDTH, ROW_HEIGHT, DPI = 10.4, 3.0, 100


@dataclass
class Panel:
    """Everything one gallery row shows of one record (arrays, not pixels of a figure).

    ``set_name`` is ``"oof"``, ``"holdout"`` or ``"test"``; ``fold`` is the OOF fold, -1 for
    the holdout, None for a test record, which has no label, probability or prediction.
    ``denominator`` is ``2 TP + FP + FN`` of the whole set (None when unknown).
    """

    record_id: str
    set_name: str
    fold: int | None
    image: np.ndarray | None  # float32 (H, W, 3): ash false colour of the labelled frame
    label: np.ndarray | None = None  # uint8 (H, W) 0/1
    probability: np.ndarray | None = None  # float32 (H, W): blend sum / (255 * sum(w))
    predicted: np.ndarray | None = None  # bool (H, W): the rule's final mask
    denominator: int | None = None
    kind: str = ""  # the gallery row's reason, e.g. "worst 1"
    frames: np.ndarray | None = None  # float32 (8, H, W, 3) with --frames

    @property
    def counts(self) -> tuple[int, int, int]:
        """TP, FP, FN pixels (a test record has none)."""
        if self.predicted is None or self.label is None:
            raise ValueError(f"record {self.record_id}: no prediction or label to count")
        tp, fp, fn = outcome_counts(self.predicted[None], self.label[None])[0]
        return int(tp), int(fp), int(fn)

    @property
    def contribution(self) -> float | None:
        if self.denominator is None:
            return None
        _, fp, fn = self.counts
        return -(fp + fn) / self.denominator if self.denominator else 0.0

    @property
    def title(self) -> str:
        kind = f"{self.kind} · " if self.kind else ""
        if self.set_name == "test":
            return (
                f"{kind}{self.record_id} · test record: image only (no label; ek stores no "
                "test-set probabilities to draw a prediction from)"
            )
        where = "holdout" if self.set_name == "holdout" else f"fold {self.fold}"
        tp, fp, fn = self.counts
        share = self.contribution
        share_text = "n/a (rerun ek blend --oof)" if share is None else f"{share:+.5f}"
        return (
            f"{kind}{self.record_id} · {where} · TP {tp} FP {fp} FN {fn} px · "
            f"dice contribution {share_text}"
        )


# ----------------------------------------------------------------------------- arrays


def outcome_counts(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per record TP, FP and FN pixels of masks ``(N, H, W)``: int64 ``(N, 3)``."""
    p = np.asarray(predicted).reshape(len(predicted), -1).astype(bool)
    t = np.asarray(labels).reshape(len(labels), -1) > 0
    return np.stack(
        [
            np.count_nonzero(p & t, axis=1),
            np.count_nonzero(p & ~t, axis=1),
            np.count_nonzero(~p & t, axis=1),
        ],
        axis=1,
    ).astype(np.int64)


def dice_denominator(counts: np.ndarray) -> int:
    """``2 TP + FP + FN`` summed over a set's ``(N, 3)`` counts (= predicted + true pixels)."""
    tp, fp, fn = np.asarray(counts).sum(axis=0)
    return int(2 * tp + fp + fn)


def dice_contributions(counts: np.ndarray) -> np.ndarray:
    """Each record's share of the set's global dice lost: ``-(FP + FN) / (2 TP + FP + FN)``.

    The totals of the whole set are the denominator, so ``1 + sum`` is the global dice.
    """
    denominator = dice_denominator(counts)
    lost = counts[:, 1] + counts[:, 2]
    return -lost / denominator if denominator else np.zeros(len(counts))


def select_records(
    counts: np.ndarray, n_worst: int = N_WORST, n_best: int = N_BEST, n_empty: int = N_EMPTY
) -> list[tuple[str, int]]:
    """Gallery rows from per-record ``(N, 3)`` TP/FP/FN counts: ``(kind, index)`` pairs.

    In order: the ``n_worst`` records with most FP + FN pixels; the ``n_best`` labelled
    records with the highest own dice (more TP first on ties); the ``n_empty`` empty records
    with most FP pixels. No record is drawn twice; ties go to the earlier record.
    """
    tp, fp, fn = np.asarray(counts).T
    empty = tp + fn == 0
    own_dice = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=tp > 0)
    picks: list[tuple[str, int]] = []
    for kind, keys, allowed, limit in (
        ("worst", (fp + fn,), fp + fn > 0, n_worst),
        ("best", (own_dice, tp), tp > 0, n_best),
        ("empty filled", (fp,), empty & (fp > 0), n_empty),
    ):
        order = np.lexsort([-np.arange(len(tp)), *keys[::-1]])[::-1]
        taken = {i for _, i in picks}
        chosen = [int(i) for i in order if allowed[i] and i not in taken][:limit]
        picks += [(f"{kind} {rank + 1}", i) for rank, i in enumerate(chosen)]
    return picks


def set_counts(
    rule: BlendRule, codes: dict[str, np.ndarray], labels, threshold_sum: int
) -> np.ndarray:
    """TP/FP/FN of :meth:`BlendRule.apply` on every record of a set, in batches: ``(N, 3)``.

    ``labels`` is anything sliceable to uint8 ``(n, H, W)`` in the rows of ``codes``.
    """
    n = len(next(iter(codes.values())))
    batches = [slice(lo, lo + BATCH) for lo in range(0, n, BATCH)]
    parts = [
        outcome_counts(
            rule.apply({k: np.asarray(c[b]) for k, c in codes.items()}, threshold_sum),
            labels[b],
        )
        for b in tqdm(batches, "gallery counts", unit="batch", leave=False, disable=n < 4096)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)


def set_threshold(rule: BlendRule, codes: dict[str, np.ndarray]) -> int:
    """The threshold sum ``ek submit`` would apply to this whole set
    (:meth:`BlendRule.threshold_for` of the set's histogram)."""
    if rule.mode != "top_fraction":
        return rule.threshold_for()
    n = len(next(iter(codes.values())))
    histograms = [
        rule.histogram({k: np.asarray(c[lo : lo + BATCH]) for k, c in codes.items()})
        for lo in range(0, n, BATCH)
    ]
    return rule.threshold_for(np.sum(histograms, axis=0))


def blend_record(
    rule: BlendRule, codes: dict[str, np.ndarray], threshold_sum: int
) -> tuple[np.ndarray, np.ndarray]:
    """Blended probability (float32) and final mask (bool, :meth:`BlendRule.apply`) of one
    record's uint8 ``(H, W)`` codes per member."""
    batch = {name: np.asarray(codes[name])[None] for name in rule.weights}
    scale = 255.0 * rule.weight_total
    probability = (rule.sums(batch)[0] / scale).astype(np.float32)
    return probability, rule.apply(batch, threshold_sum)[0]


def false_colours(folder: Path, frames: tuple[int, ...]) -> np.ndarray | None:
    """Ash false colour of ``frames``, float32 ``(F, H, W, 3)``; None without band files."""
    if not all((Path(folder) / band_file(b)).is_file() for b in ASH_BANDS):
        return None
    b11, b14, b15 = load_bands(folder, ASH_BANDS, frames)
    return ash_false_color(b11, b14, b15).transpose(1, 2, 3, 0)


def load_images(panel: Panel, folder: Path, all_frames: bool) -> Panel:
    """Fill ``panel.image`` (and ``panel.frames`` when ``all_frames``) from the record folder."""
    frames = tuple(range(N_FRAMES)) if all_frames else (LABELLED_FRAME,)
    colours = false_colours(folder, frames)
    if colours is not None:
        panel.image = colours[frames.index(LABELLED_FRAME)]
        panel.frames = colours if all_frames else None
    return panel


def outcome_image(predicted: np.ndarray, label: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 3)``: TP, FP and FN pixels in :data:`OUTCOME_COLOURS`."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(label) > 0
    image = np.empty((*predicted.shape, 3), np.uint8)
    image[:] = BACKGROUND
    image[predicted & truth] = OUTCOME_COLOURS["TP"]
    image[predicted & ~truth] = OUTCOME_COLOURS["FP"]
    image[~predicted & truth] = OUTCOME_COLOURS["FN"]
    return image


# ----------------------------------------------------------------------------- drawing


def panel_columns(panel: Panel) -> list[tuple[str, str, np.ndarray | None, dict]]:
    """``(key, column title, array, imshow options)`` of each image in a panel's first row."""
    columns: list[tuple[str, str, np.ndarray | None, dict]] = [
        ("image", f"ash false colour, frame t{LABELLED_FRAME}", panel.image, {})
    ]
    if panel.predicted is None or panel.label is None:  # a test record
        return columns
    unit = {"vmin": 0, "vmax": 1}
    return columns + [
        ("label", "label", panel.label, {"cmap": "gray", **unit}),
        (
            "probability",
            "blend probability (cyan: predicted)",
            panel.probability,
            {"cmap": "magma", **unit},
        ),
        ("outcome", OUTCOME_LEGEND, outcome_image(panel.predicted, panel.label), {}),
    ]


def draw_panel(panel: Panel) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw one row (and a row of 8 frames when ``panel.frames`` is set).

    Returns:
        The figure's RGBA pixels and the arrays handed to ``imshow``, by column key
        (``image``, ``label``, ``probability``, ``outcome``, ``frames``; a key is absent when
        that column is not drawn).
    """
    plt = pyplot()
    heights = (2,) if panel.frames is None else (2, 1)  # a frame is half a panel's width
    size = (FIGURE_WIDTH, ROW_HEIGHT * sum(heights) / 2)
    fig = plt.figure(figsize=size, dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(len(heights), N_FRAMES, height_ratios=heights)
    drawn = {}
    for i, (key, title, array, style) in enumerate(panel_columns(panel)):
        ax = fig.add_subplot(grid[0, 2 * i : 2 * i + 2])
        image = _imshow(ax, title, array, style)
        if key == "probability" and image is not None:
            _mark_probability(fig, ax, image, panel.predicted)
        if array is not None:
            drawn[key] = array
    if panel.frames is not None:
        for t in range(N_FRAMES):
            title = f"t{t} (labelled)" if t == LABELLED_FRAME else f"t{t}"
            _imshow(fig.add_subplot(grid[1, t]), title, panel.frames[t], {})
        drawn["frames"] = panel.frames
    fig.suptitle(panel.title, fontsize=9)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba()).copy()
    plt.close(fig)
    return pixels, drawn


def _imshow(ax, title: str, array: np.ndarray | None, style: dict):
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    if array is None:
        ax.text(0.5, 0.5, "band files not found", ha="center", va="center", fontsize=8)
        return None
    return ax.imshow(array, interpolation="nearest", **style)


def _mark_probability(fig, ax, image, predicted: np.ndarray | None) -> None:
    """A colour bar beside the probability, and the predicted mask's outline on it (the
    blend's threshold and postprocessing applied)."""
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=6)
    if predicted is not None and predicted.any() and not predicted.all():
        ax.contour(predicted.astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Save RGBA pixels as a PNG, atomically."""
    plt = pyplot()
    with atomic_path(path) as tmp:
        plt.imsave(tmp, pixels, format="png")
    return Path(path)


def draw_gallery(panels: list[Panel], gallery_png: Path, panel_dir: Path) -> list[dict]:
    """Write one PNG per panel into ``panel_dir`` and all rows stacked as ``gallery_png``.

    The PNGs of an earlier gallery are removed first (no rows: no ``gallery_png``). Returns
    the arrays each row drew (see :func:`draw_panel`).
    """
    panel_dir.mkdir(parents=True, exist_ok=True)
    for old in [gallery_png, *panel_dir.glob("*.png")]:
        old.unlink(missing_ok=True)
    rows, drawn = [], []
    for number, panel in enumerate(panels, 1):
        pixels, arrays = draw_panel(panel)
        kind = panel.kind.rsplit(" ", 1)[0].replace(" ", "_")
        write_png(panel_dir / f"{number:02d}_{kind}_{panel.record_id}.png", pixels)
        rows.append(pixels)
        drawn.append(arrays)
    if rows:
        write_png(gallery_png, _stack(rows))
    return drawn


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    """RGBA images one below the other, narrower ones padded white on the right."""
    width = max(r.shape[1] for r in rows)
    return np.concatenate(
        [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    )


# ----------------------------------------------------------------------------- workdir


def write_gallery(
    layout: Layout, data_root: Path, rule: BlendRule, pool: list, labels: np.ndarray
) -> list[tuple[Panel, dict]]:
    """``ek blend --oof``'s gallery: counts of every record, then the selected rows drawn.

    Args:
        layout: The workdir :class:`~ensemble_kit.layout.Layout` (``blend.json`` written).
        data_root: Kaggle data folder (bands and labels).
        rule: The chosen :class:`BlendRule`.
        pool: The :class:`~ensemble_kit.oof.OofSet` of every pooled config.
        labels: uint8 ``(N, H, W)`` labels of the OOF records, in OOF order.

    Returns:
        Each row's panel and the arrays it drew (see :func:`draw_panel`).
    """
    chosen = [o for o in pool if o.name in rule.weights]
    codes = {o.name: o.probs for o in chosen}
    counts = set_counts(rule, codes, labels, rule.threshold_sum)  # the threshold chosen on OOF
    folder = layout.blend_report_dir / GALLERY_DIR
    tables = {"oof": (chosen[0].ids, chosen[0].folds, counts)}
    tables.update(_holdout_table(layout, data_root, rule, chosen))
    _write_tables(folder, layout.blend_json, tables)
    splits = _record_splits(layout)
    panels = []
    for kind, i in select_records(counts):
        rid = chosen[0].ids[i]
        probability, predicted = blend_record(
            rule, {n: c[i] for n, c in codes.items()}, rule.threshold_sum
        )
        panel = Panel(rid, "oof", int(chosen[0].folds[i]), None, np.asarray(labels[i]))
        panel.probability, panel.predicted, panel.kind = probability, predicted, kind
        panel.denominator = dice_denominator(counts)
        panels.append(load_images(panel, record_dir(data_root, splits[rid], rid), False))
    gallery_png = layout.blend_report_dir / GALLERY_PNG
    drawn = draw_gallery(panels, gallery_png, folder)
    # named as the swapped-in report folder holds it (ek blend writes it in a staged folder)
    log.info("gallery: wrote blend/%s (%d records)", GALLERY_PNG, len(panels))
    return list(zip(panels, drawn))


def _holdout_table(layout: Layout, data_root: Path, rule: BlendRule, chosen: list) -> dict:
    """``{"holdout": (ids, folds, counts)}``, or nothing when a config has no holdout."""
    if any(o.holdout is None for o in chosen) or not chosen[0].holdout_ids:
        return {}
    ids = chosen[0].holdout_ids
    splits = _record_splits(layout)
    records = pd.DataFrame({"record_id": ids, "split": [splits[r] for r in ids]})
    codes = {o.name: o.holdout for o in chosen}
    labels = load_labels(layout, data_root, records)
    counts = set_counts(rule, codes, labels, set_threshold(rule, codes))
    return {"holdout": (ids, np.full(len(ids), HOLDOUT_FOLD), counts)}


def _write_tables(folder: Path, blend_json: Path, tables: dict) -> None:
    """``records.csv`` (each set's records, worst first) and ``meta.json`` (set totals)."""
    frames, totals = [], {}
    for name, (ids, folds, counts) in tables.items():
        tp, fp, fn = counts.T
        frames.append(
            pd.DataFrame(
                {"record_id": ids, "set": name, "fold": folds, "tp": tp, "fp": fp, "fn": fn}
                | {"dice_contribution": dice_contributions(counts)}
            ).sort_values("dice_contribution", kind="stable")
        )
        denominator = dice_denominator(counts)
        dice = 2 * int(tp.sum()) / denominator if denominator else 0.0
        totals[name] = {"records": len(ids), "denominator": denominator, "dice": dice}
    table = pd.concat(frames, ignore_index=True)
    write_ids(folder / RECORDS_CSV, table)
    write_json(folder / META_JSON, {"blend_json_digest": digest_file(blend_json), "sets": totals})


def _record_splits(layout: Layout) -> dict[str, str]:
    splits = read_splits(layout)
    return dict(zip(splits["record_id"], splits["split"]))
