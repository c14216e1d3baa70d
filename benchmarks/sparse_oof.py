"""Sparse OOF at the steel task's real size: disk per config, the blend's time and memory.

Synthetic probabilities written straight to the sparse format (``oof_sparse.ekz``): most
pixels near 0, defects as rectangular blobs, 85 % of (image, class) pairs empty, each
config's blob a little wider than the label (its codes between the floor and ~0.45 there)
plus some false-positive blobs; labels are a sparse file too (code 1, floor 1). The steel
files are ``(images, 4, 256, 1600)``, and the search is the one ``ek blend --oof`` runs on
the steel task: per class, mean Dice over (image, class) pairs (:func:`search_classes`).

Rows of the table (each step in a child process: wall time and peak ``RssAnon``):

- OOF bytes per config (goal <= 1 GB);
- the candidate pass over every config at N and N/2 images (growth);
- the full search (``ek blend --oof``'s: 25 steps, min-pixel + min-component grid per
  class) at ``--search-images`` and half of it (growth);
- contrails' shape (``--contrails-images`` x 256 x 256, 5 configs, one class, global
  dice): the search on dense memmaps and on sparse files, ratio in the same run;
- ``--cv`` (``--cv-only``): records/s of ``ek cv``'s OOF prediction step (model, codes and
  writer), dense against sparse (CPU).

Usage: ``python benchmarks/sparse_oof.py --data /tmp/steel`` (full size: ~1 GB of disk per
config, ~10 min on 2 cores, ~1 of them to write the files); ``--images 500
--search-images 250`` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import load_note, run_measured  # noqa: E402

from ensemble_kit.sparse_oof import SparseCodes, save_sparse  # noqa: E402

FLOOR = 13
STEEL_IMAGES, STEEL_CLASSES = 12_568, 4
CHUNK = 1024


def blobs(rng, n_units: int, height: int, width: int, empty: float) -> dict:
    """Label rectangles (row0, row1, col0, col1) of the non-empty units; -1 where empty."""
    full = rng.random(n_units) >= empty
    bh = rng.integers(height // 12, height // 2, n_units)
    bw = rng.integers(width // 40, width // 4, n_units)
    r0, c0 = rng.integers(0, height - bh), rng.integers(0, width - bw)
    rect = np.stack([r0, r0 + bh, c0, c0 + bw], axis=1)
    rect[~full] = -1
    return {"rect": rect}


def unit_runs(rect: np.ndarray, width: int) -> tuple[np.ndarray, ...]:
    """Runs (per unit count, start, length) covering each rectangle; -1 rows: no run."""
    rows = np.where(rect[:, 0] >= 0, rect[:, 1] - rect[:, 0], 0)
    unit = np.repeat(np.arange(len(rect)), rows)
    row = rect[unit, 0] + (np.arange(rows.sum()) - np.repeat(np.cumsum(rows) - rows, rows))
    return (
        rows,
        (row * width + rect[unit, 2]).astype(np.uint32),
        (rect[unit, 3] - rect[unit, 2]).astype(np.uint32),
    )


def config_rect(rng, label: np.ndarray, height: int, width: int, fp: float) -> np.ndarray:
    """A config's blob: the label grown by a few pixels, missing 5 %, false blobs in ``fp``."""
    grow = rng.integers(2, 10, len(label))
    rect = np.stack(
        [
            np.maximum(label[:, 0] - grow, 0),
            np.minimum(label[:, 1] + grow, height),
            np.maximum(label[:, 2] - grow, 0),
            np.minimum(label[:, 3] + grow, width),
        ],
        axis=1,
    )
    rect[(label[:, 0] < 0) | (rng.random(len(label)) < 0.05)] = -1
    false = (label[:, 0] < 0) & (rng.random(len(label)) < fp)
    r0, c0 = rng.integers(0, height - 20, len(label)), rng.integers(0, width - 60, len(label))
    rect[false] = np.stack([r0, r0 + 20, c0, c0 + 60], axis=1)[false]
    return rect


