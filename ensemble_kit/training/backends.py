"""Where fold jobs run: here (``local``, one at a time or ``jobs`` processes side by side) or as
Ray tasks on a cluster (``ray``).

A backend changes where a fold runs, never what it writes: each takes the fold function
itself (``run_jobs(jobs, fold_fn, backend, options)``), so this module knows nothing of
``cv``. A job only needs a ``str()`` that names it (``tiny fold 0``).

Determinism: on CPU, torch's float sums depend on the number of threads, so every fold runs
on a fixed thread count (:func:`~ensemble_kit.runtime.fixed_threads`; each fold process and
Ray task starts with :func:`~ensemble_kit.runtime.set_process_threads`) and writes the same
bytes on every backend and in any process for the same ``cpus_per_job``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EkError
from ..registry import BACKENDS
from ..runtime import default_threads, fixed_threads, set_process_threads

log = logging.getLogger(__name__)

FoldFn = Callable[[Any], dict | None]  # None: the fold's lock was held elsewhere
KILL_ONCE_ENV = "EK_TEST_KILL_ONCE"  # test hook: see _arm_test_kill


@dataclass(frozen=True)
class BackendOptions:
    """How many folds run at once and with what.

    Attributes:
        jobs: Local backend: folds side by side, each in its own process.
        cpus_per_job: CPU threads of one fold (torch and numba; Ray: also the task's CPU
            request). Default: local, :func:`~ensemble_kit.runtime.default_threads`; Ray, 1.
        gpus_per_job: Ray: GPUs per task (fractions share a GPU). Default: 1 when the
            cluster has GPUs and ``use_gpus``, else 0.
        use_gpus: Whether folds may use GPUs (false for ``--device cpu``).
        address: Ray cluster address; None starts a local Ray (or uses ``RAY_ADDRESS``).
        max_retries: Ray: retries of a task whose worker died.
    """

    jobs: int = 1
    cpus_per_job: int | None = None
    gpus_per_job: float | None = None
    use_gpus: bool = True
    address: str | None = None
    max_retries: int = 3


@dataclass(frozen=True)
class FoldResult:
    """What one finished job returned, and where and how long it ran."""

    job: Any
    summary: dict | None  # None: another process held the fold's lock
    seconds: float
    node: str


OnDone = Callable[[FoldResult], None]


class FoldsFailed(EkError):
    """Some jobs failed; the others ran to the end. ``results`` holds the finished ones."""

    def __init__(self, failures: list[str], results: list[FoldResult]):
        super().__init__(
            f"{len(failures)} fold(s) failed: {'; '.join(failures)} "
            "(the others finished; rerun the same command to resume)"
        )
        self.results = results


def run_jobs(
    jobs: Sequence,
    fold_fn: FoldFn,
    backend: str = "local",
    options: BackendOptions | None = None,
    on_done: OnDone | None = None,
) -> list:
    """Run ``fold_fn`` on every job and return the summaries in job order.

    Args:
        jobs: Picklable jobs (``cv.FoldJob``); ``str(job)`` names one in messages.
        fold_fn: A module-level function (pickled by reference for other processes).
        backend: ``local`` or ``ray``.
        options: :class:`BackendOptions` (default: one local job at a time).
        on_done: Called with a :class:`FoldResult` as each job finishes.

    Raises:
        FoldsFailed: After every other job finished, when some failed (parallel runs only;
            one local job at a time raises the fold's own error at once).
    """
    options = options or BackendOptions()
    if options.jobs < 1:
        raise EkError(f"--jobs must be at least 1, got {options.jobs}")
    return BACKENDS.get(backend)(jobs, fold_fn, options, on_done or (lambda result: None))


def timed_fold(fold_fn: FoldFn, job: Any, threads: int | None) -> tuple[dict | None, float, str]:
    """Run one job here: ``(summary, seconds, host name)``, with ``threads`` CPU threads."""
    started = time.perf_counter()
    with fixed_threads(threads), _test_kill_armed(job):
        summary = fold_fn(job)
    return summary, time.perf_counter() - started, socket.gethostname()


@BACKENDS.register("local")
def _run_local(jobs: Sequence, fold_fn: FoldFn, options: BackendOptions, on_done: OnDone):
    if options.jobs > 1 and len(jobs) > 1:
        return _run_processes(jobs, fold_fn, options, on_done)
    summaries = []
    for job in jobs:
        result = FoldResult(job, *timed_fold(fold_fn, job, options.cpus_per_job))
        on_done(result)
        summaries.append(result.summary)
    return summaries


def _run_processes(jobs: Sequence, fold_fn: FoldFn, options: BackendOptions, on_done: OnDone):
    """Up to ``options.jobs`` folds at once, each in a fresh (spawned) process."""
    context = multiprocessing.get_context("spawn")
    slots = _slot_environments(options)
    free, waiting = list(range(len(slots))), list(enumerate(jobs))
    running: dict[int, tuple] = {}  # process sentinel -> (process, pipe, index, slot)
    results: dict[int, FoldResult] = {}
    failures: list[str] = []
    while waiting or running:
        while waiting and free:
            index, job = waiting.pop(0)
            slot = free.pop(0)
            process, pipe = _start(context, fold_fn, job, slots[slot])
            running[process.sentinel] = (process, pipe, index, slot)
        for sentinel in multiprocessing.connection.wait(list(running)):
            process, pipe, index, slot = running.pop(sentinel)  # type: ignore[arg-type]
            free.append(slot)
            outcome = _collect(process, pipe, jobs[index])
            if isinstance(outcome, str):
                failures.append(outcome)
                log.error("%s", outcome)
            else:
                results[index] = outcome
                on_done(outcome)
    if failures:
        raise FoldsFailed(failures, [results[i] for i in sorted(results)])
    return [results[i].summary for i in range(len(jobs))]


def _slot_environments(options: BackendOptions) -> list[dict[str, str]]:
    """Environment of each of the ``jobs`` process slots: one GPU each, or a share of CPUs."""
    threads = options.cpus_per_job or default_threads(options.jobs)
    gpus = _visible_gpus() if options.use_gpus else []
    slots = []
    for slot in range(options.jobs):
        env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        slots.append(env)
    return slots


def _visible_gpus() -> list[str]:
    """Ids of the GPUs this process may use (honouring its own ``CUDA_VISIBLE_DEVICES``)."""
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()][:count]
    return [str(i) for i in range(count)]


def _start(context, fold_fn: FoldFn, job: Any, env: dict[str, str]):
    receiver, sender = context.Pipe(duplex=False)
    threads = int(env["OMP_NUM_THREADS"])
    process = context.Process(
        target=_child,
        args=(sender, fold_fn, job, threads, logging.getLogger().getEffectiveLevel()),
        name=str(job),
    )
    with _environment(env):  # a spawned child starts with the parent's environment
        process.start()
    sender.close()
    return process, receiver


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _child(pipe, fold_fn: FoldFn, job: Any, threads: int, level: int) -> None:
    """Body of a fold process: run the job, send ``("ok", result)`` or ``("error", text)``."""
    logging.basicConfig(level=level, format=f"[{job}] %(message)s")
    set_process_threads(threads)
    try:
        summary, seconds, node = timed_fold(fold_fn, job, threads)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which names the fold
        # short, so that it always fits the pipe's buffer (the parent reads after the exit)
        pipe.send(("error", f"{type(err).__name__}: {err}"[:2000]))
        raise SystemExit(1) from None
    pipe.send(("ok", (summary, seconds, node)))


def _collect(process, pipe, job: Any) -> FoldResult | str:
    """The finished process's result, or a one-line description of how it failed."""
    try:
        message = pipe.recv() if pipe.poll() else None
    except EOFError:  # it died before sending anything
        message = None
    process.join()
    pipe.close()
    if message is not None and message[0] == "ok":
        return FoldResult(job, *message[1])
    if message is not None:
        return f"{job} ({message[1]})"
    return f"{job} (process died with exit code {process.exitcode})"


@BACKENDS.register("ray")
def _run_ray(jobs: Sequence, fold_fn: FoldFn, options: BackendOptions, on_done: OnDone):
    try:
        import ray
    except ImportError:
        raise EkError("the ray backend needs Ray: pip install 'ensemble-kit[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        _init_ray(ray, options)
    try:
        return _run_ray_tasks(ray, jobs, fold_fn, options, on_done)
    finally:
        if started_here:
            ray.shutdown()


def _init_ray(ray, options: BackendOptions) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a small local Ray."""
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    address = options.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            # the object store holds only small summaries: 80 MB instead of 30 % of RAM
            ray.init(object_store_memory=80 * 2**20, **quiet)
    except ConnectionError as err:
        raise EkError(f"--address {address}: cannot connect to Ray ({err})") from None
    log.info("ray: %s", ray.cluster_resources())


def _run_ray_tasks(ray, jobs: Sequence, fold_fn: FoldFn, options: BackendOptions, on_done):
    cpus = options.cpus_per_job or 1
    gpus = options.gpus_per_job
    if gpus is None:
        gpus = 1 if options.use_gpus and ray.cluster_resources().get("GPU", 0) else 0
    task = ray.remote(_ray_task).options(
        num_cpus=cpus, num_gpus=gpus, max_retries=options.max_retries, retry_exceptions=False
    )
    index_of = {task.remote(fold_fn, job, cpus): i for i, job in enumerate(jobs)}
    pending, results, failures = list(index_of), {}, []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        index = index_of[done[0]]
        try:
            results[index] = FoldResult(jobs[index], *ray.get(done[0]))
        except ray.exceptions.RayError as err:
            failures.append(f"{jobs[index]} ({_ray_cause(err)})")
            log.error("%s", failures[-1])
            continue
        on_done(results[index])
    if failures:
        raise FoldsFailed(failures, [results[i] for i in sorted(results)])
    return [results[i].summary for i in range(len(jobs))]


def _ray_task(fold_fn: FoldFn, job: Any, threads: int) -> tuple[dict | None, float, str]:
    """Body of a Ray task: the process edge of a fold on a Ray worker."""
    set_process_threads(threads)
    return timed_fold(fold_fn, job, threads)


def _ray_cause(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(err).strip().splitlines()[0]


@contextlib.contextmanager
def _test_kill_armed(job: Any) -> Iterator[None]:
    """Test hook: with ``EK_TEST_KILL_ONCE=<marker>|<job>|<file>`` set, the process running
    the job named ``<job>`` exits at once (as a killed worker would) when ``<file>`` appears
    (e.g. its fold's ``last.pt``), first copying it to ``<marker>``, which also makes it
    fire only once. Never armed without the variable.
    """
    marker, name, watched = (os.environ.get(KILL_ONCE_ENV, "").split("|") + ["", ""])[:3]
    if not marker or name != str(job):
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            if os.path.exists(watched):
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return
                with os.fdopen(fd, "wb") as out, open(watched, "rb") as source:
                    out.write(source.read())  # what the retry must resume from
                os._exit(17)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
