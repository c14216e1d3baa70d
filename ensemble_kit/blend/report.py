"""The ``ek blend`` report: four plots and a text table of the chosen rule and its scores.

matplotlib is imported inside the functions (:func:`~ensemble_kit.plots.pyplot`), so importing
this module is cheap. Every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import write_text
from ..plots import pyplot as _pyplot
from ..plots import save_figure as _save
from .rule import BlendFile


def write_blend_report(report_dir: Path, blend: BlendFile, curves: dict) -> list[Path]:
    """Write the blend report: four PNG plots and ``report.txt``.

    Args:
        report_dir: Output folder (``layout.blend_report_dir``).
        blend: The rule and its scores, as written to ``blend.json``.
        curves: Name -> (threshold probabilities, dice), each config and ``"blend"``.

    Returns:
        The written paths.
    """
    report_dir = Path(report_dir)
    rule, scores = blend.rule, blend.scores
    paths = [
        plot_threshold_curves(curves, rule.threshold, report_dir / "thresholds.png"),
        plot_selection_path(scores["selection_path"], report_dir / "selection.png"),
        plot_min_pixels(scores["min_pixels_curve"], rule.min_pixels, report_dir / "min_pixels.png"),
        plot_fold_scores(scores, report_dir / "folds.png"),
    ]
    text = report_dir / "report.txt"
    write_text(text, format_blend_table(blend))
    return [*paths, text]


def plot_threshold_curves(curves: dict, chosen: float, path: Path) -> Path:
    """Dice against probability threshold for each config and the blend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (thresholds, dice) in curves.items():
        style = {"color": "black", "linewidth": 2.5} if name == "blend" else {"linewidth": 1}
        ax.plot(thresholds, dice, label=name, **style)
    ax.axvline(chosen, color="grey", linestyle="--", linewidth=1)
    ax.set(
        xlabel="threshold (probability)",
        ylabel="global dice (OOF)",
        xlim=(0, 1),
        title="Dice vs threshold",
    )
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_selection_path(path_steps: list[dict], path: Path) -> Path:
    """Greedy selection: best-threshold dice after each step, the added config as the x tick
    label, and the chosen step (the best; the earliest of equals) marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * len(path_steps) + 3), 4.5))
    steps = [s["step"] for s in path_steps]
    dice = [s["dice"] for s in path_steps]
    ax.plot(steps, dice, marker="o")
    if steps:
        best = int(np.argmax(dice))
        ax.plot(steps[best], dice[best], marker="*", markersize=16, color="tab:red", zorder=3)
        ax.annotate(
            f"chosen: step {steps[best]}, dice {dice[best]:.4f}",
            (steps[best], dice[best]),
            xytext=(0, -22),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color="tab:red",
        )
        ax.set_xticks(steps, [f"{s['step']} {s['config']}" for s in path_steps])
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.set(xlabel="greedy step: config added", ylabel="global dice (OOF)", title="Selection path")
    return _save(fig, path)


def plot_min_pixels(curve: dict[str, float], chosen: int, path: Path) -> Path:
    """Best dice of the blend against the min-pixel setting."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [int(k) for k in curve]
    ax.plot(sizes, list(curve.values()), marker="o")
    ax.axvline(chosen, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="min pixels per mask", ylabel="global dice (OOF)", title="Dice vs min-pixel")
    return _save(fig, path)


