"""Config -> segmentation model: any smp architecture on any smp or timm (``tu-``) encoder.

``build_model(config)`` returns a module mapping ``(B, in_channels, H, W)`` to logits
``(B, 1, H, W)`` at the input's (label) resolution, whatever happens inside:

- ``model.upsample`` / ``model.upsample_size``: the input is resized up (bilinear), the net
  runs at the larger size and its logits are averaged back down (``area``), as the top
  solutions did (256 -> 512 or 1024).
- Sizes the architecture cannot take are padded (replicate) up to a multiple of the
  encoder's output stride and the logits cropped back; PAN needs at least 128 px.
- ``model.temporal: mix``: the encoder runs on each frame, a learned 1x1 conv mixes the
  frames at every encoder level (:class:`FrameMix`, started as the frames' mean), then the
  smp decoder and head run on the mixed features (2nd/3rd place style temporal mixing).
  Levels a decoder ignores (FPN the stride-2 one, DeepLabV3 all but the deepest) keep
  mixer weights without gradients: use ``find_unused_parameters`` under DDP.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ModelSpec
from .errors import EkError
from .registry import did_you_mean

ARCHITECTURES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        smp.Unet,
        smp.UnetPlusPlus,
        smp.FPN,
        smp.DeepLabV3,
        smp.DeepLabV3Plus,
        smp.Linknet,
        smp.PSPNet,
        smp.MAnet,
        smp.PAN,
        smp.UPerNet,
        smp.Segformer,
        smp.DPT,
    )
}
# DPT's encoder returns (features, prefix tokens): not the plain feature list FrameMix mixes.
TEMPORAL_MIX_ARCHITECTURES = tuple(name for name in ARCHITECTURES if name != "DPT")
# Smallest working side, where smaller inputs fail deep inside the architecture.
MIN_SIZE = {"PAN": 128}


def build_model(
    config: Config, pretrained: bool = True, channels: tuple[int, int] | None = None
) -> nn.Module:
    """The model a config describes, returning logits at the input's resolution.

    Args:
        config: uses ``config.model`` and ``config.input`` (channels and frames).
        pretrained: load ``model.encoder_weights`` (from the local cache, or downloaded);
            False builds the bare architecture, as every load of a trained checkpoint does
            (``best.pt`` replaces the weights anyway, and loading must work offline).
        channels: ``(input, output)`` channels from ``task.model_channels`` for an image task
            or several classes; None: the config's contrail channels and one output.

    Returns:
        A module mapping ``(B, in, H, W)`` to logits ``(B, out, H, W)``.

    Raises:
        EkError: unknown architecture, encoder or decoder keyword; temporal mix on an
            architecture without it; pretrained weights neither cached nor downloadable.
    """
    return _build(config, pretrained, config.name, channels)


def _build(
    config: Config, pretrained: bool, source: str, channels: tuple[int, int] | None = None
) -> nn.Module:
    spec = config.model
    arch = architecture_name(spec.arch)
    frames = len(config.input.frames) if spec.temporal == "mix" else 1
    if frames > 1 and arch not in TEMPORAL_MIX_ARCHITECTURES:
        raise EkError(
            f"model.temporal 'mix' is not supported for {arch}; use one of "
            f"{', '.join(TEMPORAL_MIX_ARCHITECTURES)}"
        )
    in_channels, out_channels = channels or (config.input.in_channels, 1)
    if frames > 1:
        in_channels = config.input.channels_per_frame
    net: Any  # smp models expose their parts as attributes
    with _weights_offline_error(source, spec, pretrained):
        net = _create_smp(arch, spec, in_channels, pretrained, out_channels)
    if frames > 1:
        net = TemporalMix(net, frames)
    stride = net.encoder.output_stride if _needs_divisible(net) else 1
    return LabelResolution(
        net, spec.upsample, spec.upsample_size, stride, MIN_SIZE.get(arch, 0), arch
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def architecture_name(name: str) -> str:
    """The canonical architecture name for ``name`` (case-insensitive), else an EkError."""
    by_lower = {key.lower(): key for key in ARCHITECTURES}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    raise EkError(
        f"unknown model.arch '{name}'{did_you_mean(name, ARCHITECTURES, n=5)}; "
        f"choose one of {', '.join(ARCHITECTURES)}"
    )


def check_encoder(name: str) -> None:
    """Raise an EkError naming close encoders unless smp or timm (``tu-``) knows ``name``."""
    import timm

    smp_names = smp.encoders.get_encoder_names()
    if name in smp_names or (name.startswith("tu-") and timm.is_model(name[3:])):
        return
    if timm.is_model(name):
        raise EkError(
            f"unknown model.encoder '{name}' (did you mean tu-{name}? "
            "timm encoders take the 'tu-' prefix)"
        )
    known = smp_names + ["tu-" + model for model in timm.list_models()]
    raise EkError(
        f"unknown model.encoder '{name}'{did_you_mean(name, known, n=5)} "
        "(smp encoders by name, any timm model as 'tu-<timm name>')"
    )


def check_pretrained_weights(config: Config, source: str) -> None:
    """Build the model once with its pretrained encoder weights, so that a machine without
    them (offline, not cached) fails before any training starts, naming ``source``."""
    if config.model.encoder_weights is not None:
        _build(config, pretrained=True, source=source)


@contextlib.contextmanager
def _weights_offline_error(source: str, spec: ModelSpec, pretrained: bool) -> Iterator[None]:
    """Turn a failed weight download (hub unreachable, nothing cached) into one EkError line."""
    try:
        yield
    except OSError as error:  # huggingface_hub's and urllib's network errors are OSErrors
        if not pretrained or spec.encoder_weights is None:
            raise
        raise EkError(_offline_message(source, spec)) from error


def _offline_message(source: str, spec: ModelSpec) -> str:
    name = spec.encoder
    kind = "ImageNet" if str(spec.encoder_weights).lower() == "imagenet" else "pretrained"
    if name.startswith("tu-"):
        fetch = f"import timm; timm.create_model('{name[3:]}', pretrained=True)"
    else:
        fetch = (
            "import segmentation_models_pytorch as smp; "
            f"smp.encoders.get_encoder('{name}', weights='{spec.encoder_weights}')"
        )
    return (
        f"{source}: {kind} weights for {name} are not in the local cache and the hub is "
        f'unreachable; pre-fetch them where there is internet (python -c "{fetch}"), then '
        "copy ~/.cache/huggingface and ~/.cache/torch to this machine (or set HF_HOME / "
        "TORCH_HOME to a copy), or set model.encoder_weights: null"
    )


def _create_smp(
    arch: str, spec: ModelSpec, in_channels: int, pretrained: bool, classes: int = 1
) -> nn.Module:
    check_encoder(spec.encoder)
    weights: str | bool | None = spec.encoder_weights if pretrained else None
    if spec.encoder.startswith("tu-") and isinstance(weights, str):
        weights = True  # timm picks the pretrained tag from the name ('tu-model.tag')
    cls = ARCHITECTURES[arch]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(spec.decoder) - accepted)
    if unknown:
        raise EkError(
            f"model.decoder has {', '.join(unknown)}, unknown to {arch}; "
            f"it takes {', '.join(sorted(accepted))}"
        )
    try:
        return cls(
            encoder_name=spec.encoder,
            encoder_weights=weights,
            in_channels=in_channels,
            classes=classes,
            **spec.decoder,
        )
    except (ValueError, TypeError, AssertionError) as err:  # smp's own checks of the values
        if not spec.decoder:
            raise
        raise EkError(f"model.decoder {spec.decoder}: {arch} refuses it ({err})") from None


def _needs_divisible(net: nn.Module) -> bool:
    inner = net.net if isinstance(net, TemporalMix) else net
    return bool(getattr(inner, "requires_divisible_input_shape", True))


class LabelResolution(nn.Module):
    """Runs ``net`` at a (possibly) larger, padded size; returns logits at the input size.

    Up: bilinear with ``align_corners=False`` (pixel areas line up, no half-pixel drift);
    down: ``area`` averaging, an exact average pool for whole-number factors.
    """

    def __init__(
        self,
        net: nn.Module,
        upsample: float = 1.0,
        upsample_size: int | None = None,
        stride: int = 1,
        min_size: int = 0,
        arch: str = "",
    ):
        super().__init__()
        if upsample <= 0 or (upsample_size is not None and upsample_size <= 0):
            raise EkError("model.upsample and model.upsample_size must be positive")
        self.net = net
        self.upsample = float(upsample)
        self.upsample_size = upsample_size
        self.stride = max(1, int(stride))
        self.min_size = min_size
        self.arch = arch or type(net).__name__

    def work_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the net runs at; ``upsample_size`` sets the height, width keeps aspect."""
        scale = self.upsample_size / height if self.upsample_size else self.upsample
        return max(1, round(height * scale)), max(1, round(width * scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))  # plain ints: traced exports bake the size in
        work = self.work_size(*size)
        if min(work) < self.min_size:
            raise EkError(
                f"{self.arch} needs inputs of at least {self.min_size} px "
                f"(got {work[0]}x{work[1]}); raise model.upsample"
            )
        if work != size:
            x = F.interpolate(x, size=work, mode="bilinear", align_corners=False)
        x, pads = _pad_to_multiple(x, self.stride)
        logits = self.net(x)
        logits = logits[..., pads[2] : pads[2] + work[0], pads[0] : pads[0] + work[1]]
        if work != size:
            logits = F.interpolate(logits, size=size, mode="area")
        return logits


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad the last two dims (split evenly, so flips stay symmetric) up to ``multiple``."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    extra_h = math.ceil(height / multiple) * multiple - height
    extra_w = math.ceil(width / multiple) * multiple - width
    pads = (extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2)
    if not any(pads):
        return x, pads
    return F.pad(x, pads, mode="replicate"), pads


