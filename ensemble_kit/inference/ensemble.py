"""Predicting a data split with loaded fold x config models: the one code path of ``ek submit``
(from checkpoints or from the exported bundle) and of the Kaggle notebook.

Each record is read once and quantised exactly as the input cache stores it (uint8
``round(x * 255)``, or float16), then decoded on the device as training and OOF decode it.
Every fold model runs the config's TTA on its own and the fold models' probabilities are
averaged in fold order with the float32 ``np.mean`` that built ``holdout.npy``, then stored
as uint8 codes. So ``ek submit --split validation`` reproduces ``holdout.npy`` code for code,
and the blend, threshold and postprocessing chosen by ``ek blend`` apply unchanged
(:meth:`ensemble_kit.blend.rule.BlendRule.apply` is the one code path).

The models come in already built, so nothing here imports what Kaggle's image lacks (timm,
segmentation_models_pytorch, huggingface_hub, scikit-learn, matplotlib).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..blend.rule import BlendRule
from ..config import Config, InputSpec
from ..data.cache import input_dtype
from ..data.loader import to_float
from ..data.records import build_input, list_records
from ..errors import EkError
from ..files import atomic_path
from ..layout import record_dir
from ..oof import to_codes
from .rle import encode
from .submission import check_submission, write_submission
from .tta import predict_inputs

log = logging.getLogger(__name__)
TOP_FRACTION_CHUNK = 64


@dataclass
class Ensemble:
    """The configs with non-zero blend weight, their fold models (in fold order), for
    ``bands`` inputs the training pool's band statistics and, for traced models, the side
    they were traced at (their input size is fixed)."""

    configs: dict[str, Config]
    models: dict[str, list[torch.nn.Module]]
    stats: dict[str, dict | None]
    sides: dict[str, int] = field(default_factory=dict)

    def check_side(self, name: str, x: torch.Tensor) -> None:
        side = self.sides.get(name)
        if side is not None and tuple(x.shape[-2:]) != (side, side):
            raise EkError(
                f"the exported models of '{name}' take {side}x{side} inputs, but the records "
                f"are {x.shape[-2]}x{x.shape[-1]}; export at that size"
            )

    @property
    def specs(self) -> list[InputSpec]:
        """The distinct input specs: each record is read once and built once per spec."""
        return list(dict.fromkeys(c.input for c in self.configs.values()))

    def spec_index(self, name: str) -> int:
        return self.specs.index(self.configs[name].input)

    def spec_stats(self) -> list[dict | None]:
        """The band statistics of each of :attr:`specs` (None for ash inputs)."""
        by_spec = {c.input: self.stats[n] for n, c in self.configs.items()}
        return [by_spec[spec] for spec in self.specs]


@dataclass
class Timer:
    """Seconds spent per stage."""

    seconds: dict = field(default_factory=lambda: {"read": 0.0, "model": 0.0, "encode": 0.0})

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - since
        return now


def quantise_input(values: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A record's float32 input as the input cache stores it: uint8 ``round(x * 255)`` where
    values lie in [0, 1], float16 otherwise (:func:`ensemble_kit.data.cache.input_dtype`)."""
    if input_dtype(spec) == np.uint8:
        return to_codes(values)
    return values.astype(np.float16)


class _RecordInputs(Dataset):
    """Reads each record once and builds the quantised input of every distinct input spec."""

    def __init__(self, folders: list[Path], specs: list[InputSpec], stats: list[dict | None]):
        self.folders, self.specs, self.stats = folders, specs, stats

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int):
        return tuple(
            torch.from_numpy(quantise_input(build_input(self.folders[index], s, st), s))
            for s, st in zip(self.specs, self.stats)
        )


def fold_mean_codes(models: Sequence[torch.nn.Module], config: Config, x: torch.Tensor):
    """uint8 codes ``(B, H, W)`` of the mean of the fold models' probabilities, computed as
    ``holdout.npy`` is: each model with the config's TTA on its own, then ``np.mean`` in fold
    order."""
    return to_codes(np.mean([predict_inputs([model], config, x) for model in models], axis=0))


