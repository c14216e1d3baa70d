"""How a config runs on a device: which device, AMP dtype, memory format, compile."""

from __future__ import annotations

from dataclasses import dataclass

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
