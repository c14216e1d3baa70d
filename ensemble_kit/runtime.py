"""How a config runs on a device: which device, AMP dtype, memory format, compile."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config
from .errors import EkError
from .registry import AMP_MODES

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