def predict_codes(
    ensemble: Ensemble,
    data_root: Path,
    split: str,
    batch_size: int,
    device: torch.device,
    timer: Timer,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """Yield ``(record_ids, {config: uint8 codes (B, H, W)})`` batch by batch."""
    ids = list_records(data_root, split)
    if not ids:
        raise EkError(f"{Path(data_root) / split}: no records to predict")
    folders = [record_dir(data_root, split, rid) for rid in ids]
    dataset = _RecordInputs(folders, ensemble.specs, ensemble.spec_stats())
    workers = 0 if len(ids) < 64 else 2
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    start, clock = 0, time.perf_counter()
    for inputs in (progress or _log_progress)(loader):
        clock = timer.add("read", clock)
        codes = {}
        for name, config in ensemble.configs.items():
            x = to_float(inputs[ensemble.spec_index(name)].to(device))
            ensemble.check_side(name, x)
            codes[name] = fold_mean_codes(ensemble.models[name], config, x)
        clock = timer.add("model", clock)
        count = len(inputs[0])
        yield ids[start : start + count], codes
        start += count


def predict_submission(
    ensemble: Ensemble,
    rule: BlendRule,
    data_root: Path,
    split: str,
    out: Path,
    batch_size: int = 16,
    device: torch.device | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict:
    """Predict every record of ``data_root/split``, blend, encode, validate and write ``out``.

    The CSV is checked with :func:`check_submission` (as ``ek submit --check`` does) before
    it replaces ``out``, so a failed run never leaves a half-written or invalid file.

    Returns:
        ``{"ids", "threshold_sum", "records", "seconds", "records_per_second",
        "seconds_by_stage", "check"}``; ``threshold_sum`` is the threshold applied.
    """
    started, timer = time.perf_counter(), Timer()
    device = device or torch.device("cpu")
    batches = predict_codes(ensemble, data_root, split, batch_size, device, timer, progress)
    ids, rles, shape, threshold = blend_batches(rule, batches, timer)
    out = Path(out)
    with atomic_path(out) as tmp:
        write_submission(tmp, ids, rles)
        checked = check_submission(tmp, data_root, split, shape=shape)
    seconds = time.perf_counter() - started
    return {
        "ids": ids,
        "threshold_sum": threshold,
        "records": len(ids),
        "seconds": seconds,
        "records_per_second": len(ids) / max(seconds, 1e-9),
        "seconds_by_stage": timer.seconds,
        "check": {**checked, "path": str(out)},
    }


def blend_batches(
    rule: BlendRule, batches: Iterable, timer: Timer
) -> tuple[list[str], list[str], tuple[int, ...], int]:
    """Threshold, postprocess and encode batch by batch (:meth:`BlendRule.apply`);
    ``top_fraction`` mode first stores the whole split's codes in a temporary file, to take
    the threshold from the split's histogram.

    Returns:
        ``(ids, rles, mask shape, the threshold sum applied)``.
    """
    if rule.mode == "top_fraction":
        return _blend_top_fraction(rule, batches, timer)
    ids: list[str] = []
    rles: list[str] = []
    shape: tuple[int, ...] = (256, 256)
    threshold = rule.threshold_for()
    for batch_ids, codes in batches:
        clock = time.perf_counter()
        masks = rule.apply(codes, threshold)
        ids += batch_ids
        rles += [encode(mask) for mask in masks]
        shape = masks.shape[1:]
        timer.add("encode", clock)
    return ids, rles, shape, threshold


def _blend_top_fraction(rule: BlendRule, batches: Iterable, timer: Timer):
    members = rule.members
    ids: list[str] = []
    shape: tuple[int, ...] = (256, 256)
    with tempfile.TemporaryDirectory(prefix="ek-submit-") as scratch:
        paths = {name: Path(scratch) / f"{i}.u8" for i, name in enumerate(members)}
        handles = {name: open(path, "wb") for name, path in paths.items()}
        for batch_ids, codes in batches:
            ids += batch_ids
            shape = codes[members[0]].shape[1:]
            for name in members:
                handles[name].write(np.ascontiguousarray(codes[name]).tobytes())
        for handle in handles.values():
            handle.close()
        stored = {
            n: np.memmap(p, np.uint8, "r", shape=(len(ids), *shape)) for n, p in paths.items()
        }
        step = TOP_FRACTION_CHUNK
        histogram = np.zeros(255 * rule.weight_total + 1, dtype=np.int64)
        for start in range(0, len(ids), step):
            histogram += rule.histogram({n: stored[n][start : start + step] for n in members})
        threshold = rule.threshold_for(histogram)
        rles = []
        for start in range(0, len(ids), step):
            clock = time.perf_counter()
            chunk = {n: np.asarray(stored[n][start : start + step]) for n in members}
            rles += [encode(mask) for mask in rule.apply(chunk, threshold)]
            timer.add("encode", clock)
        del stored
    return ids, rles, shape, threshold


def _log_progress(loader: DataLoader) -> Iterator:
    """Batches of ``loader``, with a log line at about every tenth of the way."""
    total = len(loader)
    step = max(1, total // 10)
    for done, batch in enumerate(loader, start=1):
        yield batch
        if done % step == 0 or done == total:
            log.info("predicted %d/%d batches", done, total)
