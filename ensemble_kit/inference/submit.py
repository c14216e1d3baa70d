"""``ek submit``: fold x config ensemble with TTA, blended and postprocessed as ``blend.json``
says, written as a validated Kaggle submission.

The models come from the fold checkpoints (``best.pt``) or, with ``--exported``, from the
``ek export`` bundle; either way records are predicted by :mod:`.ensemble`, the code path the
Kaggle notebook runs (:func:`.bundle.predict_bundle`): inputs quantised as the cache stores
them, fold models averaged as ``holdout.npy`` was, so ``--split validation`` reproduces the
holdout codes and the blend chosen by ``ek blend`` applies unchanged.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import __version__
from ..blend.rule import BlendRule
from ..blend.verify import verify_blend
from ..config import load_config, tta_list
from ..data.cache import band_stats
from ..data.images import has_masks
from ..data.records import has_labels, load_mask
from ..data.splits import read_meta
from ..errors import EkError
from ..files import atomic_group, digest_file
from ..layout import DEFAULT_SUBMISSION, Layout, bundle_files, record_dir
from ..metrics import dice_from_counts
from ..runtime import resolve_devices
from ..task import model_channels, workdir_task
from .bundle import load_bundle
from .checkpoints import load_fold_model
from .ensemble import Ensemble, PredictOptions, predict_submission
from .images import csv_score
from .rle import decode

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
    precision: str = "auto"


def load_ensemble(layout: Layout, rule: BlendRule, device: torch.device) -> Ensemble:
    """Every fold checkpoint of every blended config, loaded once (no network: the
    architecture is built without pretrained weights)."""
    configs, models, stats = {}, {}, {}
    meta = read_meta(layout)
    task = workdir_task(layout, meta)
    for name in rule.weights:
        config = load_config(layout.config_yaml(name))
        configs[name] = config
        channels = model_channels(config, task)
        models[name] = [
            load_fold_model(config, layout.fold_dir(name, k), device, channels)
            for k in range(meta["n_folds"])
        ]
        stats[name] = (
            band_stats(layout, Path(meta["data_root"]), config.input)
            if config.input.channels == "bands"
            else None
        )
    return Ensemble(configs, models, stats, weights=dict(rule.weights), task=task)


def load_exported_ensemble(layout: Layout, device: torch.device) -> Ensemble:
    """The ``ek export`` bundle's models, refused when its blend is not the workdir's."""
    copied = bundle_files(layout.export_dir)["blend"]
    if not copied.is_file() or digest_file(copied) != digest_file(layout.blend_json):
        raise EkError(f"{copied}: missing or not the current {layout.blend_json}; rerun ek export")
    ensemble, _ = load_bundle(layout.export_dir, device)
    return ensemble


def run_submit(request: SubmitRequest) -> dict:
    """Predict a split, validate the CSV, write it and its JSON as one unit; returns the
    provenance (which holds the CSV's digest)."""
    layout, out = request.layout, Path(request.out)
    if out.is_dir():
        raise EkError(f"--out {out}: is a folder; give a file name")
    rule = verify_blend(layout)
    data_root = Path(request.data_root or read_meta(layout)["data_root"])
    devices = resolve_devices(request.device)
    started = time.perf_counter()
    if request.exported:
        workers = [(load_exported_ensemble(layout, device), device) for device in devices]
    else:
        workers = [(load_ensemble(layout, rule, device), device) for device in devices]
    if len(workers) > 1:
        log.info("predicting on %s, one worker each", ", ".join(map(str, devices)))
    progress = functools.partial(tqdm, desc=f"predict {request.split}", unit="batch", leave=False)
    ensemble = workers[0][0]
    options = PredictOptions(precision=request.precision)
    with atomic_group(out, out.with_suffix(".json")) as (csv_tmp, json_tmp):
        result = predict_submission(
            ensemble, rule, data_root, request.split, csv_tmp, request.batch_size,
            progress=progress, options=options, workers=workers,
        )  # fmt: skip
        result["check"]["path"] = str(out)
        provenance = _provenance(layout, rule, ensemble, request, result, started)
        provenance["csv_digest"] = digest_file(csv_tmp)
        ids = result["ids"]
        if ensemble.images is not None:
            if request.split != "test" and has_masks(ensemble.images, data_root, request.split):
                task = ensemble.images
                provenance["metric"] = task.metric
                provenance["score"] = csv_score(csv_tmp, task, data_root, request.split)
        elif request.split != "test" and all(has_labels(data_root, request.split, r) for r in ids):
            provenance["dice"] = _dice_against_masks(csv_tmp, data_root, request.split, ids)
        json_tmp.write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return provenance


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


def _threshold(applied, rule: BlendRule):
    """The probability threshold applied (one per class with several classes)."""
    scale = 255.0 * rule.weight_total
    if isinstance(applied, tuple):
        return [t / scale for t in applied]
    return applied / scale


def _provenance(layout, rule: BlendRule, ensemble, request, result, started) -> dict:
    total = time.perf_counter() - started
    return {
        "submission": str(request.out),
        "split": request.split,
        "records": result["records"],
        "blend_json_digest": digest_file(layout.blend_json),
        "configs": {
            n: {
                "weight": rule.weights[n],
                "folds": len(ensemble.models[n]),
                "tta": list(tta_list(c)),
                "tta_merge": c.tta_merge,
            }
            for n, c in ensemble.configs.items()
        },
        "rule": rule.to_dict(),
        "threshold_sum_applied": result["threshold_sum"],
        "threshold": _threshold(result["threshold_sum"], rule),
        "min_pixels": rule.min_pixels,
        "min_component": rule.min_component,
        "exported": request.exported,
        "precision": request.precision,
        "version": __version__,
        "seconds": total,
        "records_per_second": result["records"] / max(total, 1e-9),
        "seconds_by_stage": result["seconds_by_stage"],
        "check": result["check"],
    }
