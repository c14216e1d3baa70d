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
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from ..blend.rule import BlendRule
from ..config import Config, InputSpec, tta_list
from ..data.cache import input_dtype
from ..data.loader import to_float
from ..data.records import NonFiniteBand, band_file, build_input, list_records
from ..errors import EkError
from ..files import atomic_path
from ..layout import record_dir
from ..oof import to_codes
from ..task import Task
from .images import ImageInputs, encoder_of, split_images, write_rows
from .masks import Timer, blend_batches
from .submission import SAMPLE_SUBMISSION, check_submission, write_submission
from .tta import predict_inputs

log = logging.getLogger(__name__)
RECORD_SIDE = 256  # the competition's records; the zeros of an unreadable record
BYTES_PER_PIXEL = 2048  # CUDA memory per input pixel of one TTA copy, a generous estimate
BUDGET_CHECK_FRACTION = 0.03  # the time budget is checked after this share of the records


@dataclass
class Ensemble:
    """The configs with non-zero blend weight, their fold models (in fold order), for
    ``bands`` inputs the training pool's band statistics and, for traced models, the side
    they were traced at (their input size is fixed)."""

    configs: dict[str, Config]
    models: dict[str, list[torch.nn.Module]]
    stats: dict[str, dict | None]
    sides: dict[str, int | tuple[int, int]] = field(default_factory=dict)  # side, or (H, W)
    weights: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    trimmed: int = 0
    task: Task | None = None  # an image task (kind images); None: contrail records

    @property
    def images(self) -> Task | None:
        """The image task whose images are predicted, or None for contrail records."""
        return self.task if self.task is not None and self.task.kind == "images" else None

    def trim(self, level: int) -> None:
        """Trim to ``level`` steps, each halving every config's TTA copies or, once all are at
        one copy, dropping the lowest-weighted member (its codes become the weighted mean of
        the others', so the blend's threshold keeps its scale); logs what it dropped."""
        while self.trimmed < level:
            self.trimmed += 1
            many = [n for n, c in self.configs.items() if len(tta_list(c)) > 1]
            for name in many:
                names = tta_list(self.configs[name])
                kept = names[: max(1, len(names) // 2)]
                self.configs[name] = replace(self.configs[name], tta=kept)
                log.warning("over the time budget: %s drops TTA %s", name, names[len(kept) :])
            alive = [n for n in self.configs if n not in self.dropped]
            if not many and len(alive) > 1:
                last = min(alive, key=lambda n: (self.weights.get(n, 0), -alive.index(n)))
                self.dropped.append(last)
                log.warning("over the time budget: member %s dropped", last)

    def check_side(self, name: str, x: torch.Tensor) -> None:
        side = self.sides.get(name)
        shape = (side, side) if isinstance(side, int) else side
        if shape is not None and tuple(x.shape[-2:]) != tuple(shape):
            raise EkError(
                f"the exported models of '{name}' take {shape[0]}x{shape[1]} inputs, but the "
                f"records are {x.shape[-2]}x{x.shape[-1]}; export at that size"
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


def quantise_input(values: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A record's float32 input as the input cache stores it: uint8 ``round(x * 255)`` where
    values lie in [0, 1], float16 otherwise (:func:`ensemble_kit.data.cache.input_dtype`)."""
    if input_dtype(spec) == np.uint8:
        return to_codes(values)
    return values.astype(np.float16)


@dataclass(frozen=True)
class PredictOptions:
    """How records are predicted (the defaults are ``ek submit``'s).

    Attributes:
        batch_size: Records per batch (the start, with ``memory_safe``).
        precision: ``auto``, ``fp32``, ``fp16`` or ``bf16`` (:func:`.tta.predict_inputs`).
        memory_safe: On CUDA, start batch and TTA chunk from free device memory and halve the
            batch on an out-of-memory error (never used for OOF: it must not depend on load).
        report_every: An ETA line every this many records (0: about every tenth).
        budget_seconds: Wall-clock budget; when the projection after the first records
            exceeds it, TTA copies then members are dropped (:meth:`Ensemble.trim`).
        lenient: Hidden data never aborts: NaN/inf pixels are replaced and an unreadable
            record is predicted empty, each with a warning (the Kaggle notebook).
    """

    batch_size: int = 16
    precision: str = "auto"
    memory_safe: bool = False
    report_every: int = 0
    budget_seconds: float | None = None
    lenient: bool = False
    read_workers: int | None = None  # None: 2 reader processes from 64 records, else none


class _RecordInputs(Dataset):
    """Reads each record once and builds the quantised input of every distinct input spec,
    plus whether the record could be read. ``lenient`` (hidden data): NaN/inf pixels are
    replaced and an unreadable record becomes zeros, predicted as an empty mask, each with a
    warning naming the record; otherwise both are an :class:`EkError`."""

    def __init__(self, folders: list[Path], ensemble: Ensemble, lenient: bool):
        self.folders, self.specs, self.stats = folders, ensemble.specs, ensemble.spec_stats()
        sides = [s for s in ensemble.sides.values() if isinstance(s, int)]  # contrails: squares
        self.lenient, self.side = lenient, max(sides, default=None)

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int):
        folder = self.folders[index]
        try:
            return (*self._inputs(folder, repair=False), True)
        except NonFiniteBand:
            if not self.lenient:
                raise
            log.warning(
                "%s: NaN or infinite pixels replaced (NaN by its frame's median, +inf/-inf "
                "by the frame's maximum/minimum)",
                folder,
            )
            return self._repaired(folder)
        except EkError as err:
            if not self.lenient:
                raise
            return self._unreadable(folder, err)

    def _repaired(self, folder: Path):
        try:
            return (*self._inputs(folder, repair=True), True)
        except EkError as err:
            return self._unreadable(folder, err)

    def _inputs(self, folder: Path, repair: bool) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.from_numpy(quantise_input(build_input(folder, s, st, repair), s))
            for s, st in zip(self.specs, self.stats)
        )

    def _unreadable(self, folder: Path, err: EkError):
        log.warning("%s: unreadable, predicted as an empty mask (%s)", folder, err)
        side = self.side or self._readable_side()
        zeros = (np.zeros((s.in_channels, side, side), input_dtype(s)) for s in self.specs)
        return (*(torch.from_numpy(z) for z in zeros), False)

    def _readable_side(self) -> int:
        """The side of the first record whose band 11 opens (the shape of the zeros)."""
        for folder in self.folders:
            try:
                self.side = int(np.load(folder / band_file(11), mmap_mode="r").shape[0])
                return self.side
            except (OSError, ValueError, IndexError, EOFError):
                continue
        return RECORD_SIDE


def fold_mean_codes(
    models: Sequence[torch.nn.Module],
    config: Config,
    x: torch.Tensor,
    precision: str = "auto",
    chunk: int | None = None,
):
    """uint8 codes ``(B, H, W)`` of the mean of the fold models' probabilities, computed as
    ``holdout.npy`` is: each model with the config's TTA on its own, then ``np.mean`` in fold
    order."""
    return to_codes(
        np.mean([predict_inputs([m], config, x, precision, chunk) for m in models], axis=0)
    )


@dataclass
class MemoryPlan:
    """Records per forward pass and TTA copies per pass; halved on out-of-memory errors."""

    batch: int
    chunk: int | None = None  # None: the config's tta_chunk; 0: all copies in one pass
    copies: int = 8  # the most TTA copies of any config

    def halve(self, batch: int) -> None:
        """Halve the records per pass (then the TTA chunk, at one record); log it."""
        chunk = self.chunk or self.copies
        if batch > 1:
            self.batch = batch // 2
            log.warning("CUDA out of memory at %d records per pass: now %d", batch, self.batch)
        elif chunk > 1:
            self.chunk = chunk // 2
            log.warning("CUDA out of memory at 1 record per pass: now %d TTA copies", self.chunk)
        else:
            raise EkError(
                "CUDA out of memory with 1 record and 1 TTA copy per pass; predict on CPU "
                "(DEVICE = 'cpu') or with fewer configs"
            )


def memory_plan(options: PredictOptions, device: torch.device, ensemble: Ensemble) -> MemoryPlan:
    """The starting plan: the asked batch on CPU; on CUDA, as much of it (all TTA copies in one
    pass, else one at a time) as half the free memory holds at ~``BYTES_PER_PIXEL`` each."""
    copies = max(len(tta_list(c)) for c in ensemble.configs.values())
    if not options.memory_safe or device.type != "cuda":
        return MemoryPlan(options.batch_size, None, copies)
    free, _ = torch.cuda.mem_get_info(device)
    per_copy = BYTES_PER_PIXEL * max(
        (int(np.prod(s)) if isinstance(s, tuple) else s * s for s in ensemble.sides.values()),
        default=RECORD_SIDE**2,
    )
    fits = max(1, int(free / 2 / per_copy))
    if fits >= options.batch_size * copies:
        return MemoryPlan(options.batch_size, 0, copies)
    return MemoryPlan(max(1, min(options.batch_size, fits)), 1, copies)


def predict_batch(
    ensemble: Ensemble, x_by_spec: Sequence[torch.Tensor], precision: str, plan: MemoryPlan
) -> dict[str, np.ndarray]:
    """``{config: uint8 codes}`` of one batch, in passes of ``plan.batch`` records; a CUDA
    out-of-memory error halves the plan and retries the pass."""
    count, start = len(x_by_spec[0]), 0
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ensemble.configs}
    while start < count:
        size = min(plan.batch, count - start)
        try:
            done = _predict_pass(ensemble, [x[start : start + size] for x in x_by_spec],
                                 precision, plan.chunk)  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            plan.halve(size)
            continue
        for name, codes in done.items():
            parts[name].append(codes)
        start += size
    return {name: np.concatenate(codes) for name, codes in parts.items()}


def _predict_pass(ensemble: Ensemble, x_by_spec, precision: str, chunk: int | None) -> dict:
    codes = {}
    for name, config in ensemble.configs.items():
        if name in ensemble.dropped:
            continue
        x = to_float(x_by_spec[ensemble.spec_index(name)])
        ensemble.check_side(name, x)
        codes[name] = fold_mean_codes(ensemble.models[name], config, x, precision, chunk)
    if ensemble.dropped:
        weights = {n: ensemble.weights.get(n, 1) or 1 for n in codes}
        mean = sum(w * codes[n].astype(np.float32) for n, w in weights.items())
        fill = np.rint(mean / sum(weights.values())).astype(np.uint8)
        codes.update({name: fill for name in ensemble.dropped})
    return {name: codes[name] for name in ensemble.configs}


def predict_codes(
    ensemble: Ensemble,
    data_root: Path,
    split: str,
    batch_size: int,
    device: torch.device,
    timer: Timer,
    progress: Callable[[Iterable], Iterable] | None = None,
    options: PredictOptions | None = None,
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """Yield ``(record_ids, {config: uint8 codes (B, H, W)})`` batch by batch, one device."""
    ids = split_ids(ensemble, data_root, split)
    options = replace(options or PredictOptions(), batch_size=batch_size)
    eta = Eta(len(ids), options.report_every)
    yield from _predict_shard(ensemble, data_root, split, ids, device, options, timer, eta,
                              progress)  # fmt: skip


def split_ids(ensemble: Ensemble, data_root: Path, split: str) -> list[str]:
    """The record (or image) ids to predict (an :class:`EkError` when there are none)."""
    if ensemble.images is not None:
        return list(split_images(ensemble.images, data_root, split))
    ids = list_records(data_root, split)
    if not ids:
        raise EkError(f"{Path(data_root) / split}: no records to predict")
    return ids


def _inputs_of(ensemble: Ensemble, data_root: Path, split: str, ids, lenient: bool) -> Dataset:
    task = ensemble.images
    if task is None:
        folders = [record_dir(data_root, split, rid) for rid in ids]
        return _RecordInputs(folders, ensemble, lenient)
    files = split_images(task, data_root, split)
    return ImageInputs(task, [files[i] for i in ids], len(ensemble.specs), lenient)


def _predict_shard(ensemble, data_root, split, ids, device, options, timer, eta, progress=None):
    """Yield the batches of the records ``ids`` predicted on ``device``."""
    dataset = _inputs_of(ensemble, data_root, split, ids, options.lenient)
    workers = options.read_workers
    workers = (0 if len(ids) < 64 else 2) if workers is None else workers
    loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=workers)
    plan = memory_plan(options, device, ensemble)
    start, clock = 0, time.perf_counter()
    for *inputs, readable in (progress or iter)(loader):
        clock = timer.add("read", clock)
        codes = predict_batch(ensemble, [x.to(device) for x in inputs], options.precision, plan)
        for batch_codes in codes.values():
            batch_codes[~readable.numpy()] = 0
        clock = timer.add("model", clock)
        count = len(readable)
        yield ids[start : start + count], codes
        start += count
        eta.add(count, ensemble)


def predict_codes_on(
    workers: Sequence[tuple[Ensemble, torch.device]],
    data_root: Path,
    split: str,
    options: PredictOptions,
    timer: Timer,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """:func:`predict_codes` with the records split across devices, one worker (thread) each.

    Shards are contiguous and cut at whole batches, so every batch holds the records it holds
    with one worker: on CPU at equal threads the codes are the same bytes.
    """
    ids = split_ids(workers[0][0], data_root, split)
    eta = Eta(len(ids), options.report_every, budget=options.budget_seconds)
    if len(workers) == 1:
        ensemble, device = workers[0]
        yield from _predict_shard(ensemble, data_root, split, ids, device, options, timer, eta,
                                  progress)  # fmt: skip
        return
    shards = shard_records(ids, len(workers), options.batch_size)
    options = replace(options, read_workers=0)  # no fork from a process running threads
    queues: list[queue.Queue] = [queue.Queue() for _ in shards]
    with ThreadPoolExecutor(len(shards), thread_name_prefix="ek-predict") as pool:
        for (ensemble, device), shard, out in zip(workers, shards, queues):
            pool.submit(_fill_queue, out, ensemble, data_root, split, shard, device, options,
                        timer, eta)  # fmt: skip
        for out in queues:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    eta.stop()
                    raise item
                yield item


def _fill_queue(out: queue.Queue, *args) -> None:
    try:
        for item in _predict_shard(*args):
            out.put(item)
    except BaseException as err:  # handed to the consumer, which raises it
        out.put(err)
    out.put(None)


def shard_records(ids: list[str], workers: int, batch_size: int) -> list[list[str]]:
    """``ids`` in at most ``workers`` contiguous shards of whole batches, sizes as even as
    batches allow."""
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    per = -(-len(batches) // workers)
    return [
        [rid for batch in batches[i : i + per] for rid in batch]
        for i in range(0, len(batches), per)
    ]


class Eta:
    """Records done, records/s and the projected finish, logged every ``every`` records
    (thread-safe: the workers of every device add to one count).

    With a ``budget`` (seconds), once :data:`BUDGET_CHECK_FRACTION` of the records are done
    and the projection exceeds it, each worker's ensemble is trimmed one step
    (:meth:`Ensemble.trim`: TTA copies first, then the lowest-weighted members).
    """

    def __init__(self, total: int, every: int = 0, budget: float | None = None):
        self.total, self.every, self.budget = total, every or max(1, total // 10), budget
        self.done, self.level, self.started = 0, 0, time.perf_counter()
        self.stopped = False
        self._lock = threading.Lock()

    def add(self, count: int, ensemble: Ensemble) -> None:
        """Count ``count`` more records; log, and trim ``ensemble`` to the current level."""
        with self._lock:
            before, self.done = self.done, self.done + count
            seconds = time.perf_counter() - self.started
            if before // self.every != self.done // self.every or self.done == self.total:
                log.info(eta_line(self.done, self.total, seconds))
            if self._over_budget(seconds):
                self.level += 1
                self.started_level = self.done
        ensemble.trim(self.level)

    def _over_budget(self, seconds: float) -> bool:
        if self.budget is None or self.done < BUDGET_CHECK_FRACTION * self.total:
            return False
        if self.level and self.done - getattr(self, "started_level", 0) < self.every:
            return False  # let the last trim show in the rate first
        projected = seconds / self.done * self.total
        return projected > self.budget

    def stop(self) -> None:
        self.stopped = True


def eta_line(done: int, total: int, seconds: float) -> str:
    """``predicted 40/2,000 records, 1.2 records/s, ~27 min to go (total ~28 min)``."""
    rate = done / max(seconds, 1e-9)
    left = (total - done) / max(rate, 1e-9)
    return (
        f"predicted {done:,}/{total:,} records, {rate:.2f} records/s, "
        f"~{left / 60:.1f} min to go (total ~{(seconds + left) / 60:.1f} min)"
    )


def predict_submission(
    ensemble: Ensemble,
    rule: BlendRule,
    data_root: Path,
    split: str,
    out: Path,
    batch_size: int = 16,
    device: torch.device | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    options: PredictOptions | None = None,
    workers: Sequence[tuple[Ensemble, torch.device]] = (),
) -> dict:
    """Predict every record of ``data_root/split``, blend, encode, validate and write ``out``.

    The CSV is checked with :func:`check_submission` (as ``ek submit --check`` does) before
    it replaces ``out``, so a failed run never leaves a half-written or invalid file. Rows
    follow ``sample_submission.csv`` when the data folder has one (test split).

    Args:
        workers: ``(ensemble, device)`` per device to split the records across; default
            ``ensemble`` on ``device`` alone.

    Returns:
        ``{"ids", "threshold_sum", "records", "seconds", "records_per_second",
        "seconds_by_stage", "check"}``; ``threshold_sum`` is the threshold applied; ``ids``
        are the CSV's row ids (an image task's: one per (image, class)).
    """
    started, timer = time.perf_counter(), Timer()
    options = replace(options or PredictOptions(), batch_size=batch_size)
    workers = list(workers) or [(ensemble, device or torch.device("cpu"))]
    batches = predict_codes_on(workers, data_root, split, options, timer, progress)
    task = workers[0][0].images
    encoder = None if task is None else encoder_of(task)
    ids, rles, shape, threshold = blend_batches(rule, batches, timer, encoder)
    out = Path(out)
    with atomic_path(out) as tmp:
        if task is not None:
            checked = write_rows(tmp, task, ids, rles, Path(data_root), split)
        else:
            ids, rles = sample_order(Path(data_root), split, ids, rles)
            write_submission(tmp, ids, rles)
            checked = check_submission(tmp, data_root, split, shape=shape)
    seconds = time.perf_counter() - started
    records = len(ids) // (task.n_classes if task is not None else 1)  # rows per image: C
    return {
        "ids": ids,
        "threshold_sum": threshold,
        "records": records,
        "seconds": seconds,
        "records_per_second": records / max(seconds, 1e-9),
        "seconds_by_stage": timer.seconds,
        "check": {**checked, "path": str(out)},
    }


def sample_order(
    data_root: Path, split: str, ids: list[str], rles: list[str]
) -> tuple[list[str], list[str]]:
    """Rows in ``sample_submission.csv``'s order (test split, when it exists); records it
    does not list follow in folder order."""
    sample = data_root / SAMPLE_SUBMISSION
    if split != "test" or not sample.is_file():
        return ids, rles
    listed = pd.read_csv(sample, dtype=str, keep_default_na=False).get("record_id")
    rank = {rid: i for i, rid in enumerate([] if listed is None else listed)}
    order = sorted(range(len(ids)), key=lambda i: (rank.get(ids[i], len(rank)), i))
    return [ids[i] for i in order], [rles[i] for i in order]
