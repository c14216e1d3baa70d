"""Compact memory-mappable caches of model inputs and labels, built once, rebuilt on change.

Inputs: ``folds/cache/<split>-<digest>/inputs.npy``, ``(N, C, H, W)`` of exactly the channels an
input spec needs — uint8 (``round(x * 255)``) where values lie in [0, 1] (ash false colour,
min/max bands), float16 otherwise — with ``ids.csv``. The folder's digest covers the input
spec, the data root and the split's record ids, so configs sharing inputs share the cache.

Labels: ``folds/cache/<split>-labels/``: ``labels.npy`` uint8 ``(N, H, W)`` aggregated masks,
``soft.npy`` uint8 ``(N, H, W)`` mean of the individual masks x 255 (the aggregated mask
where a record has none), ``ids.csv``.

Image tasks (:mod:`ensemble_kit.task`): ``<split>-images-<digest>/inputs.npy`` ``(N, C, H, W)``
and ``<split>-labels-<digest>/labels.npy``, uint8 ``(N, C, H, W)`` for C > 1 classes and
``(N, H, W)`` for one (:func:`ensure_image_inputs`, :func:`ensure_image_labels`).

Every entry is keyed by a *fingerprint* of its source files: the size and ``mtime_ns`` of
every file it reads, of every record (stat calls only, no reads). ``meta.json`` keeps the
key, ``sources.npy`` the per-file ``(size, mtime_ns)`` table; an entry whose files changed
is rebuilt (and says which file changed). Inputs made from ``bands`` are also keyed by the
band statistics, themselves keyed by the fingerprint of the ``train`` records they sample.

Entries are built in parallel worker processes into a temporary folder that is renamed into
place when complete, so an interrupted build leaves nothing a later run trusts; two
processes building one entry at once both finish and one of the two copies stays.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..config import InputSpec
from ..errors import EkError
from ..files import digest_json, process_alive, read_json, user_errors, write_json
from ..layout import Layout, cache_array, cache_files, record_dir, split_dir
from ..oof import from_codes, to_codes
from ..task import Task, workdir_task
from .images import (
    MASK_SUFFIX,
    image_files,
    list_images,
    mask_location,
    mask_rows,
    read_image,
    read_masks,
    split_folder,
)
from .records import (
    INDIVIDUAL_FILE,
    MASK_FILE,
    N_FRAMES,
    band_file,
    band_statistics,
    build_input,
    list_records,
    load_mask,
    load_soft_label,
)
from .sources import (
    LABEL_FILES,
    Sources,
    describe_change,
    files_fingerprint,
    input_files,
    paths_source,
    read_sources,
    records_fingerprint,
)

log = logging.getLogger(__name__)
CHUNK = 16
STATS_RECORDS = 256


@dataclass(frozen=True)
class CacheEntry:
    """An opened cache entry: ``arrays`` are read-only memmaps."""

    path: Path
    ids: list[str]
    arrays: dict[str, np.ndarray]
    sources: dict | None = None  # {"files": [...], "fingerprint": ...} of the files it read

    def index_of(self, record_ids: list[str]) -> np.ndarray:
        position = {rid: i for i, rid in enumerate(self.ids)}
        missing = [rid for rid in record_ids if rid not in position]
        if missing:
            raise EkError(f"{self.path}: records {missing[:3]} are not in the cache")
        return np.array([position[rid] for rid in record_ids], dtype=np.int64)


def input_dtype(spec: InputSpec) -> np.dtype:
    in_unit_range = spec.channels == "ash" or spec.normalize == "minmax"
    return np.dtype(np.uint8 if in_unit_range else np.float16)


def decode_inputs(raw: np.ndarray) -> np.ndarray:
    """Cached inputs back to float32 values."""
    if raw.dtype == np.uint8:
        return from_codes(raw)
    return raw.astype(np.float32)


def spec_digest(spec: InputSpec, data_root: Path, split: str, ids: list[str]) -> str:
    key = {"channels": spec.channels, "frames": list(spec.frames), "split": split}
    if spec.channels == "bands":
        key.update(bands=list(spec.bands), normalize=spec.normalize)
    key.update(root=str(Path(data_root).resolve()), ids=digest_json(ids))
    return digest_json(key)


def ensure_inputs(
    layout: Layout, data_root: Path, split: str, spec: InputSpec, workers: int | None = None
) -> CacheEntry:
    """Open the input cache of a (split, spec), building it first when missing or stale."""
    sources = read_sources(data_root, split, input_files(spec))
    ids = sources.ids
    if not ids:
        raise EkError(f"{split_dir(data_root, split)}: no records")
    stats = band_stats(layout, data_root, spec) if spec.channels == "bands" else None
    path = layout.cache_entry(split, spec_digest(spec, data_root, split, ids))
    key = digest_json([sources.fingerprint, stats])
    if not _is_current(path, key, sources):
        first = build_input(record_dir(data_root, split, ids[0]), spec, stats)
        arrays = {"inputs": ((len(ids), *first.shape), input_dtype(spec))}
        filler = _InputFiller(spec, stats)
        _build(path, sources, key, arrays, filler, workers, f"cache {split}")
    return open_entry(path)


def ensure_labels(
    layout: Layout, data_root: Path, split: str, workers: int | None = None
) -> CacheEntry:
    """Open the label cache of a split (records with masks), building it when missing or stale."""
    sources = read_sources(data_root, split, LABEL_FILES, labelled_only=True)
    if not sources.ids:
        raise EkError(f"{split_dir(data_root, split)}: no records with {MASK_FILE}")
    path = layout.labels_cache(split)
    key = sources.fingerprint
    if not _is_current(path, key, sources):
        side = load_mask(record_dir(data_root, split, sources.ids[0])).shape[0]
        shape = ((len(sources.ids), side, side), np.dtype(np.uint8))
        arrays = {"labels": shape, "soft": shape}
        _build(path, sources, key, arrays, _fill_labels, workers, f"labels {split}")
    return open_entry(path)


def _is_current(path: Path, key: str, sources: Sources) -> bool:
    """Whether the entry at ``path`` was built from these sources; logs what changed if not."""
    old_key = _meta(path).get("key")
    if old_key is None or old_key == key:
        return old_key == key
    change = describe_change(path, sources)
    log.warning("%s: %s since it was built; rebuilding", path, change)
    return False


class LabelReader:
    """Labels of fixed records (columns ``record_id``, ``split``), read in any slices.

    Each split's label cache is opened and indexed once, so reading a large set chunk by
    chunk costs no repeated directory listing.
    """

    def __init__(self, layout: Layout, data_root: Path, records: pd.DataFrame, soft: bool = False):
        if len(records) == 0:
            raise EkError("no records to load labels for (empty pool)")
        key = "soft" if soft else "labels"
        task = workdir_task(layout)
        self.splits = records["split"].to_numpy()
        self.rows = np.empty(len(records), dtype=np.int64)
        self.arrays = {}
        for split in pd.unique(self.splits):
            entry = split_labels(layout, data_root, str(split), task)
            members = self.splits == split
            if task.kind == "contrails":
                _refuse_unlabelled(data_root, str(split), records["record_id"][members], entry)
            self.arrays[split] = entry.arrays.get(key, entry.arrays["labels"])
            self.rows[members] = entry.index_of(records["record_id"][members].tolist())

    def read(self, positions: slice | np.ndarray = slice(None)) -> np.ndarray:
        """uint8 labels ``(n, H, W)`` (``(n, C, H, W)`` for several classes) of the records at
        ``positions``, in row order."""
        splits, rows = self.splits[positions], self.rows[positions]
        first = next(iter(self.arrays.values()))
        result = np.empty((len(rows), *first.shape[1:]), dtype=np.uint8)
        for split, array in self.arrays.items():
            members = splits == split
            if members.any():
                result[members] = array[rows[members]]
        return result


def split_labels(layout: Layout, data_root: Path, split: str, task: Task) -> CacheEntry:
    """The label cache of a split of the workdir's task (contrail records or image masks)."""
    if task.kind == "contrails":
        return ensure_labels(layout, data_root, split)
    return ensure_image_labels(layout, task, data_root, split)


