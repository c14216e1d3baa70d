"""How a process and a config run: CPU thread counts; device, AMP dtype, memory format, compile.

Thread counts are set at the process edge, as nnU-Net's entry points do: every process start
(an ``ek`` command, a fold process of ``--jobs N``, a Ray task) calls
:func:`set_process_threads`, and the count is set again only through the helpers here:
:func:`fixed_threads` around each fold run in-process (``--jobs 1``) and
:func:`torch_threads_kept` around a numba parallel kernel in training.

Why torch and numba together: on CPU, torch's float sums depend on its thread count, so a
fold writes the same bytes only on a fixed count. Numba's OpenMP layer, when it starts (at
a process's first numba parallel call or ``numba.set_num_threads``), sets the OpenMP thread
count, which torch shares, to the size of numba's pool: measured, a torch op,
``torch.set_num_threads(1)``, one numba parallel call, then ``torch.get_num_threads() == 2``.
A fold then wrote different bytes depending on what ran before it in the process. So
:func:`set_process_threads` sets numba first (starting its layer) and torch after it; where
numba may start later (a fold trained in a process that did not pass through the edge),
:func:`torch_threads_kept` restores torch's count after the kernel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numba
import torch

from .config import Config
from .errors import EkError
from .registry import AMP_MODES, did_you_mean

AMP_MODES.register("auto")(lambda device: torch.bfloat16 if device.type == "cuda" else None)
AMP_MODES.register("none")(lambda device: None)
AMP_MODES.register("bf16")(lambda device: torch.bfloat16)
AMP_MODES.register("fp16")(lambda device: torch.float16)


@dataclass(frozen=True)
class Runtime:
    """How a config runs on a device: AMP dtype, memory format, compile."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool

    @property
    def use_scaler(self) -> bool:
        return self.amp_dtype == torch.float16


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or None): CUDA when present, else CPU; a missing CUDA is an :class:`EkError`."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EkError(f"--device {name}: CUDA is not available on this machine")
    return device


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an AMP mode on ``device`` (``auto``: bf16 on CUDA, none on CPU)."""
    return AMP_MODES.get(mode)(device)


def resolve_runtime(config: Config, device: torch.device) -> Runtime:
    channels_last = config.train.channels_last
    if channels_last == "auto":
        # On CPU, NHWC trained ~8 % faster here, but a resumed run then no longer reproduced an
        # uninterrupted one bit for bit; resumable determinism wins, so CUDA only.
        channels_last = device.type == "cuda"
    return Runtime(
        device, amp_dtype(config.train.amp, device), bool(channels_last), config.train.compile
    )


def default_threads(jobs: int = 1) -> int:
    """CPU threads of one of ``jobs`` folds side by side: ``OMP_NUM_THREADS`` for one job when
    set, else the usable CPUs split evenly."""
    if jobs == 1 and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // jobs)


def set_process_threads(threads: int | None = None) -> int:
    """At a process start: torch and numba on ``threads`` CPU threads.

    Args:
        threads: The count; None: :func:`default_threads`. Numba gets at most the pool it
            started with (``NUMBA_NUM_THREADS``).

    Returns:
        The count torch now uses.
    """
    threads = threads or default_threads()
    # numba first: starting its OpenMP layer resets torch's count (see the module docstring)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Torch and numba on ``threads`` (None: :func:`default_threads`) for one fold, then back
    to the counts before it (a fold run in a process that goes on after it)."""
    saved = torch.get_num_threads(), numba.get_num_threads()
    try:
        yield set_process_threads(threads)
    finally:
        numba.set_num_threads(saved[1])
        torch.set_num_threads(saved[0])


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Around a numba parallel kernel: torch's thread count afterwards is the one before."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
BF16_CAPABILITY = (8, 0)  # Ampere: the first CUDA GPUs with bf16 arithmetic and cuDNN kernels
PRECISION_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def choose_precision(precision: str, capability: tuple[int, int] | None) -> torch.dtype | None:
    """The inference autocast dtype for a device (None: plain fp32).

    Args:
        precision: ``auto``, ``fp32``, ``fp16`` or ``bf16``; the named ones are taken as is.
        capability: The CUDA compute capability ``(major, minor)``, None for a CPU.

    Returns:
        With ``auto``: None on CPU, fp16 below sm80 (T4 is sm75, P100 sm60: no bf16, which
        torch < 2.4 refuses and later torch emulates slowly), bf16 from sm80 on.
    """
    if precision not in PRECISIONS:
        raise EkError(
            f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}"
            + did_you_mean(precision, PRECISIONS)
        )
    if precision != "auto":
        return PRECISION_DTYPES[precision]
    if capability is None:
        return None
    return torch.bfloat16 if tuple(capability) >= BF16_CAPABILITY else torch.float16


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device, None for any other device."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """:func:`choose_precision` for ``device``."""
    return choose_precision(precision, device_capability(device))


def resolve_devices(name: str | None) -> list[torch.device]:
    """The devices prediction splits its records across, one worker each.

    ``auto`` (or None): every visible CUDA device (both T4s of Kaggle's "T4 x 2"), else the
    CPU; a comma-separated list (``cuda:0,cuda:1``, ``cpu,cpu``) names them; any other name
    is one device (:func:`resolve_device`).
    """
    if name in (None, "auto") and torch.cuda.is_available():
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return [resolve_device(part.strip()) for part in (name or "auto").split(",")]
