"""TTA: transforms against numpy, batched copies against one copy at a time and against
flipping by hand, chunk sizes, merge modes, several models, modes and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dihedral_reference import NUMPY_DIHEDRAL
from torch import nn

from ensemble_kit.config import TTA_NAMES, Config, ModelSpec
from ensemble_kit.errors import EkError
from ensemble_kit.inference.tta import auto_chunk, predict_probs, tta_inverse, tta_transform
from ensemble_kit.models import build_model

NUMPY = NUMPY_DIHEDRAL
NUMPY_INVERSE = {**NUMPY, "rot90": NUMPY["rot270"], "rot270": NUMPY["rot90"]}


def random_net(seed: int = 0) -> nn.Module:
    """A fixed random conv net; its odd, asymmetric kernels make it not flip-invariant."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 1, 5, padding=2))


def by_hand(net: nn.Module, x: torch.Tensor, name: str) -> np.ndarray:
    """Logits of one TTA copy, flipping with numpy on both sides of the net."""
    flipped = torch.from_numpy(np.ascontiguousarray(NUMPY[name](x.numpy())))
    with torch.no_grad():
        logits = net(flipped).numpy()
    return np.ascontiguousarray(NUMPY_INVERSE[name](logits))


def sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", TTA_NAMES)
@pytest.mark.parametrize("shape", [(2, 3, 6, 6), (2, 3, 5, 7)])
def test_transforms_match_numpy_and_invert(name, shape):
    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    x = torch.from_numpy(a)
    np.testing.assert_array_equal(tta_transform(x, name).numpy(), NUMPY[name](a))
    np.testing.assert_array_equal(tta_inverse(tta_transform(x, name), name).numpy(), a)


def test_the_eight_transforms_are_distinct():
    a = np.arange(16).reshape(4, 4)
    assert len({NUMPY[name](a).tobytes() for name in TTA_NAMES}) == 8


def test_the_net_is_not_flip_invariant(images):
    net = random_net()
    plain = by_hand(net, images, "identity")
    for name in TTA_NAMES[1:]:
        assert np.abs(by_hand(net, images, name) - plain).max() > 1e-2, name


@pytest.mark.parametrize("name", TTA_NAMES)
def test_each_copy_equals_flipping_by_hand(images, name):
    net = random_net()
    expected = sigmoid(by_hand(net, images, name))
    np.testing.assert_allclose(predict_probs([net], images, (name,)).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 1, 2, 3, 8])
def test_all_eight_batched_in_any_chunk_equals_one_at_a_time_by_hand(images, chunk):
    net = random_net()
    expected = np.mean([sigmoid(by_hand(net, images, name)) for name in TTA_NAMES], axis=0)
    got = predict_probs([net], images, TTA_NAMES, chunk=chunk)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_non_square_inputs_batch_only_copies_of_equal_shape(chunk):
    net = random_net()
    x = torch.randn(2, 3, 12, 20)
    expected = np.mean([sigmoid(by_hand(net, x, name)) for name in TTA_NAMES], axis=0)
    got = predict_probs([net], x, ("d4",), chunk=chunk)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_merge_modes_average_probabilities_or_logits(images):
    net = random_net()
    names = ("identity", "hflip", "rot90")
    logits = np.stack([by_hand(net, images, name) for name in names])
    mean = predict_probs([net], images, names, merge="mean").numpy()
    logit = predict_probs([net], images, names, merge="logit").numpy()
    np.testing.assert_allclose(mean, sigmoid(logits).mean(0), atol=1e-5)
    np.testing.assert_allclose(logit, sigmoid(logits.mean(0)), atol=1e-5)
    assert np.abs(mean - logit).max() > 1e-4
    # sigmoid is concave above 0: the mean of probabilities sits below sigmoid(mean logit) there
    assert (mean[logits.min(0) > 0] <= logit[logits.min(0) > 0] + 1e-7).all()


def test_identity_only_on_a_built_model_equals_sigmoid_of_its_logits():
    torch.manual_seed(0)
    model = build_model(Config(model=ModelSpec(arch="Unet", encoder="tu-test_resnet"))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x).sigmoid()
    torch.testing.assert_close(predict_probs([model], x), expected, atol=1e-6, rtol=0)


def test_several_models_are_averaged(images):
    nets = [random_net(0), random_net(1)]
    each = [predict_probs([net], images, ("identity", "vflip")) for net in nets]
    torch.testing.assert_close(
        predict_probs(nets, images, ("identity", "vflip")), (each[0] + each[1]) / 2
    )


def test_models_run_in_eval_mode_and_keep_their_modes(images):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
    net[1].running_mean.fill_(0.3)
    net.train()
    net[1].eval()  # a frozen norm layer stays frozen
    got = predict_probs([net], images)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(got, net(images).sigmoid())
    net.train()
    net[1].eval()
    predict_probs([net], images)
    assert net.training and net[0].training and not net[1].training


