"""build_model: every smp architecture on a tiny timm encoder at 64 px, input upsampling,
padding, temporal frame mixing, and the errors for unknown names."""

from __future__ import annotations

import re

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from ensemble_kit.config import Config, InputSpec, ModelSpec
from ensemble_kit.errors import EkError
from ensemble_kit.models import (
    ARCHITECTURES,
    MIN_SIZE,
    TEMPORAL_MIX_ARCHITECTURES,
    LabelResolution,
    TemporalMix,
    build_model,
    count_parameters,
)

THREE_FRAMES = InputSpec(frames=(3, 4, 5))  # ash: 3 channels per frame, 9 in all


def make_config(frames: InputSpec = THREE_FRAMES, **model) -> Config:
    return Config(input=frames, model=ModelSpec(**model))


def net_input_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Record the shapes the wrapped net is called with."""
    shapes: list[tuple[int, ...]] = []
    model.net.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.filterwarnings("ignore:Encoder does not have prefix tokens")
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_returns_logits_at_input_size(arch):
    torch.manual_seed(0)
    upsample = MIN_SIZE.get(arch, 64) / 64  # PAN cannot run below 128 px
    model = build_model(make_config(arch=arch, upsample=upsample)).eval()
    x = torch.randn(2, 9, 64, 64)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 1, 64, 64)
    assert torch.isfinite(logits).all()


def test_pan_below_its_minimum_size_is_a_clear_error():
    model = build_model(make_config(arch="PAN"))
    with pytest.raises(EkError, match="PAN needs inputs of at least 128"):
        model(torch.randn(1, 9, 64, 64))


@pytest.mark.parametrize(
    ("arch", "upsample", "upsample_size", "net_side"),
    [
        ("Unet", 1.0, None, 64),
        ("Unet", 2.0, None, 128),
        ("Unet", 4.0, None, 256),
        ("Unet", 1.0, 96, 96),
        ("FPN", 1.0, 100, 128),  # FPN needs multiples of 32: padded 100 -> 128, cropped back
        ("FPN", 1.5, None, 96),
    ],
)
def test_upsampled_input_returns_logits_at_label_size(arch, upsample, upsample_size, net_side):
    model = build_model(make_config(arch=arch, upsample=upsample, upsample_size=upsample_size))
    shapes = net_input_shapes(model)
    with torch.no_grad():
        logits = model.eval()(torch.randn(2, 9, 64, 64))
    assert logits.shape == (2, 1, 64, 64)
    assert shapes == [(2, 9, net_side, net_side)]


def test_padding_is_cropped_back_exactly():
    # A pointwise net makes any misaligned crop visible.
    torch.manual_seed(0)
    pointwise = nn.Conv2d(4, 1, 1)
    model = LabelResolution(pointwise, stride=32)
    x = torch.randn(2, 4, 40, 50)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pointwise(x))


def test_upsampling_a_constant_image_gives_the_constant_back():
    pointwise = nn.Conv2d(1, 1, 1, bias=False)
    nn.init.ones_(pointwise.weight)
    x = torch.full((1, 1, 16, 16), 0.25)
    for model in (
        LabelResolution(pointwise, upsample=2),
        LabelResolution(pointwise, upsample_size=37),
    ):
        with torch.no_grad():
            torch.testing.assert_close(model(x), x)


@pytest.mark.parametrize("arch", ["Unet", "FPN"])
def test_temporal_mix_runs_the_encoder_per_frame_forward_and_backward(arch):
    torch.manual_seed(0)
    model = build_model(make_config(arch=arch, temporal="mix"))
    seen = []
    model.net.encoder.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    logits = model(torch.randn(2, 9, 64, 64))
    logits.square().mean().backward()
    assert logits.shape == (2, 1, 64, 64)
    assert seen == [(6, 3, 64, 64)]
    used_levels = model.net.mixers[1:] if arch == "Unet" else model.net.mixers[2:]  # FPN skips 1
    assert all(m.conv.weight.grad.abs().sum() > 0 for m in used_levels)


def plain_twin(mixed: nn.Module, arch: str) -> nn.Module:
    """A single-frame smp model carrying the temporal model's encoder, decoder and head."""
    twin = smp.create_model(arch, "tu-test_resnet", encoder_weights=None, in_channels=3)
    twin.load_state_dict(mixed.net.net.state_dict())
    return twin.eval()


@pytest.mark.parametrize("arch", ["Unet", "FPN"])
def test_temporal_mix_starts_as_the_mean_of_frames(arch):
    # Identical frames: the mean of equal features is the features, so the mixed model
    # equals the plain model on one frame.
    torch.manual_seed(0)
    mixed = build_model(make_config(arch=arch, temporal="mix")).eval()
    frame = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            mixed(frame.repeat(1, 3, 1, 1)), plain_twin(mixed, arch)(frame), atol=1e-5, rtol=1e-4
        )