def split_inputs(
    layout: Layout,
    data_root: Path,
    split: str,
    spec: InputSpec,
    task: Task,
    workers: int | None = None,
) -> CacheEntry:
    """The input cache of a split: a config's contrail inputs (built by ``workers``
    processes), or the task's images."""
    if task.kind == "contrails":
        return ensure_inputs(layout, data_root, split, spec, workers)
    return ensure_image_inputs(layout, task, data_root, split)


def prepare_inputs(
    layout: Layout, data_root: Path, split: str, spec: InputSpec, workers: int | None = None
) -> CacheEntry | None:
    """``ek prepare``: the input cache of a split for the workdir's task (built when stale);
    None where the data folder has no such split."""
    task = workdir_task(layout)
    folder = split_folder(task, data_root, split)  # contrails: DATA/<split>
    if folder is None or not folder.is_dir():
        return None
    return split_inputs(layout, data_root, split, spec, task, workers)


def _refuse_unlabelled(data_root: Path, split: str, ids, entry: CacheEntry) -> None:
    """A record without a mask is named as such (the label cache holds labelled records)."""
    known = set(entry.ids)
    missing = [rid for rid in ids if rid not in known]
    if missing:
        folder = record_dir(data_root, split, missing[0])
        raise EkError(
            f"{folder}: no {MASK_FILE} ({len(missing)} such record(s)); a record needs its "
            "mask to be trained on or scored"
        )


