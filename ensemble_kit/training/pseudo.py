"""``ek pseudo``: soft pseudo-labels for the unlabelled frames, and reading them back for training.

Only frame 4 of the 8 is labelled. The 4th place trained a first round of fold models,
predicted the other frames with that ensemble and trained a second round on the labelled
frame plus pseudo-labelled ones. Here:

- :func:`window_spec` shifts a config's input window to a target frame: the config's frames
  are relative to the labelled frame 4, so frames ``(3, 4, 5)`` become ``(t-1, t, t+1)``;
  frames past either end are clamped to 0 or 7 (and logged).
- :func:`run_pseudo` predicts every pool record at each target frame with the blend's
  configs and weights, each config with its own TTA (the OOF code path), and stores the
  blend's weighted mean probability as a uint8 code. **No leakage**: a record of fold ``k``
  is predicted only by the fold-``k`` models, the ones that did not train on it (the rule
  of OOF). Which models produced each record is written beside it (``ids.csv``).
- :func:`pseudo_set` gives a second-round fold the pseudo-labelled frames of its *training*
  records only (never of its validation records), with inputs from the caches of the
  second-round config's own window shifted to each frame.

Files, under ``folds/pseudo/<name>/`` (written once, to a temporary folder renamed into
place): ``labels.npy`` uint8 ``(N, F, H, W)``, probability x 255 for pool record ``n`` at the
``f``-th target frame; ``ids.csv`` ``record_id,split,fold,models``; ``manifest.json`` (source
blend digest and weights, frames, windows and clamping, the models and their checkpoints'
digests, the splits digest).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..blend.rule import BlendRule
from ..blend.verify import verify_blend
from ..config import Config, InputSpec, load_config
from ..data.cache import ensure_inputs
from ..data.loader import ArraySet, to_float
from ..data.records import LABELLED_FRAME, N_FRAMES
from ..data.splits import HOLDOUT_FOLD, ensure_splits
from ..errors import EkError
from ..files import digest_file, read_json, write_json
from ..inference.checkpoints import load_fold_model
from ..inference.tta import predict_inputs
from ..layout import Layout, fold_files, pseudo_files
from ..names import check_name as check_folder_name
from ..oof import read_ids, to_codes, write_ids
from ..runtime import resolve_device
from ..task import task_path, workdir_task

log = logging.getLogger(__name__)

DEFAULT_FRAMES = (0, 1, 2, 3, 5, 6, 7)


@dataclass(frozen=True)
class PseudoRequest:
    """What ``ek pseudo`` was asked to do."""

    layout: Layout
    data_root: Path | None = None
    frames: tuple[int, ...] = DEFAULT_FRAMES
    name: str = "pseudo"
    device: str | None = None


def window_spec(spec: InputSpec, target: int) -> tuple[InputSpec, bool]:
    """The input spec with its window moved from the labelled frame to ``target``.

    Returns:
        The shifted spec and whether any frame fell past the ends and was clamped.
    """
    shifted = [f + target - LABELLED_FRAME for f in spec.frames]
    clamped = [min(max(f, 0), N_FRAMES - 1) for f in shifted]
    return replace(spec, frames=tuple(clamped)), clamped != shifted


def check_name(name: str) -> str:
    """A pseudo-label set's name: a plain folder name (:func:`ensemble_kit.names.check_name`)."""
    return check_folder_name(name, "--out", reserved=())


def pseudo_lines(layout: Layout, name: str, manifest: dict) -> list[str]:
    """What ``ek pseudo`` prints: each clamped window, then what it wrote."""
    lines = [
        f"{entry['config']}: frame {entry['frame']} clamped to {entry['window']}"
        for entry in manifest["clamped"]
    ]
    lines.append(
        f"wrote {layout.pseudo_dir(name)}: frames {manifest['frames']} of "
        f"{len(manifest['models'])} fold models (blend {manifest['blend_digest']})"
    )
    return lines


def check_frames(frames: tuple[int, ...]) -> tuple[int, ...]:
    if not frames:
        raise EkError("--frames: give at least one target frame")
    for frame in frames:
        if not 0 <= frame < N_FRAMES:
            raise EkError(f"--frames: {frame} is not a frame; frames are 0..{N_FRAMES - 1}")
    if len(set(frames)) != len(frames):
        raise EkError(f"--frames: {list(frames)} repeats a frame")
    return tuple(frames)