def test_inputs_follow_the_model_dtype_and_outputs_are_float32(images):
    net = random_net().double()
    got = predict_probs([net], images, ("identity", "transpose"))
    assert got.dtype == torch.float32
    expected = np.mean(
        [sigmoid(by_hand(random_net(), images, n)) for n in ("identity", "transpose")], 0
    )
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_bf16_autocast_on_cpu_is_close(images):
    net = random_net()
    full = predict_probs([net], images, ("identity", "hflip"))
    half = predict_probs([net], images, ("identity", "hflip"), amp="bf16")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=2e-2, rtol=0)
    assert not torch.equal(half, full)


def test_auto_chunk_is_a_fixed_rule(images):
    net = torch.nn.Conv2d(images.shape[1], 1, 3, padding=1)
    assert auto_chunk(net, images, 4) == 1  # CPU: one copy per pass
    assert auto_chunk(net, images.to("meta"), 4) == 4  # an accelerator: all copies at once
    assert auto_chunk(net, images.to("meta"), 1) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tta": ("hflp",)}, "unknown tta 'hflp' \\(did you mean hflip"),
        ({"tta": ()}, "at least one transform"),
        ({"merge": "median"}, "unknown tta_merge 'median'"),
        ({"chunk": -1}, "tta_chunk must be 0"),
        ({"amp": "fp8"}, "unknown amp 'fp8'"),
    ],
)
def test_bad_arguments_are_user_errors(images, kwargs, message):
    with pytest.raises(EkError, match=message):
        predict_probs([random_net()], images, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu(images):
    net = random_net()
    cpu = predict_probs([net], images, TTA_NAMES)
    gpu = predict_probs([net.cuda()], images.cuda(), TTA_NAMES, amp="auto")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-2, rtol=0)


# --- Kaggle hardware (issue 19): precision from the device, fp16 fallback, OOM halving -------


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((6, 0), torch.float16),  # P100: no bf16
        ((7, 5), torch.float16),  # T4: no bf16
        ((8, 0), torch.bfloat16),  # A100
        ((9, 0), torch.bfloat16),  # H100 / H200
        (None, None),  # CPU: fp32
    ],
)
def test_auto_precision_follows_the_device(capability, expected):
    from ensemble_kit.runtime import choose_precision

    assert choose_precision("auto", capability) == expected


def test_named_precisions_are_taken_as_asked_and_typos_refused():
    from ensemble_kit.runtime import choose_precision

    assert choose_precision("fp32", (9, 0)) is None
    assert choose_precision("fp16", None) == torch.float16
    assert choose_precision("bf16", (7, 5)) == torch.bfloat16
    with pytest.raises(EkError, match="precision 'fp61'.*did you mean fp16"):
        choose_precision("fp61", None)


def test_a_faked_t4_predicts_in_fp16(monkeypatch, images):
    """``auto`` on an sm75 device runs the model under fp16 autocast (faked on CPU)."""
    import ensemble_kit.runtime as runtime
    from ensemble_kit.inference.tta import predict_inputs

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(
                torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            )
            return x[:, :1]

    monkeypatch.setattr(runtime, "device_capability", lambda device: (7, 5))
    predict_inputs([Probe()], Config(name="t"), images)
    monkeypatch.setattr(runtime, "device_capability", lambda device: None)
    predict_inputs([Probe()], Config(name="t"), images)
    assert seen == [torch.float16, None]


class Overflows(nn.Module):
    """A net whose fp16 activations overflow (as bf16-trained weights can), fine in fp32."""

    def __init__(self):
        super().__init__()
        self.net = random_net()

    def forward(self, x):
        logits = self.net(x)
        return logits * 1e5 * 1e5 / 1e5 / 1e5  # inf in fp16 (max 65504), exact-ish in fp32


def test_fp16_inf_logits_are_redone_in_fp32_with_a_warning(images, caplog):
    from ensemble_kit.inference.tta import predict_inputs

    model = Overflows()
    expected = predict_inputs([model], Config(name="t"), images, precision="fp32")
    with caplog.at_level("WARNING"):
        got = predict_inputs([model], Config(name="t"), images, precision="fp16")
    assert "redone in fp32" in caplog.text
    np.testing.assert_array_equal(got, expected)
    assert np.isfinite(got).all()


def test_fp32_builds_no_float32_autocast(monkeypatch, images):
    """torch 2.0 raises "AutocastCPU only support Bfloat16" for
    ``torch.autocast("cpu", dtype=torch.float32, enabled=False)``; fp32 must not ask for it."""
    from ensemble_kit.inference.tta import predict_inputs

    real = torch.autocast

    def torch_2_0_autocast(device_type, dtype=None, enabled=True, **kwargs):
        if device_type == "cpu" and dtype not in (None, torch.bfloat16):
            raise RuntimeError("AutocastCPU only support Bfloat16")
        return real(device_type, dtype=dtype, enabled=enabled, **kwargs)

    monkeypatch.setattr(torch, "autocast", torch_2_0_autocast)
    assert predict_inputs([random_net()], Config(name="t"), images).shape == (3, 16, 16)