def load_labels(
    layout: Layout, data_root: Path, records: pd.DataFrame, soft: bool = False
) -> np.ndarray:
    """Labels of ``records`` (columns ``record_id``, ``split``) in row order, uint8 ``(N, H, W)``.

    Hard labels are 0/1; ``soft=True`` gives the annotators' mean x 255.
    """
    return LabelReader(layout, data_root, records, soft).read()


def open_entry(path: Path) -> CacheEntry:
    files = cache_files(path)
    meta = read_json(files["meta"])
    ids = pd.read_csv(files["ids"], dtype={"record_id": str})["record_id"].tolist()
    arrays = {name: np.load(cache_array(path, name), mmap_mode="r") for name in meta["arrays"]}
    return CacheEntry(path=path, ids=ids, arrays=arrays, sources=meta.get("sources"))


def _meta(path: Path) -> dict:
    try:
        return read_json(cache_files(path)["meta"])
    except (OSError, ValueError):
        return {}


def band_stats(layout: Layout, data_root: Path, spec: InputSpec) -> dict:
    """Per-band statistics of the training pool (a spread-out sample of ``train``), saved once.

    Keyed by the data root, the bands and the fingerprint of the sampled records' band files.
    """
    ids = list_records(data_root, "train")
    sample = ids[:: max(1, len(ids) // STATS_RECORDS)]
    files = tuple(band_file(b) for b in spec.bands)
    fingerprint = records_fingerprint(data_root, "train", sample, files)
    key = digest_json([str(Path(data_root).resolve()), list(spec.bands), sample, fingerprint])
    path = layout.band_stats_json(key)
    if path.is_file():
        return read_json(path)
    folders = [record_dir(data_root, "train", rid) for rid in sample]
    stats = band_statistics(folders, spec.bands, tuple(range(N_FRAMES)))
    write_json(path, stats)
    return stats


class _InputFiller:
    """Picklable worker body: writes inputs of a chunk of records."""

    def __init__(self, spec: InputSpec, stats: dict | None):
        self.spec, self.stats = spec, stats

    def __call__(self, arrays: dict[str, np.ndarray], rows: range, folders: list[Path]) -> None:
        out = arrays["inputs"]
        for row, folder in zip(rows, folders):
            values = build_input(folder, self.spec, self.stats)
            if values.shape != out.shape[1:]:
                raise EkError(f"{folder}: input shape {values.shape} differs from {out.shape[1:]}")
            out[row] = to_codes(values) if out.dtype == np.uint8 else values


def _fill_labels(arrays: dict[str, np.ndarray], rows: range, folders: list[Path]) -> None:
    for row, folder in zip(rows, folders):
        mask = load_mask(folder)
        if mask.shape != arrays["labels"].shape[1:]:
            raise EkError(f"{folder / MASK_FILE}: shape {mask.shape} differs from the others")
        soft = load_soft_label(folder)
        if soft is not None and soft.shape != mask.shape:
            raise EkError(
                f"{folder / INDIVIDUAL_FILE}: shape {soft.shape} differs from "
                f"{MASK_FILE}'s {mask.shape}"
            )
        arrays["labels"][row] = mask
        arrays["soft"][row] = mask * 255 if soft is None else to_codes(soft)


def _run_chunk(task: tuple) -> int:
    tmp, specs, filler, start, folders = task
    arrays = {name: np.load(cache_array(tmp, name), mmap_mode="r+") for name in specs}
    filler(arrays, range(start, start + len(folders)), folders)
    for array in arrays.values():
        array.flush()
    return len(folders)


def _build(
    path: Path,
    sources: Sources,
    key: str,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    filler: Callable,
    workers: int | None,
    label: str,
) -> None:
    started = time.perf_counter()
    remove_dead_builds(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    folders = [record_dir(sources.root, sources.split, rid) for rid in sources.ids]
    try:
        allocate_arrays(tmp, specs)
        tasks = [
            (tmp, list(specs), filler, start, folders[start : start + CHUNK])
            for start in range(0, len(folders), CHUNK)
        ]
        _run_tasks(tasks, workers, label, total=len(folders))
        with user_errors(path.parent):
            _write_index(tmp, sources, specs, key)
            _install(tmp, path, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "%s: %d records in %.1f s -> %s", label, len(folders), time.perf_counter() - started, path
    )


def _write_index(tmp: Path, sources: Sources, specs: Mapping, key: str) -> None:
    """A build's ``ids.csv``, ``sources.npy`` and ``meta.json`` (written last: its key)."""
    files = cache_files(tmp)
    pd.DataFrame({"record_id": sources.ids}).to_csv(files["ids"], index=False)
    np.save(files["sources"], sources.table)
    meta = {"arrays": list(specs), "ids": digest_json(sources.ids), "key": key}
    files["meta"].write_text(json.dumps({**meta, "sources": sources.record()}))


def allocate_arrays(folder: Path, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Create the ``.npy`` files of a build with their disk space reserved up front.

    A memmap written on a full disk kills the process with SIGBUS (a worker then never
    reports back); reserving the blocks first turns a full disk into one line, before any
    record is read.

    Raises:
        EkError: ``<folder>: no space left on device (needed ~N MB)``.
    """
    needed = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in specs.values())
    with user_errors(folder.parent, needed_bytes=needed):
        folder.mkdir(parents=True)
        if shutil.disk_usage(folder).free < needed:
            raise OSError(errno.ENOSPC, "No space left on device")
        for name, (shape, dtype) in specs.items():
            file = cache_array(folder, name)
            np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape).flush()
            with open(file, "r+b") as handle:
                try:
                    os.posix_fallocate(handle.fileno(), 0, file.stat().st_size)
                except OSError as err:
                    if err.errno != errno.EOPNOTSUPP:  # a file system without fallocate
                        raise


def remove_dead_builds(path: Path) -> None:
    """Remove the temporary build folders of ``path`` left by processes that died."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            log.info("%s: removing the build of a process that ended", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _install(tmp: Path, path: Path, key: str) -> None:
    """Rename a finished build onto ``path``; keep a copy of the same key built meanwhile."""
    for _ in range(3):
        try:
            os.rename(tmp, path)  # fails while ``path`` exists (a directory not empty)
            return
        except OSError:
            if _meta(path).get("key") == key:
                return  # another process built the same entry: use theirs
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        try:
            os.rename(path, aside)  # open memmaps of the old entry stay valid
        except FileNotFoundError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise EkError(f"{path}: could not replace the cache entry (is another process rebuilding it?)")


def _run_tasks(tasks: list[tuple], workers: int | None, label: str, total: int) -> None:
    # Spawned workers cost seconds to start: small builds run in-process.
    workers = min(workers or os.cpu_count() or 1, 8, len(tasks)) if total >= 256 or workers else 1
    # no terminal (a log file, CI): no bar; _build logs one line per build
    bar = tqdm(
        total=total, desc=label, unit="rec", leave=False, disable=True if total < 64 else None
    )
    for done in run_in_workers(_run_chunk, tasks, workers, label):
        bar.update(done)
    bar.close()


def run_in_workers(function: Callable, tasks: list, workers: int, label: str) -> Iterator:
    """Yield ``function(task)`` for every task, in ``workers`` spawned processes (here if 1).

    A worker that dies (killed, out of memory, SIGBUS) ends the whole run with one line
    instead of a pool waiting forever for its task; an :class:`EkError` raised in a worker
    comes back as itself.

    Raises:
        EkError: ``<label>: a worker process died (...)``.
    """
    if workers <= 1:
        yield from map(function, tasks)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(function, task) for task in tasks]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool:
            raise EkError(
                f"{label}: a worker process died (killed, out of memory, or a full disk); "
                "rerun with --workers 1 to see its error"
            ) from None
        finally:
            for future in futures:
                future.cancel()


def _build_arrays(
    path: Path,
    key: str,
    ids: list[str],
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    fill: Callable[[dict[str, np.ndarray], int, list[str]], None],
    label: str,
    sources: dict | None = None,
) -> CacheEntry:
    """Build an image-task entry in-process, chunk by chunk, into a folder renamed into place.

    ``sources``: what it reads (:func:`~.sources.paths_source`), kept in ``meta.json`` for
    the folds trained on it."""
    if _meta(path).get("key") == key:
        return open_entry(path)
    started = time.perf_counter()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        arrays: dict[str, np.ndarray] = {
            name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=d, shape=s)
            for name, (s, d) in specs.items()
        }
        for start in tqdm(range(0, len(ids), CHUNK), desc=label, disable=len(ids) < 64):
            fill(arrays, start, ids[start : start + CHUNK])
        for array in arrays.values():
            array.flush()  # type: ignore[attr-defined]
        del arrays
        pd.DataFrame({"record_id": ids}).to_csv(tmp / "ids.csv", index=False)
        meta = {"arrays": list(specs), "ids": digest_json(ids), "key": key, "sources": sources}
        (tmp / "meta.json").write_text(json.dumps(meta))
        _install(tmp, path, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: %d images in %.1f s -> %s", label, len(ids), time.perf_counter() - started, path)
    return open_entry(path)


def ensure_image_inputs(layout: Layout, task: Task, data_root: Path, split: str) -> CacheEntry:
    """The input cache of an image task's split: ``inputs`` ``(N, C, H, W)``, built when stale.

    uint8 codes (``round(x * 255)``) for image files; float16 where a split holds ``.npy``
    images (their values are kept as stored). Keyed, like the contrail caches, by the data
    root, the task and the split's image ids (the folder) and by the size and ``mtime_ns`` of
    every image (the entry's key).
    """
    files = image_files(task, data_root, split)
    ids = list(files)
    if not ids:
        raise EkError(f"{split_folder(task, data_root, split)}: no images")
    paths = list(files.values())
    dtype = np.dtype(np.float16 if any(p.suffix == ".npy" for p in paths) else np.uint8)
    name = digest_json([str(Path(data_root).resolve()), task.digest, split, digest_json(ids)])
    path = layout.cache_dir / f"{split}-images-{name}"

    def fill(arrays: dict[str, np.ndarray], start: int, chunk: list[str]) -> None:
        for row, image_id in enumerate(chunk, start):
            image = read_image(task, files[image_id])
            arrays["inputs"][row] = np.rint(image * 255.0) if dtype == np.uint8 else image

    shape = (len(ids), task.channels, *task.size)
    key = files_fingerprint(paths)
    read = paths_source(data_root, [str(split_folder(task, "", split))])
    spec = {"inputs": (shape, dtype)}
    return _build_arrays(path, key, ids, spec, fill, f"images {split}", read)


def ensure_image_labels(layout: Layout, task: Task, data_root: Path, split: str) -> CacheEntry:
    """The label cache of an image task's split: ``labels`` uint8, built when stale.

    ``(N, C, H, W)`` of 0/1 for C > 1 classes, ``(N, H, W)`` for one class (the contrail
    labels' shape). Keyed by the mask files' (or the mask CSV's) size and ``mtime_ns``.
    """
    location = mask_location(task, data_root, split)
    if location is None or not location.exists():
        raise EkError(f"task {task.name}: split '{split}' has no masks")
    ids = list_images(task, data_root, split)
    if task.masks.source == "csv":
        sources = [location, *image_files(task, data_root, split).values()]
    else:
        sources = [location / f"{Path(i).stem}{MASK_SUFFIX}" for i in ids]
    name = digest_json([str(Path(data_root).resolve()), task.digest, split])
    path = layout.cache_dir / f"{split}-labels-{name}"
    rows = mask_rows(task, data_root, split)

    def fill(arrays: dict[str, np.ndarray], start: int, chunk: list[str]) -> None:
        block = read_masks(task, data_root, split, chunk, rows)
        arrays["labels"][start : start + len(chunk)] = block[:, 0] if task.n_classes == 1 else block

    classes = () if task.n_classes == 1 else (task.n_classes,)
    shape = (len(ids), *classes, *task.size)
    key = files_fingerprint([p for p in sources if p.exists()])
    spec = {"labels": (shape, np.dtype(np.uint8))}
    read = paths_source(data_root, [str(mask_location(task, "", split))])
    return _build_arrays(path, key, ids, spec, fill, f"labels {split}", read)
