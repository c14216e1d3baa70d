"""``ek cv``: K fold models per config, out-of-fold and holdout probabilities, summaries.

Per fold: take the fold's ``RUNNING`` lock (:mod:`.lock`; a fold another process trains is
skipped), train (resumable), then predict the fold's validation records and the holdout
with the config's TTA into ``fold_<i>/oof_part.npy`` / ``holdout_part.npy``, then write
``DONE`` with the fingerprints of the data it read. When every fold is DONE the parts are
streamed into ``oof.npy`` and ``holdout.npy`` (see :mod:`ensemble_kit.oof`) and
``summary.json`` is written, by whichever process finishes the last fold (every file is
written atomically, so two processes assembling at once both leave whole files).

A DONE fold whose data files changed since it was trained is refused (as a changed config
is): retrain it on the new data or restore the files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import Config, load_config, seed_members
from ..data.cache import split_inputs, split_labels
from ..data.loader import ArraySet, batches, to_float
from ..data.splits import HOLDOUT_FOLD, ensure_splits
from ..errors import EkError
from ..files import atomic_path
from ..inference.checkpoints import load_fold_model
from ..inference.tta import predict_inputs
from ..layout import Layout, fold_files
from ..models import architecture_name, check_pretrained_weights
from ..oof import codes_writer, sparse_path, to_codes, writes_sparse
from ..runtime import resolve_device
from ..task import Task, check_config_fits, model_channels, resolve_task, workdir_task
from .assembly import assemble
from .backends import BackendOptions, FoldResult, FoldsFailed, run_jobs
from .lock import FoldLock, acquire
from .provenance import claim_config_dir, fold_sources, refuse_changed_data
from .pseudo import pseudo_set, read_pseudo
from .status import reported_dice
from .trainer import train_fold, write_done

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CvRequest:
    """What ``ek cv`` was asked to do."""

    config_paths: tuple[Path, ...]
    layout: Layout
    data_root: Path | None = None
    n_folds: int | None = None
    folds: tuple[int, ...] = ()
    epochs: int | None = None
    device: str | None = None
    backend: str = "local"
    seed: int = 0
    jobs: int = 1
    cpus_per_job: int | None = None
    gpus_per_job: float | None = None
    address: str | None = None
    precision: str = "auto"
    task_name: str | None = None  # `ek cv --task`: the task of new splits


def _check_task(request: CvRequest, task: Task) -> None:
    """One-line errors for a config built for another task, before anything trains."""
    for path in request.config_paths:
        check_config_fits(load_config(path), task, str(path))


@dataclass(frozen=True)
class FoldJob:
    config: Config
    layout: Layout
    data_root: Path
    fold: int
    device: str | None
    precision: str = "auto"  # of the OOF and holdout prediction (runtime.choose_precision)
    channels: tuple[int, int] | None = None  # the model's (input, output): task.model_channels

    def __str__(self) -> str:
        return f"{self.config.name} fold {self.fold}"


def run_cv(
    request: CvRequest, on_fold_done: Callable[[str], None] | None = None
) -> dict[str, dict | None]:
    """Train the requested folds of every config; assemble OOF of configs whose folds are DONE.

    Args:
        request: What to run and where (:class:`CvRequest`).
        on_fold_done: Called with one line (config, fold, dice, minutes, node) as each fold
            finishes; default: logged.

    Raises:
        FoldsFailed: After the other folds finished and complete configs were assembled,
            when some folds of a parallel run failed.
    """
    options = _backend_options(request)
    sourced = [
        (path, member)
        for path in request.config_paths
        for member in seed_members(_with_epochs(load_config(path), request.epochs))
    ]
    configs = [member for _, member in sourced]
    source_of = {member.name: path for path, member in sourced}
    _check_unique_names(configs, request.config_paths)
    task = resolve_task(request.task_name) if request.task_name else None
    splits, meta = ensure_splits(
        request.layout, request.data_root, request.n_folds, request.seed, task
    )
    data_root = Path(request.data_root or meta["data_root"])
    task = workdir_task(request.layout, meta)
    _check_task(request, task)
    folds = request.folds or tuple(range(meta["n_folds"]))
    for fold in folds:
        if not 0 <= fold < meta["n_folds"]:
            raise EkError(f"--fold {fold}: folds are 0..{meta['n_folds'] - 1}")
    jobs = [
        FoldJob(
            c,
            request.layout,
            data_root,
            f,
            request.device,
            request.precision,
            model_channels(c, task),
        )
        for c in configs
        for f in folds
    ]
    for config in configs:
        claim_config_dir(request.layout, config)
        if config.label.pseudo:
            read_pseudo(request.layout, config.label.pseudo)  # fail before any fold trains
    refuse_changed_data(request.layout, data_root, configs, meta["n_folds"])
    pending = [
        j
        for j in jobs
        if not fold_files(request.layout.fold_dir(j.config.name, j.fold))["done"].is_file()
    ]
    for config in {j.config.name: j.config for j in pending}.values():
        check_model(config, str(source_of[config.name]))  # offline, bad arch: fail first
    if options.jobs > 1 or request.backend != "local":
        # caches first, here: folds running side by side must not all build the same one
        for config in {j.config.input: j.config for j in pending}.values():
            open_caches(request.layout, data_root, config, splits)
    failed = None
    try:
        run_jobs(pending, run_fold, request.backend, options, _reporter(on_fold_done))
    except FoldsFailed as err:
        failed = err
    summaries = {c.name: assemble(request.layout, c, data_root, splits, meta) for c in configs}
    if failed is not None:
        raise failed
    return summaries


def check_model(config: Config, source: str) -> None:
    """Fail before any fold trains, naming ``source``, for an unknown architecture or
    pretrained weights that cannot be had offline."""
    try:
        architecture_name(config.model.arch)
    except EkError as err:
        raise EkError(f"{source}: {err}") from None
    check_pretrained_weights(config, source)


def _backend_options(request: CvRequest) -> BackendOptions:
    device = request.device or "auto"
    if request.jobs < 1:
        raise EkError(f"--jobs must be at least 1, got {request.jobs}")
    if request.backend == "ray" and request.jobs > 1:
        raise EkError("--jobs is for the local backend; Ray runs as many folds as fit")
    if request.backend == "local" and (request.address or request.gpus_per_job is not None):
        raise EkError("--address and --gpus-per-job need --backend ray")
    if (request.jobs > 1 or request.backend == "ray") and device.startswith("cuda:"):
        raise EkError(
            f"--device {device}: with --jobs or --backend ray each fold gets its own GPU; "
            "use --device cuda or auto"
        )
    return BackendOptions(
        jobs=request.jobs,
        cpus_per_job=request.cpus_per_job,
        gpus_per_job=request.gpus_per_job,
        use_gpus=device != "cpu",
        address=request.address,
    )


def _reporter(on_fold_done: Callable[[str], None] | None) -> Callable[[FoldResult], None]:
    def report(result: FoldResult) -> None:
        if result.summary is None:  # another process holds the fold's lock
            line = f"{result.job}: skipped, running elsewhere"
        else:
            line = (
                f"{result.job}: dice {reported_dice(result.summary):.4f}, "
                f"{result.seconds / 60:.1f} min, node {result.node}"
            )
        (on_fold_done or log.info)(line)

    return report


def _with_epochs(config: Config, epochs: int | None) -> Config:
    if epochs is None:
        return config
    return replace(config, train=replace(config.train, epochs=epochs))


def _check_unique_names(configs: list[Config], paths) -> None:
    names = [c.name for c in configs]
    for name in set(names):
        if names.count(name) > 1:
            raise EkError(
                f"two configs are named '{name}' ({', '.join(map(str, paths))}); "
                "give each a unique name"
            )


def open_caches(layout: Layout, data_root: Path, config: Config, splits: pd.DataFrame) -> dict:
    """``{split: (input entry, label entry)}`` of every split in ``splits`` (the workdir's
    task decides: contrail records or image files)."""
    task = workdir_task(layout)
    return {
        split: (
            split_inputs(layout, data_root, split, config.input, task),
            split_labels(layout, data_root, split, task),
        )
        for split in pd.unique(splits["split"])
    }


def fold_sets(
    layout: Layout,
    data_root: Path,
    config: Config,
    splits: pd.DataFrame,
    fold: int,
    caches: dict | None = None,
):
    """Training, validation and holdout ArraySets of one fold (``caches``: from
    :func:`open_caches`, opened here when not given)."""
    caches = caches or open_caches(layout, data_root, config, splits)
    sources: list = []
    lookup: dict = {}
    for split, (inputs, labels) in caches.items():
        lookup[split] = (len(sources), inputs.index_of, labels.index_of)
        hard = labels.arrays["labels"]
        sources.append((inputs.arrays["inputs"], hard, labels.arrays.get("soft", hard)))

    def member_set(rows: pd.DataFrame, soft: bool) -> ArraySet:
        pairs = [(s[0], s[2] if soft else s[1]) for s in sources]
        index = np.zeros((len(rows), 2), dtype=np.int64)
        for split, group in rows.groupby("split", sort=False):
            source, input_index, label_index = lookup[split]
            ids = group["record_id"].tolist()
            input_rows = input_index(ids)
            if not np.array_equal(input_rows, label_index(ids)):
                raise EkError(f"{layout.cache_dir}: input and label caches disagree for '{split}'")
            index[rows.index.get_indexer(group.index)] = np.c_[
                np.full(len(ids), source), input_rows
            ]
        return ArraySet(tuple(pairs), index, soft=soft)

    pool = splits[splits["fold"] != HOLDOUT_FOLD]
    train = pool[pool["fold"] != fold].reset_index(drop=True)
    val = pool[pool["fold"] == fold].reset_index(drop=True)
    holdout = splits[splits["fold"] == HOLDOUT_FOLD].reset_index(drop=True)
    return member_set(train, config.label.soft), member_set(val, False), member_set(holdout, False)


def predict_set(
    models: list[torch.nn.Module],
    config: Config,
    arrays: ArraySet,
    device: torch.device,
    batch_size: int,
    precision: str = "auto",
):
    """Yield ``(rows, probabilities float32 (B, H, W))`` for an ArraySet."""
    start = 0
    for inputs, _ in batches(arrays, batch_size):
        x = to_float(inputs.to(device))
        yield slice(start, start + len(x)), predict_inputs(models, config, x, precision)
        start += len(x)


def run_fold(job: FoldJob) -> dict | None:
    """Train one fold, write its OOF and holdout parts, then its DONE marker.

    Returns the fold summary, or None when another live process holds the fold's lock
    (logged with where it runs) or finished the fold meanwhile.
    """
    fold_dir = job.layout.fold_dir(job.config.name, job.fold)
    lock = acquire(fold_files(fold_dir)["running"])
    if not isinstance(lock, FoldLock):
        log.info("%s fold %d: skipped, running on %s", job.config.name, job.fold, lock.describe())
        return None
    with lock:
        if fold_files(fold_dir)["done"].is_file():
            log.info("%s fold %d: finished by another process", job.config.name, job.fold)
            return None
        summary = _train_and_predict(job, fold_dir, lock)
    if summary is not None:
        log.info(
            "%s fold %d: best epoch %d, dice %.4f, %.0f s",
            job.config.name,
            job.fold,
            summary["best_epoch"],
            reported_dice(summary),
            summary["seconds_total"],
        )
    return summary


def _train_and_predict(job: FoldJob, fold_dir: Path, lock: FoldLock) -> dict | None:
    layout, config, fold = job.layout, job.config, job.fold
    splits, _ = ensure_splits(layout, None, None)
    device = resolve_device(job.device)
    caches = open_caches(layout, job.data_root, config, splits)
    train, val, holdout = fold_sets(layout, job.data_root, config, splits, fold, caches)
    if len(val) == 0 or len(train) == 0:
        raise EkError(f"{layout.splits_csv}: fold {fold} has no training or no validation records")
    started = time.perf_counter()
    pseudo = (
        pseudo_set(layout, job.data_root, config, splits, fold) if config.label.pseudo else None
    )
    summary = train_fold(config, fold_dir, fold, train, val, device, pseudo, job.channels)
    if lock.lost:
        log.warning(
            "%s fold %d: another process took the fold over; not writing it", config.name, fold
        )
        return None
    n_pool = int((splits["fold"] != HOLDOUT_FOLD).sum())
    summary.update(_write_parts(job, fold_dir, val, holdout, device, n_pool))
    summary["seconds_total"] = time.perf_counter() - started
    summary["sources"] = fold_sources(caches, splits)
    write_done(fold_dir, summary)
    return summary


def _write_parts(
    job: FoldJob, fold_dir: Path, val: ArraySet, holdout: ArraySet, device, n_pool: int
) -> dict:
    """Predict the fold's OOF and holdout parts; returns the measured prediction cost.

    A record's shape is its label's: ``(H, W)``, or ``(C, H, W)`` for several classes.
    ``n_pool`` (every OOF record of the config) decides ``oof.format: auto``.
    """
    config, precision = job.config, job.precision
    model = load_fold_model(config, fold_dir, device, job.channels)
    batch = max(1, config.train.batch_size)
    labels = val.sources[0][1]
    assert labels is not None  # validation sets carry labels
    record = tuple(labels.shape[1:])
    clock = {"seconds": 0.0, "records": 0}
    sparse = writes_sparse(config, n_pool, record)
    path = fold_files(fold_dir)["oof_part"]
    with codes_writer(path, (len(val), *record), sparse, config.oof.floor) as writer:
        parts = predict_set([model], config, val, device, batch, precision)
        for rows, probs in _timed(parts, clock):
            writer.write(rows, to_codes(probs))
    (path if sparse else sparse_path(path)).unlink(missing_ok=True)  # the other format's
    if len(holdout):
        with atomic_path(fold_files(fold_dir)["holdout_part"]) as tmp:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.float32, shape=(len(holdout), *record)
            )
            parts = predict_set([model], config, holdout, device, batch, precision)
            for rows, probs in _timed(parts, clock):
                out[rows] = probs
            out.flush()
            del out
    name = f"cuda {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
    return {
        "predict_seconds_per_record": clock["seconds"] / max(clock["records"], 1),
        "predict_device": f"{name} ({torch.get_num_threads()} CPU threads)",
    }


def _timed(predictions, clock: dict):
    """Yield from a :func:`predict_set` generator, adding its own time and records to ``clock``.

    Only the generator's time counts (cache reads, TTA forwards, the copy to the host), not
    the caller's writes between batches.
    """
    started = time.perf_counter()
    for rows, probs in predictions:
        clock["seconds"] += time.perf_counter() - started
        clock["records"] += len(probs)
        yield rows, probs
        started = time.perf_counter()