def plot_fold_scores(scores: dict, path: Path) -> Path:
    """Per-fold dice: each config, the blend (chosen on all folds) and the nested blend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {name: s["per_fold"] for name, s in scores["per_config"].items()}
    series["blend (OOF)"] = scores["blend_oof_per_fold"]
    series["blend (nested)"] = scores["nested"]["per_fold"]
    folds = np.arange(len(scores["nested"]["per_fold"]))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(folds + i * width, values, width, label=name)
    ax.set(xlabel="fold", ylabel="global dice", title="Per-fold scores")
    ax.set_xticks(folds + 0.4 - width / 2, [str(k) for k in folds])
    ax.legend(fontsize="small")
    return _save(fig, path)


def format_blend_table(blend: BlendFile) -> str:
    """A short text summary of a blend: choice, then one row per config and the blend."""
    rule, s = blend.rule, blend.scores
    weights = ", ".join(f"{n} x{w}" for n, w in rule.weights.items())
    fraction = "" if rule.top_fraction is None else f" (top {rule.top_fraction:.5%} of pixels)"
    holdout = "-" if s["holdout"] is None else f"{s['holdout']:.4f}"
    source = rule.threshold_from
    lines = [
        f"weights: {weights}",
        f"threshold: {rule.threshold:.4f} [{rule.mode}, from {source}]"
        f"{fraction}, sum >= {rule.threshold_sum}",
        f"min_pixels: {rule.min_pixels}  min_component: {rule.min_component}",
        f"floor: code {rule.floor} (p = {rule.floor / 255:.3f}); no threshold below it is "
        "searched or applied (sparse members store nothing below it)",
        _cost_line(blend.cost),
        "",
        f"{'':24s} {'OOF':>8s} {'nested':>8s} {'thr':>6s}",
    ]
    for name, c in s["per_config"].items():
        lines.append(f"{name:24s} {c['dice']:8.4f} {c['nested']:8.4f} {c['threshold']:6.3f}")
    nested = s["nested"]
    oof_threshold = s.get("oof_threshold", rule.threshold)
    lines.append(
        f"{'blend':24s} {s['blend_oof']:8.4f} {nested['pooled']:8.4f} {oof_threshold:6.3f}"
    )
    options = nested.get("options", {})
    lines += [
        f"blend without postprocessing (OOF): {s['blend_oof_no_postprocess']:.4f}",
        "each option fixed (the best one is the final choice; only `nested` is honest): "
        + ", ".join(f"{label} {dice:.4f}" for label, dice in options.items()),
        f"nested per fold: {' '.join(f'{d:.4f}' for d in nested['per_fold'])}",
        f"nested option per fold: {' '.join(nested.get('picked', []))}",
        f"holdout: {holdout}"
        + (" (threshold chosen on it: optimistic)" if source == "holdout" else ""),
        *_holdout_lines(s, source),
    ]
    return "\n".join(lines) + "\n"


def _cost_line(cost: dict | None) -> str:
    if not cost or cost.get("seconds_per_record") is None:
        return "cost: unknown (a blended config's summary.json has no prediction_cost)"
    devices = sorted({d for d in cost["devices"].values() if d})
    limit = cost.get("max_seconds_per_record")
    return (
        f"cost: {cost['seconds_per_record']:.4g} s per record (every fold x TTA of the blended "
        f"configs), {cost['seconds_for_2000_records']:.0f} s for 2,000 records"
        + ("" if limit is None else f"; limit {limit:g} s per record")
        + f"; measured on {', '.join(devices) or 'an unknown device'}"
    )


def _holdout_lines(scores: dict, source: str) -> list[str]:
    check, crossfit = scores.get("holdout_threshold"), scores.get("holdout_crossfit")
    lines = []
    if check:
        lines.append(
            f"holdout best threshold: {check['best_threshold']:.4f} (dice {check['best_dice']:.4f})"
            f" vs {check['dice_at_oof_threshold']:.4f} at the OOF threshold"
        )
        if check["warning"]:
            lines.append(
                f"WARNING: the holdout's best threshold gains {check['gap']:.4f} dice over the "
                f"OOF threshold (> {check['warning_above']:g}): the fold-mean predictions want "
                "another threshold"
                + ("; consider --threshold-from holdout" if source == "oof" else "")
            )
    if crossfit:
        lines.append(
            f"holdout threshold, cross-fitted on {len(crossfit['per_split'])} random halvings: "
            f"{crossfit['mean']:.4f} +- {crossfit['std']:.4f} "
            f"(min {min(crossfit['per_split']):.4f}, max {max(crossfit['per_split']):.4f})"
        )
    return lines


def write_class_report(report_dir: Path, blend: BlendFile) -> list[Path]:
    """The report of a per-class blend: the selection path and ``report.txt`` (one row per
    class and per config)."""
    report_dir = Path(report_dir)
    paths = [plot_selection_path(blend.scores["selection_path"], report_dir / "selection.png")]
    text = report_dir / "report.txt"
    write_text(text, format_class_table(blend))
    return [*paths, text]


def format_class_table(blend: BlendFile) -> str:
    """A short text summary of a per-class blend: weights, one row per class, one per config."""
    rule, s = blend.rule, blend.scores
    weights = ", ".join(f"{n} x{w}" for n, w in rule.weights.items())
    metric = f"{s['metric']} (empty pairs score {s['empty_score']:g})"
    lines = [
        f"metric: {metric}",
        f"weights: {weights} [{s['weights']}, threshold from {rule.threshold_from}]",
        _cost_line(blend.cost),
        "",
        f"{'class':16s} {'OOF':>8s} {'nested':>8s} {'holdout':>8s} {'thr':>6s} "
        f"{'min_px':>6s} {'min_cc':>6s}",
    ]
    for name, c in s["per_class"].items():
        holdout = "-" if c["holdout"] is None else f"{c['holdout']:.4f}"
        lines.append(
            f"{name:16s} {c['dice']:8.4f} {c['nested']:8.4f} {holdout:>8s} "
            f"{c['threshold']:6.3f} {c['min_pixels']:6d} {c['min_component']:6d}"
        )
    lines += ["", f"{'':16s} {'OOF':>8s} {'nested':>8s}"]
    for name, c in s["per_config"].items():
        lines.append(f"{name:16s} {c['dice']:8.4f} {c['nested']:8.4f}")
    nested = s["nested"]
    holdout = "-" if s["holdout"] is None else f"{s['holdout']:.4f}"
    lines += [
        f"{'blend':16s} {s['blend_oof']:8.4f} {nested['pooled']:8.4f}",
        f"blend without postprocessing (OOF): {s['blend_oof_no_postprocess']:.4f}",
        "weights, each option fixed (only `nested` is honest): "
        + ", ".join(f"{label} {dice:.4f}" for label, dice in nested["options"].items()),
        f"nested per fold: {' '.join(f'{d:.4f}' for d in nested['per_fold'])}",
        f"nested option per fold: {' '.join(nested['picked'])}",
        f"holdout: {holdout}"
        + (" (thresholds chosen on it: optimistic)" if rule.threshold_from == "holdout" else ""),
    ]
    return "\n".join(lines) + "\n"