class OutOfMemoryAbove(nn.Module):
    """Raises CUDA's out-of-memory error for passes of more than ``limit`` images."""

    def __init__(self, net: nn.Module, limit: int):
        super().__init__()
        self.net, self.limit, self.sizes = net, limit, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return self.net(x)


def test_out_of_memory_halves_the_batch_and_keeps_the_codes(caplog):
    from ensemble_kit.inference.ensemble import Ensemble, MemoryPlan, predict_batch

    config = Config(name="t", tta=("identity", "hflip"))
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    plain = Ensemble({"t": config}, {"t": [random_net()]}, {"t": None})
    expected = predict_batch(plain, [x], "auto", MemoryPlan(8))["t"]
    guarded = OutOfMemoryAbove(random_net(), limit=3)
    tight = Ensemble({"t": config}, {"t": [guarded]}, {"t": None})
    plan = MemoryPlan(8)
    with caplog.at_level("WARNING"):
        got = predict_batch(tight, [x], "auto", plan)["t"]
    np.testing.assert_array_equal(got, expected)
    assert plan.batch == 2 and max(guarded.sizes[-4:]) == 2
    assert "out of memory at 8 records per pass: now 4" in caplog.text
    assert "out of memory at 4 records per pass: now 2" in caplog.text


def test_out_of_memory_at_one_record_and_one_copy_is_a_user_error():
    from ensemble_kit.inference.ensemble import MemoryPlan

    plan = MemoryPlan(1, 2)
    plan.halve(1)
    assert plan.chunk == 1
    with pytest.raises(EkError, match="out of memory with 1 record and 1 TTA copy"):
        plan.halve(1)


def test_shards_are_contiguous_whole_batches():
    from ensemble_kit.inference.ensemble import shard_records

    ids = [str(i) for i in range(10)]
    assert shard_records(ids, 2, 3) == [ids[:6], ids[6:]]
    assert shard_records(ids, 4, 5) == [ids[:5], ids[5:]]
    assert shard_records(ids[:2], 2, 16) == [ids[:2]]


def test_over_budget_drops_tta_copies_then_the_lowest_weighted_member(caplog):
    from ensemble_kit.inference.ensemble import Ensemble, Eta

    configs = {"a": Config(name="a", tta=("identity", "hflip")), "b": Config(name="b")}
    ensemble = Ensemble(configs, {"a": [], "b": []}, {"a": None, "b": None},
                        weights={"a": 3, "b": 1})  # fmt: skip
    eta = Eta(total=100, every=10, budget=1e-9)
    with caplog.at_level("WARNING"):
        eta.add(5, ensemble)
        assert ensemble.configs["a"].tta == ("identity",) and ensemble.dropped == []
        eta.add(10, ensemble)
    assert ensemble.dropped == ["b"]
    assert "a drops TTA ('hflip',)" in caplog.text and "member b dropped" in caplog.text
    eta.add(10, ensemble)
    assert ensemble.dropped == ["b"], "the last member is never dropped"


def test_eta_lines_give_rate_and_projection(caplog):
    from ensemble_kit.inference.ensemble import Ensemble, Eta, eta_line

    assert eta_line(40, 2000, 40.0) == (
        "predicted 40/2,000 records, 1.00 records/s, ~32.7 min to go (total ~33.3 min)"
    )
    eta = Eta(total=4, every=2)
    with caplog.at_level("INFO"):
        for _ in range(4):
            eta.add(1, Ensemble({}, {}, {}))
    assert [line.split(",")[0] for line in caplog.messages] == [
        "predicted 2/4 records",
        "predicted 4/4 records",
    ]


def test_cv_oof_prediction_takes_the_precision(monkeypatch):
    """``ek cv --precision`` reaches the OOF prediction (holdout and submit agree)."""
    from click.testing import CliRunner

    from ensemble_kit.cli import main
    from ensemble_kit.data.loader import ArraySet
    from ensemble_kit.training import cv

    seen = []

    def fake_predict(models, config, x, precision="auto"):
        seen.append(precision)
        return np.zeros((len(x), *x.shape[-2:]), np.float32)

    monkeypatch.setattr(cv, "predict_inputs", fake_predict)
    inputs = np.zeros((3, 3, 8, 8), np.uint8)
    arrays = ArraySet(
        ((inputs, np.zeros((3, 8, 8), np.uint8)),), np.c_[np.zeros(3, int), np.arange(3)]
    )
    parts = list(
        cv.predict_set([random_net()], Config(name="t"), arrays, torch.device("cpu"), 2, "fp16")
    )
    assert seen == ["fp16", "fp16"] and [p[0] for p in parts] == [slice(0, 2), slice(2, 3)]
    assert cv.FoldJob(Config(name="t"), None, None, 0, None).precision == "auto"
    result = CliRunner().invoke(main, ["cv", "--precision", "fp8", "x.yaml"])
    assert result.exit_code == 2 and "--precision" in result.output