class FrameMix(nn.Module):
    """Mixes F frames' features of one encoder level into one: a 1x1 conv over the frames'
    concatenated channels, started as the plain mean of the frames (or a fixed mean when
    ``learned`` is false)."""

    def __init__(self, channels: int, frames: int, learned: bool = True):
        super().__init__()
        self.frames = frames
        self.conv = nn.Conv2d(channels * frames, channels, 1) if channels and learned else None
        if self.conv is not None:
            eye = torch.eye(channels).repeat(1, frames) / frames
            with torch.no_grad():
                self.conv.weight.copy_(eye[:, :, None, None])
                self.conv.bias.zero_()  # type: ignore[union-attr]  # bias=True above

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        per_frame = features.unflatten(0, (-1, self.frames))  # (B, F, C, h, w)
        if self.conv is None:
            return per_frame.mean(1)
        return self.conv(per_frame.flatten(1, 2))


class TemporalMix(nn.Module):
    """An smp model's encoder run per frame, frames mixed per level, then decoder and head.

    Input channels are frame-major: ``(B, F * C, H, W)`` holds frame 0's C channels first.
    """

    def __init__(self, net: Any, frames: int):
        super().__init__()
        self.net: Any = net
        self.frames = frames
        # Level 0 is the input itself, which smp decoders do not use: a fixed mean suffices.
        self.mixers = nn.ModuleList(
            FrameMix(c, frames, learned=level > 0)
            for level, c in enumerate(net.encoder.out_channels)
        )

    @property
    def encoder(self) -> Any:
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_frame = x.unflatten(1, (self.frames, -1)).flatten(0, 1)  # (B * F, C, H, W)
        features = self.net.encoder(per_frame)
        mixed = [mix(f) for mix, f in zip(self.mixers, features)]
        return self.net.segmentation_head(self.net.decoder(mixed))
