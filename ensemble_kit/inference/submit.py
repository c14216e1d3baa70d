"""``ek submit``: fold x config ensemble with TTA, blended and postprocessed as ``blend.json``
says, written as a validated Kaggle submission.

Records are read, predicted and encoded in batches; models are loaded once. Per config the
fold models' TTA-merged probabilities are averaged and stored as uint8 codes exactly as the
holdout OOF was, so that the blend, threshold and postprocessing chosen by ``ek blend``
apply unchanged (:func:`ensemble_kit.blend.apply_blend` is the one code path).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import __version__
from ..blend.apply import apply_blend, blend_histogram, verify_blend
from ..blend.threshold import top_fraction_threshold
from ..config import Config, InputSpec, load_config, tta_list
from ..data.cache import band_stats
from ..data.records import build_input, has_labels, list_records, load_mask
from ..data.splits import read_meta
from ..errors import EkError
from ..files import atomic_path, digest_file, write_json
from ..layout import DEFAULT_SUBMISSION, Layout, record_dir
from ..metrics import dice_from_counts
from ..oof import to_uint8
from ..runtime import resolve_device
from .checkpoints import load_fold_model
from .rle import decode, encode
from .submission import check_submission, write_submission
from .tta import predict_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmitRequest:
    layout: Layout
    data_root: Path | None = None
    split: str = "test"
    out: Path = DEFAULT_SUBMISSION
    batch_size: int = 16
    device: str | None = None
    exported: bool = False


@dataclass
class Timer:
    """Seconds spent per stage."""

    seconds: dict = field(default_factory=lambda: {"read": 0.0, "model": 0.0, "encode": 0.0})

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - since
        return now


class _RecordInputs(Dataset):
    """Reads each record once and builds the input of every distinct input spec."""

    def __init__(self, folders: list[Path], specs: list[InputSpec], stats: list[dict | None]):
        self.folders, self.specs, self.stats = folders, specs, stats

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int):
        return tuple(
            torch.from_numpy(build_input(self.folders[index], s, st))
            for s, st in zip(self.specs, self.stats)
        )


@dataclass
class Ensemble:
    """Configs with non-zero blend weight, their fold models and input specs."""

    configs: dict[str, Config]
    models: dict[str, list[torch.nn.Module]]
    specs: list[InputSpec]

    def spec_index(self, name: str) -> int:
        return self.specs.index(self.configs[name].input)


def load_ensemble(layout: Layout, blend: dict, device: torch.device, exported: bool) -> Ensemble:
    """Load every fold model of every blended config once."""
    configs, models = {}, {}
    n_folds = read_meta(layout)["n_folds"]
    for name in blend["configs"]:
        config = load_config(layout.config_dir(name) / "config.yaml")
        configs[name] = config
        if exported:
            from .export import load_exported

            models[name] = load_exported(layout, name, n_folds, device)
        else:
            models[name] = [
                load_fold_model(config, layout.fold_dir(name, k), device) for k in range(n_folds)
            ]
    specs = list(dict.fromkeys(c.input for c in configs.values()))
    return Ensemble(configs, models, specs)


def predict_codes(
    ensemble: Ensemble,
    layout: Layout,
    data_root: Path,
    split: str,
    batch_size: int,
    device,
    timer: Timer,
):
    """Yield ``(record_ids, {config: uint8 codes (B, H, W)})`` batch by batch."""
    ids = list_records(data_root, split)
    if not ids:
        raise EkError(f"{Path(data_root) / split}: no records to predict")
    train_root = Path(read_meta(layout)["data_root"])
    stats = [
        band_stats(layout, train_root, s) if s.channels == "bands" else None for s in ensemble.specs
    ]
    folders = [record_dir(data_root, split, rid) for rid in ids]
    workers = 0 if len(ids) < 64 else 2
    loader = DataLoader(
        _RecordInputs(folders, ensemble.specs, stats), batch_size=batch_size, num_workers=workers
    )
    start, clock = 0, time.perf_counter()
    for inputs in tqdm(loader, desc=f"predict {split}", unit="batch", leave=False):
        clock = timer.add("read", clock)
        codes = {}
        for name, config in ensemble.configs.items():
            x = inputs[ensemble.spec_index(name)].to(device)
            codes[name] = to_uint8(predict_inputs(ensemble.models[name], config, x))
        clock = timer.add("model", clock)
        yield ids[start : start + len(codes[name])], codes
        start += len(codes[name])


def run_submit(request: SubmitRequest) -> dict:
    """Predict a split, validate the CSV, write it atomically; returns the provenance."""
    layout = request.layout
    blend = verify_blend(layout)
    data_root = Path(request.data_root or read_meta(layout)["data_root"])
    device = resolve_device(request.device)
    started = time.perf_counter()
    ensemble = load_ensemble(layout, blend, device, request.exported)
    timer = Timer()
    batches = predict_codes(
        ensemble, layout, data_root, request.split, request.batch_size, device, timer
    )
    ids, rles, shape = _blend_batches(blend, batches, timer)
    out = Path(request.out)
    with atomic_path(out) as tmp:
        write_submission(tmp, ids, rles)
        checked = check_submission(tmp, data_root, request.split, shape=shape)
    provenance = _provenance(layout, blend, ensemble, request, ids, timer, started, checked)
    if request.split != "test" and all(has_labels(data_root, request.split, r) for r in ids):
        provenance["dice"] = _dice_against_masks(out, data_root, request.split, ids)
    write_json(out.with_suffix(".json"), provenance)
    return provenance


def _blend_batches(
    blend: dict, batches, timer: Timer
) -> tuple[list[str], list[str], tuple[int, int]]:
    """Threshold, postprocess and encode batch by batch; top-fraction mode first collects the
    blend sums of the whole split in a temporary memmap to find its threshold."""
    if blend["threshold_mode"] == "top_fraction":
        return _blend_top_fraction(blend, batches, timer)
    ids, rles, shape = [], [], (256, 256)
    for batch_ids, codes in batches:
        clock = time.perf_counter()
        masks = apply_blend(blend, codes)
        ids += batch_ids
        rles += [encode(mask) for mask in masks]
        shape = masks.shape[1:]
        timer.add("encode", clock)
    return ids, rles, shape


def _blend_top_fraction(blend: dict, batches, timer: Timer):
    weights = blend["configs"]
    ids, shape = [], None
    with tempfile.TemporaryDirectory(prefix="ek-submit-") as scratch:
        paths = {name: Path(scratch) / f"{i}.u8" for i, name in enumerate(weights)}
        handles = {name: open(path, "wb") for name, path in paths.items()}
        for batch_ids, codes in batches:
            ids += batch_ids
            shape = codes[next(iter(weights))].shape[1:]
            for name in weights:
                handles[name].write(np.ascontiguousarray(codes[name]).tobytes())
        for handle in handles.values():
            handle.close()
        stored = {
            n: np.memmap(p, np.uint8, "r", shape=(len(ids), *shape)) for n, p in paths.items()
        }
        histogram = sum(
            blend_histogram(blend, {n: stored[n][s : s + 64] for n in weights})
            for s in range(0, len(ids), 64)
        )
        threshold = top_fraction_threshold(histogram, blend["top_fraction"])
        rles = []
        for start in range(0, len(ids), 64):
            clock = time.perf_counter()
            chunk = {n: np.asarray(stored[n][start : start + 64]) for n in weights}
            rles += [encode(mask) for mask in apply_blend(blend, chunk, threshold_sum=threshold)]
            timer.add("encode", clock)
        del stored
    return ids, rles, shape


def _dice_against_masks(path: Path, data_root: Path, split: str, ids: list[str]) -> float:
    """Global dice of a written submission against the split's masks."""
    rows = dict(pd.read_csv(path, dtype=str, keep_default_na=False).itertuples(index=False))
    tp = n_pred = n_true = 0
    for rid in ids:
        mask = load_mask(record_dir(data_root, split, rid)).astype(bool)
        predicted = decode(rows[rid], mask.shape)
        tp += int(np.count_nonzero(predicted & mask))
        n_pred += int(np.count_nonzero(predicted))
        n_true += int(np.count_nonzero(mask))
    return dice_from_counts(tp, n_pred - tp, n_true - tp)


def _provenance(layout, blend, ensemble, request, ids, timer, started, checked) -> dict:
    total = time.perf_counter() - started
    return {
        "submission": str(request.out),
        "split": request.split,
        "records": len(ids),
        "blend_json_digest": digest_file(layout.blend_json),
        "configs": {
            n: {
                "weight": blend["configs"][n],
                "folds": len(ensemble.models[n]),
                "tta": list(tta_list(c)),
                "tta_merge": c.tta_merge,
            }
            for n, c in ensemble.configs.items()
        },
        "threshold": blend.get("threshold"),
        "min_pixels": blend.get("min_pixels"),
        "min_component": blend.get("min_component"),
        "exported": request.exported,
        "version": __version__,
        "seconds": total,
        "records_per_second": len(ids) / max(total, 1e-9),
        "seconds_by_stage": timer.seconds,
        "check": checked,
    }