def write_set(
    folder: Path, units: int, shape: tuple[int, int], configs: int, seed=0, classes: int = 1
) -> None:
    """``labels.ekz`` and ``c<i>.ekz`` of ``units`` units, generated chunk by chunk; with
    ``classes`` > 1 the files are ``(units / classes, classes, H, W)`` (row-major units)."""
    folder.mkdir(parents=True, exist_ok=True)
    height, width = shape
    parts: dict[str, list] = {name: [] for name in ["labels", *[f"c{i}" for i in range(configs)]]}
    for lo in range(0, units, CHUNK):
        rng = np.random.default_rng([seed, lo])
        label = blobs(rng, min(CHUNK, units - lo), height, width, 0.85)["rect"]
        parts["labels"].append(_encoded(label, width, None, label))
        for i in range(configs):
            rect = config_rect(rng, label, height, width, 0.05)
            parts[f"c{i}"].append(_encoded(rect, width, rng, label))
    for name, chunks in parts.items():
        arrays = [np.concatenate(a) for a in zip(*chunks)]
        save_sparse(
            folder / f"{name}.ekz",
            (units, height, width) if classes == 1 else (units // classes, classes, height, width),
            1 if name == "labels" else FLOOR,
            {
                "run_offset": np.concatenate([[0], np.cumsum(arrays[0])]),
                "run_start": arrays[1],
                "run_length": arrays[2],
                "code_offset": np.concatenate([[0], np.cumsum(arrays[3])]),
                "codes": arrays[4],
                "below_positives": arrays[5],
            },
        )


def _encoded(rect: np.ndarray, width: int, rng, label: np.ndarray) -> tuple:
    """One chunk's arrays; codes high inside the label rectangle, low (>= floor) around it."""
    per_unit, start, length = unit_runs(rect, width)
    n = int(length.sum())
    unit = np.repeat(np.repeat(np.arange(len(rect)), per_unit), length)
    first = np.repeat(start.astype(np.int64), length)
    flat = first + np.arange(n) - np.repeat(np.cumsum(length, dtype=np.int64) - length, length)
    row, col = flat // width, flat % width
    lab = label[unit]
    inside = (row >= lab[:, 0]) & (row < lab[:, 1]) & (col >= lab[:, 2]) & (col < lab[:, 3])
    if rng is None:
        codes = np.ones(n, dtype=np.uint8)
    else:
        codes = rng.integers(FLOOR, 115, n).astype(np.uint8)
        codes[inside] = rng.integers(60, 256, int(inside.sum())).astype(np.uint8)
    counts = np.bincount(unit, minlength=len(rect))
    label_area = np.where(
        label[:, 0] >= 0, (label[:, 1] - label[:, 0]) * (label[:, 3] - label[:, 2]), 0
    )
    below = label_area - np.bincount(unit, inside, minlength=len(rect)).astype(np.int64)
    return per_unit, start, length, counts, codes, below


def child(args) -> None:
    """One measured step: ``cands`` or ``search`` on a folder's files; prints a JSON line."""
    from ensemble_kit.blend.class_search import search_classes
    from ensemble_kit.blend.ensemble_search import search
    from ensemble_kit.blend.mean_dice import class_candidates

    folder = Path(args.child)
    members = [SparseCodes(p) for p in sorted(folder.glob("c*.ekz"))]
    labels: object = SparseCodes(folder / "labels.ekz")
    if args.dense:
        members = [np.load(p, mmap_mode="r") for p in sorted(folder.glob("c*.npy"))]
        labels = np.load(folder / "labels.npy", mmap_mode="r")
    folds = np.arange(len(members[0])) % 5
    started = time.perf_counter()
    if args.step == "cands":
        cands = class_candidates(members, labels, folds)
        out = {"candidates": sum(len(c.labels) for c in cands)}
    elif labels.ndim == 4:
        phases = _timed_phases()
        result = search_classes(members, labels, folds, steps=25)
        out = {"dice": result.choice.dice, "weights": result.choice.weights.tolist(), **phases}
    else:
        phases = _timed_phases()
        result = search(members, labels, folds, steps=25)
        out = {"dice": result.choice.dice, "weights": result.choice.weights.tolist(), **phases}
    out["seconds"] = time.perf_counter() - started
    print(json.dumps(out))


def _timed_phases() -> dict:
    """Wrap the searches' three phases (candidate pass, greedy selection, threshold tables)
    so that each adds its seconds to the returned dict (``tables``: how many were built;
    ``moves``: how many weight vectors the greedy scored; ``table_seconds``: each table's)."""
    from ensemble_kit.blend import class_search, ensemble_search, mean_dice, nested, scorer

    phases: dict[str, float] = {}
    for module, name, key in [
        (ensemble_search, "build_candidates", "t_candidates"),
        (nested, "greedy_paths", "t_greedy"),
        (nested, "threshold_tables", "t_tables"),
        (class_search, "class_candidates", "t_candidates"),
        (class_search, "greedy_paths", "t_greedy"),
        (class_search, "mean_dice_tables", "t_tables"),
    ]:
        setattr(module, name, _timer(getattr(module, name), key, phases))
    for cls, at in [(mean_dice.MeanDiceScorer, 1), (scorer.Scorer, 2)]:
        cls._evaluate = _counter(cls._evaluate, at, phases)
    return phases


def _counter(evaluate, at: int, phases: dict):
    """Count the moves a scorer's ``_evaluate`` scores (its keys are argument ``at``)."""

    def counted(self, *args):
        phases["moves"] = phases.get("moves", 0) + len(args[at - 1])
        return evaluate(self, *args)

    return counted


def _timer(fn, key: str, phases: dict):
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - started
            phases[key] = phases.get(key, 0.0) + seconds
            if key == "t_tables":
                phases["tables"] = phases.get("tables", 0) + 1
                phases.setdefault("table_seconds", []).append(round(seconds, 2))

    return timed


def measured(folder: Path, step: str, dense: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", str(folder), "--step", step]
    result = run_measured(command + (["--dense"] if dense else []))
    return {**result.last_json, "wall": result.seconds, "mb": result.peak_mb}


def densify(folder: Path) -> None:
    """Dense ``.npy`` copies of a small set (contrails' shape), for the dense path."""
    for path in folder.glob("*.ekz"):
        sparse = SparseCodes(path)
        out = np.lib.format.open_memmap(path.with_suffix(".npy"), "w+", np.uint8, sparse.shape)
        for lo in range(0, len(sparse), 256):
            out[lo : lo + 256] = sparse[lo : lo + 256]
        out.flush()


def _row(name: str, r: dict, extra: str = "") -> str:
    return f"| {name} | {r['wall']:.1f} s | {r['mb']:,.0f} MB | {extra} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=STEEL_IMAGES, help="steel images (x 4)")
    parser.add_argument("--search-images", type=int, default=STEEL_IMAGES)
    parser.add_argument("--configs", type=int, default=5)
    parser.add_argument("--contrails-images", type=int, default=2200)
    parser.add_argument("--data", type=Path, help="keep the generated files here")
    parser.add_argument("--cv", action="store_true", help="also measure ek cv records/s")
    parser.add_argument("--cv-only", action="store_true", help="only measure ek cv records/s")
    parser.add_argument("--cv-repeats", type=int, default=2, help="ek cv runs per format")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    root = args.data or Path(tempfile.mkdtemp(prefix="ek-sparse-"))
    print(f"# sparse OOF, {args.configs} configs, {load_note()}")
    print("| step | time | peak RssAnon | notes |\n|---|---:|---:|---|")
    if args.cv_only:
        cv_rate(root, args.cv_repeats)
        return
    writer_cost(root)
    steel(root, args)
    contrails(root, args)
    if args.cv:
        cv_rate(root, args.cv_repeats)


def steel(root: Path, args) -> None:
    sizes = {"full": args.images, "half": args.images // 2}
    sizes |= {"search": args.search_images, "search_half": args.search_images // 2}
    for images in sorted(set(sizes.values())):
        folder = root / f"steel{images}"
        if not (folder / "labels.ekz").is_file():
            started = time.perf_counter()
            write_set(folder, images * STEEL_CLASSES, (256, 1600), args.configs, 0, STEEL_CLASSES)
            print(f"| generate {images:,} x 4 units | {time.perf_counter() - started:.1f} s | | |")
    full = SparseCodes(root / f"steel{args.images}" / "c0.ekz")
    stored = int(full.unit_counts().sum()) / (len(full) * STEEL_CLASSES * full.unit_pixels)
    per_config = full.nbytes_on_disk() * STEEL_IMAGES / args.images
    print(
        f"| OOF bytes per config | | | {full.nbytes_on_disk() / 1e9:.3f} GB for {args.images:,} "
        f"images ({per_config / 1e9:.3f} GB at 12,568 x 4 x 256 x 1600); {stored:.2%} of "
        "pixels stored |"
    )
    cands = {name: measured(root / f"steel{sizes[name]}", "cands") for name in ("half", "full")}
    for name, r in cands.items():
        print(_row(f"candidate pass, {sizes[name]:,} images", r, f"{r['candidates']:,} candidates"))
    print(f"| growth half -> full | x{_ratio(cands, 'wall')} | x{_ratio(cands, 'mb')} | |")
    search = {
        name: measured(root / f"steel{sizes[name]}", "search") for name in ("search_half", "search")
    }
    for name, r in search.items():
        note = f"mean dice {r['dice']:.4f}; {_phases(r)}"
        print(_row(f"search (ek blend --oof's), {sizes[name]:,} images", r, note))
    ratio = search["search"]["wall"] / search["search_half"]["wall"]
    mb = search["search"]["mb"] / search["search_half"]["mb"]
    print(f"| growth half -> full (search) | x{ratio:.2f} | x{mb:.2f} | |")


def _phases(r: dict) -> str:
    tables = r.get("table_seconds", [])
    return (
        f"candidates {r['t_candidates']:.1f} s, greedy {r['t_greedy']:.1f} s "
        f"({r.get('moves', 0)} scored moves), threshold tables {r['t_tables']:.1f} s "
        f"({len(tables)} tables: {', '.join(f'{t:.1f}' for t in tables)} s)"
    )


def _ratio(pair: dict, key: str) -> str:
    return f"{pair['full'][key] / pair['half'][key]:.2f}"


def contrails(root: Path, args) -> None:
    folder = root / "contrails"
    if not (folder / "labels.npy").is_file():
        write_set(folder, args.contrails_images, (256, 256), args.configs, seed=1)
        densify(folder)
    dense, sparse = measured(folder, "search", dense=True), measured(folder, "search")
    note = "same choice" if dense["weights"] == sparse["weights"] else "weights differ"
    print(
        _row(
            f"contrails shape {args.contrails_images:,} x 256^2, dense search",
            dense,
            _phases(dense),
        )
    )
    print(
        _row(
            "the same, sparse files",
            sparse,
            f"x{sparse['wall'] / dense['wall']:.2f} time, x{sparse['mb'] / dense['mb']:.2f} "
            f"memory vs dense; {note}; {_phases(sparse)}",
        )
    )


def writer_cost(root: Path) -> None:
    """ms per record of ``to_codes`` + the OOF writer, dense against sparse (best of 3)."""
    from ensemble_kit.oof import ArrayWriter, to_codes
    from ensemble_kit.sparse_oof import SparseWriter

    rng = np.random.default_rng(0)
    for shape in [(64, 256, 256), (16, 4, 256, 1600)]:
        p = np.clip(rng.normal(0.01, 0.01, shape), 0, 1).astype(np.float32)
        p[..., 40:90, 50:200] = rng.random(p[..., 40:90, 50:200].shape) * 0.9 + 0.1
        cost = {}
        for fmt in ("dense", "sparse"):
            best = np.inf
            for _ in range(3):
                started = time.perf_counter()
                units = (int(np.prod(shape[:-2])), *shape[-2:])
                writer = (
                    SparseWriter(root / "w.ekz", shape, FLOOR)
                    if fmt == "sparse"
                    else ArrayWriter(root / "w.npy", units)
                )
                with writer:
                    codes = to_codes(p)
                    writer.write(slice(None), codes if fmt == "sparse" else codes.reshape(units))
                best = min(best, time.perf_counter() - started)
            cost[fmt] = best / shape[0] * 1e3
        print(
            f"| OOF writer, {' x '.join(map(str, shape[1:]))} record | | | dense "
            f"{cost['dense']:.2f} ms, sparse {cost['sparse']:.2f} ms per record |"
        )


def cv_rate(root: Path, repeats: int) -> None:
    """Records/s of ``ek cv``'s OOF prediction step, dense against sparse (CPU).

    ``ek cv``'s own ``prediction_cost`` times the model only (the writer runs outside its
    clock), so it cannot see the format. Here the whole step is timed as ``ek cv`` runs it:
    the quick config's model (``tu-test_resnet``, 256 px, batch 8) on a batch, ``to_codes``
    and the OOF writer. The model's random weights would predict ~0.5 everywhere, so the
    codes written are those of a trained model's output instead (``_trained_like``: near 0,
    one blob per record). Formats alternate, ``repeats`` times; best of each.
    """
    import torch

    from ensemble_kit.api import build_model, load_config, predict_probs, to_codes
    from ensemble_kit.oof import codes_writer

    folder = root / "cv_rate"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "q.yaml").write_text(
        "name: q\ninput: {channels: ash, frames: [4]}\nmodel: {arch: Unet, encoder: "
        "tu-test_resnet}\ntrain: {epochs: 1, batch_size: 8}\n"
    )
    model = build_model(load_config(folder / "q.yaml"), pretrained=False).eval()
    images, probs = torch.rand(8, 3, 256, 256), _trained_like(8)
    n_records = 64
    rates: dict[str, list[float]] = {"dense": [], "sparse": []}
    for _ in range(repeats):
        for fmt in rates:
            started = time.perf_counter()
            with codes_writer(
                folder / "oof.npy", (n_records, 256, 256), fmt == "sparse", FLOOR
            ) as w:
                for lo in range(0, n_records, 8):
                    with torch.no_grad():
                        predict_probs([model], images)
                    w.write(slice(lo, lo + 8), to_codes(probs))
            rates[fmt].append(n_records / (time.perf_counter() - started))
    best = {fmt: max(r) for fmt, r in rates.items()}
    print(
        f"| ek cv OOF prediction (model + codes + writer), records/s, best of {repeats} | | | "
        f"dense {best['dense']:.1f}, sparse {best['sparse']:.1f}: "
        f"x{best['sparse'] / best['dense']:.3f} |"
    )


def _trained_like(n: int) -> np.ndarray:
    """float32 ``(n, 256, 256)`` probabilities like a trained model's: near 0, one blob."""
    rng = np.random.default_rng(0)
    p = np.clip(rng.normal(0.01, 0.01, (n, 256, 256)), 0, 1).astype(np.float32)
    p[..., 40:90, 50:200] = rng.random(p[..., 40:90, 50:200].shape) * 0.9 + 0.1
    return p


if __name__ == "__main__":
    main()