def window_set(
    layout: Layout,
    data_root: Path,
    spec: InputSpec,
    records: pd.DataFrame,
    frames: tuple[int, ...],
    labels: np.ndarray | None = None,
) -> ArraySet:
    """Records (columns ``record_id``, ``split``, ``label_row``) at each target frame.

    Members run frame by frame, each frame in the order of ``records``; inputs come from the
    cache of ``spec``'s window shifted to the frame. With ``labels`` (``(N, F, H, W)``) member
    ``(f, r)`` is labelled ``labels[label_row of r, f]``.
    """
    sources: list = []
    rows = np.zeros((len(frames) * len(records), 3), dtype=np.int64)
    for f, target in enumerate(frames):
        shifted, _ = window_spec(spec, target)
        for split, group in records.groupby("split", sort=False):
            entry = ensure_inputs(layout, data_root, str(split), shifted)
            positions = f * len(records) + records.index.get_indexer(group.index)
            rows[positions, 0] = len(sources)
            rows[positions, 1] = entry.index_of(group["record_id"].tolist())
            rows[positions, 2] = group["label_row"].to_numpy()
            label_source = None if labels is None else labels[:, f]
            sources.append((entry.arrays["inputs"], label_source))
    return ArraySet(tuple(sources), rows, soft=True)