def test_temporal_mix_reads_channels_frame_major():
    torch.manual_seed(0)
    mixed = build_model(make_config(arch="Unet", temporal="mix")).eval()
    for mixer in mixed.net.mixers[1:]:  # pick frame 1 only at every level
        channels = mixer.conv.out_channels
        weight = torch.zeros_like(mixer.conv.weight)
        weight[:, channels : 2 * channels, 0, 0] = torch.eye(channels)
        mixer.conv.weight.data.copy_(weight)
    x = torch.randn(2, 9, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            mixed(x), plain_twin(mixed, "Unet")(x[:, 3:6]), atol=1e-5, rtol=1e-4
        )


def test_temporal_mix_is_refused_where_unsupported():
    assert "DPT" not in TEMPORAL_MIX_ARCHITECTURES
    with pytest.raises(EkError, match="not supported for DPT"):
        build_model(make_config(arch="DPT", temporal="mix"))


def test_single_frame_temporal_mix_is_the_plain_model():
    model = build_model(make_config(frames=InputSpec(frames=(4,)), temporal="mix"))
    assert not isinstance(model.net, TemporalMix)


@pytest.mark.parametrize(
    ("arch", "close"), [("Unte", "Unet"), ("fpn", None), ("DeepLabV3+", "DeepLabV3")]
)
def test_architecture_names_are_case_insensitive_and_typos_list_close_names(arch, close):
    if close is None:
        assert isinstance(build_model(make_config(arch=arch)).net, smp.FPN)
        return
    with pytest.raises(
        EkError, match=rf"unknown model.arch .{re.escape(arch)}.*did you mean {close}"
    ):
        build_model(make_config(arch=arch))


@pytest.mark.parametrize(
    ("encoder", "close"),
    [
        ("tu-test_resnt", "tu-test_resnet"),
        ("resnet81", "resnet18"),
        ("test_resnet", "tu-test_resnet"),
    ],
)
def test_unknown_encoder_lists_close_names(encoder, close):
    with pytest.raises(EkError, match=rf"unknown model.encoder '{encoder}'.*{close}"):
        build_model(make_config(encoder=encoder))


def test_decoder_kwargs_pass_through_and_unknown_ones_are_named():
    small = build_model(make_config(decoder={"decoder_channels": [32, 16, 8, 8, 8]}))
    assert count_parameters(small) < count_parameters(build_model(make_config()))
    with pytest.raises(EkError, match="decoder_chanels, unknown to Unet"):
        build_model(make_config(decoder={"decoder_chanels": [8]}))


def test_a_training_step_changes_the_weights():
    torch.manual_seed(0)
    model = build_model(make_config(temporal="mix"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = torch.randn(2, 9, 64, 64), (torch.rand(2, 1, 64, 64) > 0.9).float()
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), target)
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = [k for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])]
    assert torch.isfinite(loss)
    assert any(".mixers." in k for k in changed) and any(".encoder." in k for k in changed)
    assert any(".decoder." in k for k in changed) and any("segmentation_head" in k for k in changed)


def test_count_parameters():
    # by hand: conv 3->8, 3x3 with bias = 3*8*9 + 8 = 224; linear 10->5 = 50 + 5 = 55
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(10, 5))
    assert count_parameters(model) == 279
    model[2].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 229
    assert count_parameters(model) == 279


@pytest.mark.slow
@pytest.mark.parametrize("arch", TEMPORAL_MIX_ARCHITECTURES)
def test_temporal_mix_on_every_supported_architecture(arch):
    upsample = MIN_SIZE.get(arch, 64) / 64
    model = build_model(make_config(arch=arch, temporal="mix", upsample=upsample))
    logits = model(torch.randn(2, 9, 64, 64))
    logits.mean().backward()
    assert logits.shape == (2, 1, 64, 64)


def test_a_decoder_value_smp_refuses_is_one_line_naming_the_key():
    from ensemble_kit.config import config_from_dict
    from ensemble_kit.errors import EkError
    from ensemble_kit.models import build_model

    config = config_from_dict(
        {
            "name": "bad",
            "model": {
                "arch": "FPN",
                "encoder": "tu-test_resnet",
                "encoder_weights": None,
                "decoder": {"decoder_segmentation_channels": 8},
            },
        }
    )
    with pytest.raises(EkError, match=r"model.decoder .*FPN refuses it"):
        build_model(config, pretrained=False)