def run_pseudo(request: PseudoRequest) -> dict:
    """Write the pseudo-label set (or reuse an identical one); returns its manifest."""
    layout, name = request.layout, check_name(request.name)
    task = workdir_task(layout)
    if task.kind != "contrails":
        raise EkError(
            f"{task_path(layout)}: task {task.name} has no frames; `ek pseudo` labels the "
            "unlabelled frames of contrail records"
        )
    frames = check_frames(tuple(request.frames))
    rule = verify_blend(layout)
    splits, meta = ensure_splits(layout, request.data_root, None)
    data_root = Path(request.data_root or meta["data_root"])
    source = _source(layout, rule, frames)
    existing = _existing_manifest(layout, name, source)
    if existing is not None:
        return existing
    configs = {c: load_config(layout.config_yaml(c)) for c in rule.weights}
    windows, clamped = windows_of(configs, frames)
    pool = splits[splits["fold"] != HOLDOUT_FOLD].reset_index(drop=True)
    pool["label_row"] = np.arange(len(pool))
    final = layout.pseudo_dir(name)
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        device = resolve_device(request.device)
        models = _predict_all(layout, data_root, rule, configs, pool, frames, device, tmp)
        manifest = {
            "name": name,
            **source,
            "windows": windows,
            "clamped": clamped,
            "models": _model_entries(layout, configs, models, meta["n_folds"]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        pool["models"] = [" ".join(models[k]) for k in pool["fold"]]
        write_ids(pseudo_files(tmp)["ids"], pool[["record_id", "split", "fold", "models"]])
        write_json(pseudo_files(tmp)["manifest"], manifest)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pseudo: wrote %s (%d records x %d frames)", final, len(pool), len(frames))
    return manifest


def _source(layout: Layout, rule: BlendRule, frames: tuple[int, ...]) -> dict:
    """What identifies a pseudo-label set: the blend it came from, the frames, the splits."""
    return {
        "blend_digest": digest_file(layout.blend_json),
        "frames": list(frames),
        "splits_digest": digest_file(layout.splits_csv),
        "weights": dict(rule.weights),
    }


def _existing_manifest(layout: Layout, name: str, source: dict) -> dict | None:
    path = pseudo_files(layout.pseudo_dir(name))["manifest"]
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if all(manifest.get(key) == value for key, value in source.items()):
        log.info("pseudo: %s is up to date (same blend, frames and splits)", path.parent)
        return manifest
    raise EkError(
        f"{path.parent}: made from another blend, frames or splits; second-round configs may "
        "depend on it: choose another --out NAME, or delete that folder to remake it"
    )


def _predict_all(layout, data_root, rule, configs, pool, frames, device, folder) -> dict:
    """Fill ``labels.npy`` fold by fold; returns the models of each fold (provenance)."""
    labels, models_of = None, {}
    for fold in sorted(pool["fold"].unique()):
        records = pool[pool["fold"] == fold]
        models = {
            c: [load_fold_model(cfg, layout.fold_dir(c, fold), device)]
            for c, cfg in configs.items()
        }
        models_of[int(fold)] = [f"{c}/fold_{fold}" for c in configs]
        for f, target in enumerate(frames):
            sets = {
                c: window_set(layout, data_root, cfg.input, records, (target,))
                for c, cfg in configs.items()
            }
            if labels is None:
                side = next(iter(sets.values())).sources[0][0].shape[-1]
                labels = np.lib.format.open_memmap(
                    pseudo_files(folder)["labels"],
                    mode="w+",
                    dtype=np.uint8,
                    shape=(len(pool), len(frames), side, side),
                )
            _predict_frame(rule, configs, models, sets, records, labels, f, device)
            log.info("pseudo: fold %d frame %d done", fold, target)
    assert labels is not None  # the pool has records, so one frame was written
    labels.flush()
    del labels
    return models_of


def _predict_frame(rule, configs, models, sets, records, labels, f, device) -> None:
    """Blend codes of one fold's records at one target frame, written to ``labels[:, f]``."""
    total = rule.weight_total
    batch = max(1, min(cfg.train.batch_size for cfg in configs.values()))
    rows = records["label_row"].to_numpy()
    for start in tqdm(range(0, len(rows), batch), desc="pseudo", unit="batch", leave=False):
        members = np.arange(start, min(start + batch, len(rows)))
        codes = {}
        for name, config in configs.items():
            inputs, _ = sets[name].read(members)
            x = to_float(torch.from_numpy(inputs).to(device))
            codes[name] = to_codes(predict_inputs(models[name], config, x))
        sums = rule.sums(codes)
        labels[rows[members], f] = ((sums + total // 2) // total).astype(np.uint8)


def windows_of(configs: dict[str, Config], frames: tuple[int, ...]) -> tuple[dict, list]:
    """Each config's input frames at each target frame, and the windows that were clamped
    (logged as warnings)."""
    windows: dict[str, dict] = {}
    clamped: list = []
    for name, config in configs.items():
        windows[name] = {}
        for target in frames:
            spec, was_clamped = window_spec(config.input, target)
            windows[name][str(target)] = list(spec.frames)
            if was_clamped:
                clamped.append({"config": name, "frame": target, "window": list(spec.frames)})
                log.warning(
                    "%s: frames %s at target frame %d fall past 0..%d; clamped to %s",
                    name,
                    list(config.input.frames),
                    target,
                    N_FRAMES - 1,
                    list(spec.frames),
                )
    return windows, clamped


def _model_entries(layout, configs, models_of, n_folds) -> dict:
    entries = {}
    for fold, names in models_of.items():
        for model, config_name in zip(names, configs):
            best = fold_files(layout.fold_dir(config_name, fold))["best"]
            entries[model] = {
                "config": config_name,
                "fold": fold,
                "trained_on_folds": [k for k in range(n_folds) if k != fold],
                "checkpoint_digest": digest_file(best),
            }
    return entries


def read_pseudo(layout: Layout, name: str) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """A pseudo-label set's manifest, ids (``record_id,split,fold,models``) and labels memmap."""
    files = pseudo_files(layout.pseudo_dir(check_name(name)))
    if not files["manifest"].is_file():
        raise EkError(f"{layout.pseudo_dir(name)}: no pseudo-labels; run `ek pseudo --out {name}`")
    manifest = read_json(files["manifest"])
    ids = read_ids(files["ids"])
    try:
        labels = np.load(files["labels"], mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise EkError(
            f"{files['labels']}: truncated or unreadable ({err}); rerun ek pseudo --out {name}"
        ) from None
    if labels.shape[:2] != (len(ids), len(manifest["frames"])):
        raise EkError(f"{files['labels']}: shape {labels.shape} disagrees with ids.csv/manifest")
    return manifest, ids, labels


def pseudo_set(
    layout: Layout, data_root: Path, config: Config, splits: pd.DataFrame, fold: int
) -> ArraySet:
    """The pseudo-labelled frames a second-round fold trains on: its training records only."""
    name = config.label.pseudo
    assert name is not None  # called only for configs with label.pseudo
    manifest, ids, labels = read_pseudo(layout, name)
    if manifest["splits_digest"] != digest_file(layout.splits_csv):
        raise EkError(
            f"{layout.pseudo_dir(name)}: made for other splits than {layout.splits_csv}; "
            f"rerun `ek pseudo --out {name}` after `ek blend --oof`"
        )
    pool = splits[splits["fold"] != HOLDOUT_FOLD].reset_index(drop=True)
    if ids["record_id"].tolist() != pool["record_id"].tolist():
        raise EkError(f"{layout.pseudo_dir(name)}: its records differ from the splits' pool")
    windows_of({config.name: config}, tuple(manifest["frames"]))  # says what is clamped
    records = pool[pool["fold"] != fold].copy()
    records["label_row"] = records.index.to_numpy()
    records = records.reset_index(drop=True)
    return window_set(layout, data_root, config.input, records, tuple(manifest["frames"]), labels)
