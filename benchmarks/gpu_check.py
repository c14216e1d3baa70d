"""The GPU check: every GPU number the README asks for, in one run, as a markdown table.

    python benchmarks/gpu_check.py               # on a CUDA machine (< 5 minutes)
    python benchmarks/gpu_check.py --smoke       # anywhere: tiny sizes, proves the script runs

Measures, on synthetic data only (no download: encoder_weights none):

1. training images/s of a resnet34 U-Net at 256 px, batch 16, 9 input channels, dice + BCE,
   Adam: ek's default CUDA path (bf16 autocast, channels_last; ``Trainer.train_step``) and a
   plain fp32 loop, each with and without ``train.compile``;
2. cache -> GPU input samples/s: uint8 cache rows through ``batches`` to the device, decoded
   and augmented (flips, rot90, cutout) as in training;
3. TTA: 4 flips batched into one forward pass vs one pass per flip (images/s);
4. ``ek submit`` records/s (2 folds of the resnet34 config, 4-flip TTA, ``--batch-size 16``);
5. Kaggle hardware (issue 19): 4-flip inference in fp32, fp16 and bf16 (images/s, largest
   probability difference from fp32); the records split across every device, one worker
   each (with one GPU: two workers on it), and the codes that differ from one worker; an
   injected out-of-memory error halving the batch, and the codes that differ; the batch and
   TTA chunk that free memory starts from.

Each rate is the best of ``--rounds`` timed runs after a warm-up (the machine may be shared).
A row that fails prints its error in the table and the run goes on; ``--out`` also writes
the table to a markdown file. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from submit import clone_test_records, run  # noqa: E402

from ensemble_kit.config import config_from_dict  # noqa: E402
from ensemble_kit.data.loader import ArraySet, batches  # noqa: E402
from ensemble_kit.data.synth import write_synthetic  # noqa: E402
from ensemble_kit.inference.ensemble import (  # noqa: E402
    Ensemble,
    MemoryPlan,
    PredictOptions,
    Timer,
    memory_plan,
    predict_batch,
    predict_codes_on,
)
from ensemble_kit.inference.tta import predict_inputs, predict_probs  # noqa: E402
from ensemble_kit.runtime import resolve_runtime  # noqa: E402
from ensemble_kit.training.trainer import Trainer  # noqa: E402

FLIPS = ("identity", "hflip", "vflip", "hvflip")


@dataclass(frozen=True)
class Sizes:
    encoder: str
    side: int
    batch: int
    steps: int
    warmup: int
    cache_rows: int
    submit_records: int
    synth_train: int


FULL = Sizes("resnet34", 256, 16, 30, 10, 256, 512, 20)
SMOKE = Sizes("tu-test_resnet", 64, 2, 2, 1, 8, 4, 8)


def config(sizes: Sizes, compile_model: bool = False):
    return config_from_dict(
        {
            "name": "gpu_check",
            "input": {"channels": "ash", "frames": [3, 4, 5]},
            "model": {"arch": "Unet", "encoder": sizes.encoder, "encoder_weights": None},
            "augment": {"hflip": 0.5, "vflip": 0.5, "rot90": 0.5, "cutout": 0.5},
            "train": {"batch_size": sizes.batch, "compile": compile_model},
            "tta": list(FLIPS),
        }
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rate(step, items: int, sizes: Sizes, device: torch.device, rounds: int) -> float:
    """Best items/s over ``rounds`` runs of ``sizes.steps`` calls, after a warm-up."""
    for _ in range(sizes.warmup):
        step()
    rates = []
    for _ in range(rounds):
        sync(device)
        started = time.perf_counter()
        for _ in range(sizes.steps):
            step()
        sync(device)
        rates.append(sizes.steps * items / (time.perf_counter() - started))
    return max(rates)


def fake_batch(sizes: Sizes, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    shape = (sizes.batch, 9, sizes.side, sizes.side)
    x = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    y = torch.rand(sizes.batch, sizes.side, sizes.side, generator=generator) > 0.99
    return x.to(device), y.to(torch.uint8).to(device)


def ek_train_step(sizes: Sizes, device: torch.device, compile_model: bool):
    cfg = config(sizes, compile_model)
    trainer = Trainer(cfg, resolve_runtime(cfg, device), total_steps=10**6)
    trainer.model.train()
    x_raw, y_raw = fake_batch(sizes, device)
    generator = torch.Generator().manual_seed(0)

    def step():
        x, y = trainer.prepare(x_raw, y_raw)
        trainer.train_step(x, y, 0, generator)

    return step


def plain_train_step(sizes: Sizes, device: torch.device, compile_model: bool):
    model = smp.Unet(sizes.encoder, encoder_weights=None, in_channels=9, classes=1).to(device)
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x_raw, y_raw = fake_batch(sizes, device)
    target = y_raw.float().unsqueeze(1)

    def step():
        logits = forward(x_raw.float() / 255.0)
        probs = torch.sigmoid(logits)
        dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
        loss = dice + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def input_rate(sizes: Sizes, device: torch.device, rounds: int) -> float:
    """Samples/s from a uint8 cache in memory to augmented float batches on the device."""
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (sizes.cache_rows, 9, sizes.side, sizes.side), dtype=np.uint8)
    labels = (rng.random((sizes.cache_rows, sizes.side, sizes.side)) > 0.99).astype(np.uint8)
    arrays = ArraySet(
        ((inputs, labels),), np.c_[np.zeros(len(inputs), int), np.arange(len(inputs))]
    )
    cfg = config(sizes)
    trainer = Trainer(cfg, resolve_runtime(cfg, device), total_steps=1)
    generator = torch.Generator().manual_seed(0)

    def epoch():
        pin = device.type == "cuda"
        loader = batches(arrays, sizes.batch, shuffle=True, drop_last=True, pin_memory=pin)
        for x_raw, y_raw in loader:
            x, y = trainer.prepare(x_raw, y_raw)
            trainer.augmenter(x, y, generator)

    n = (sizes.cache_rows // sizes.batch) * sizes.batch
    return best_rate(epoch, n, Sizes(**{**sizes.__dict__, "steps": 1, "warmup": 1}), device, rounds)


def tta_rates(sizes: Sizes, device: torch.device, rounds: int) -> dict[str, float]:
    model = smp.Unet(sizes.encoder, encoder_weights=None, in_channels=9, classes=1).to(device)
    x = torch.rand(sizes.batch, 9, sizes.side, sizes.side, device=device)
    rates = {}
    for label, chunk in (("batched", len(FLIPS)), ("per flip", 1)):
        step = lambda chunk=chunk: predict_probs([model], x, FLIPS, chunk=chunk, amp="auto")  # noqa: E731
        rates[label] = best_rate(step, sizes.batch, sizes, device, rounds)
    return rates


def submit_rate(sizes: Sizes, device: torch.device) -> float:
    """Records/s of ``ek submit`` (wall clock of the command, models loaded included)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        synth = ("--train", sizes.synth_train, "--validation", 2, "--test", 2, "--size", sizes.side)
        run("synth", "--out", data, *synth)
        clone_test_records(data, sizes.submit_records)
        path = root / "gpu_check.yaml"
        text = (
            f"name: gpu_check\ninput: {{channels: ash, frames: [3, 4, 5]}}\n"
            f"model: {{arch: Unet, encoder: {sizes.encoder}, encoder_weights: none}}\n"
            f"train: {{epochs: 1, batch_size: 4, max_steps_per_epoch: 1}}\n"
            f"tta: [{', '.join(FLIPS)}]\n"
        )
        path.write_text(text)
        workdir = root / "folds"
        common = ("--workdir", workdir, "--device", device.type)
        run("cv", "--data", data, "--folds", 2, *common, path)
        run("blend", "--oof", "--workdir", workdir, "--steps", 1)
        started = time.perf_counter()
        run("submit", "--data", data, "--out", root / "s.csv", "--batch-size", sizes.batch, *common)
        return sizes.submit_records / (time.perf_counter() - started)


def precision_rows(sizes: Sizes, device: torch.device, rounds: int) -> list[tuple]:
    """4-flip inference in fp32, fp16 and bf16: images/s and max |prob - fp32 prob|."""
    model = smp.Unet(sizes.encoder, encoder_weights=None, in_channels=9, classes=1).to(device)
    x = torch.rand(sizes.batch, 9, sizes.side, sizes.side, device=device)
    cfg, rows, reference = config(sizes), [], None
    for precision in ("fp32", "fp16", "bf16"):
        probs = predict_inputs([model], cfg, x, precision)
        reference = probs if reference is None else reference
        step = lambda p=precision: predict_inputs([model], cfg, x, p)  # noqa: E731
        rate = best_rate(step, sizes.batch, sizes, device, rounds)
        diff = float(np.abs(probs - reference).max())
        rows.append(
            (f"inference {precision}, 4 flips", rate, f"images/s; max abs prob diff {diff:.2e}")
        )
    return rows


def kaggle_ensemble(sizes: Sizes, device: torch.device, model=None) -> Ensemble:
    model = model or smp.Unet(sizes.encoder, encoder_weights=None, in_channels=9, classes=1)
    cfg = config(sizes)
    return Ensemble({"g": cfg}, {"g": [model.to(device).eval()]}, {"g": None})


def all_codes(batches) -> np.ndarray:
    return np.concatenate([codes["g"] for _, codes in batches])


def split_row(sizes: Sizes, device: torch.device, data: Path) -> tuple:
    """Records split across every device (with one, two workers on it) vs one worker."""
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    devices = devices if len(devices) > 1 else [device, device]
    torch.manual_seed(0)
    model = smp.Unet(sizes.encoder, encoder_weights=None, in_channels=9, classes=1)
    options = PredictOptions(batch_size=sizes.batch)
    one = [(kaggle_ensemble(sizes, device, model), device)]
    many = [(kaggle_ensemble(sizes, d, copy.deepcopy(model)), d) for d in devices]
    started = time.perf_counter()
    single = all_codes(predict_codes_on(one, data, "test", options, Timer()))
    middle = time.perf_counter()
    split = all_codes(predict_codes_on(many, data, "test", options, Timer()))
    rate = len(split) / (time.perf_counter() - middle)
    count = len({str(d) for d in devices})
    differ = int((single != split).sum())
    return (
        f"records split, {count} device{'s' if count > 1 else ''}, {len(devices)} workers",
        rate,
        f"records/s (1 worker {len(single) / (middle - started):.1f}); "
        f"{differ} of {single.size} codes differ from 1 worker",
    )


def oom_row(sizes: Sizes, device: torch.device) -> tuple:
    """An out-of-memory error injected above 2 records per pass: the batch is halved."""
    torch.manual_seed(0)
    inner = smp.Unet(sizes.encoder, encoder_weights=None, in_channels=9, classes=1)
    guarded = OutOfMemoryAbove(inner, len(FLIPS) * max(1, sizes.batch // 2))
    x = torch.rand(sizes.batch, 9, sizes.side, sizes.side, device=device)
    plain = predict_batch(
        kaggle_ensemble(sizes, device, inner), [x], "auto", MemoryPlan(sizes.batch, len(FLIPS))
    )
    plan = MemoryPlan(sizes.batch, len(FLIPS))
    started = time.perf_counter()
    halved = predict_batch(kaggle_ensemble(sizes, device, guarded), [x], "auto", plan)
    rate = sizes.batch / (time.perf_counter() - started)
    differ = int((plain["g"] != halved["g"]).sum())
    start = memory_plan(
        PredictOptions(sizes.batch, memory_safe=True), device, kaggle_ensemble(sizes, device)
    )
    return (
        f"OOM injected, batch {sizes.batch} halved to {plan.batch}",
        rate,
        f"images/s; {differ} of {plain['g'].size} codes differ; free memory starts at batch "
        f"{start.batch}, chunk {start.chunk}",
    )


class OutOfMemoryAbove(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, limit: int):
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("out of memory (injected by gpu_check)")
        return self.net(x)


def kaggle_rows(sizes: Sizes, device: torch.device, rounds: int) -> list[tuple]:
    rows = guarded("inference precision", lambda: precision_rows(sizes, device, rounds))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic(data, n_train=2, n_validation=2, n_test=4 * sizes.batch, size=sizes.side)
        rows += guarded("records split", lambda: [split_row(sizes, device, data)])
    rows += guarded("OOM halving", lambda: [oom_row(sizes, device)])
    return rows


def guarded(label: str, make) -> list[tuple]:
    """The rows ``make()`` returns, or one row with its error: one failure stops nothing."""
    try:
        return make()
    except Exception as err:  # noqa: BLE001 - reported in the table
        message = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        print(f"gpu_check: {label} failed: {message}", file=sys.stderr)
        return [(label, float("nan"), f"FAILED {message}")]


def measure(sizes: Sizes, device: torch.device, rounds: int) -> list[tuple[str, float, str]]:
    """Every row of the table; ``train.compile`` only on CUDA (inductor on CPU takes minutes)."""
    rows = []
    for compile_model in (False, True) if device.type == "cuda" else (False,):
        suffix = " + compile" if compile_model else ""
        for label, make in (("ek default", ek_train_step), ("plain fp32", plain_train_step)):
            name = f"train: {label}{suffix}"

            def train_rate(make=make, compile_model=compile_model, name=name):
                torch.manual_seed(0)
                step = make(sizes, device, compile_model)
                return [(name, best_rate(step, sizes.batch, sizes, device, rounds), "images/s")]

            rows += guarded(name, train_rate)
    rows += guarded(
        "cache -> GPU input + augmentation",
        lambda: [
            ("cache -> GPU input + augmentation", input_rate(sizes, device, rounds), "samples/s")
        ],  # fmt: skip
    )
    rows += guarded(
        "TTA 4 flips",
        lambda: [
            (f"TTA 4 flips, {k}", v, "images/s")
            for k, v in tta_rates(sizes, device, rounds).items()
        ],
    )
    rows += guarded(
        "ek submit (2 folds x 4 flips)",
        lambda: [("ek submit (2 folds x 4 flips)", submit_rate(sizes, device), "records/s")],
    )
    return rows + kaggle_rows(sizes, device, rounds)


def table(rows, sizes: Sizes, device: torch.device, seconds: float) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    lines = [
        f"{name}, torch {torch.__version__}: {sizes.encoder} U-Net, {sizes.side} px, "
        f"batch {sizes.batch}; {seconds:.0f} s in all",
        "",
        "| measurement | rate | unit |",
        "|---|---:|---|",
    ]
    lines += [f"| {label} | {rate_text(rate)} | {unit} |" for label, rate, unit in rows]
    if device.type == "cuda":
        lines += ["", f"{torch.cuda.device_count()} CUDA device(s) visible"]
    return "\n".join(lines)


def rate_text(rate: float) -> str:
    """One decimal, or three significant digits below 1 (a loaded CPU's smoke run)."""
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU too")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: no CUDA device here; run it on a GPU machine, or pass --smoke for a "
            "tiny run that only proves the script works"
        )
    device = torch.device(args.device if torch.cuda.is_available() else "cpu")
    sizes = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    rows = measure(sizes, device, 1 if args.smoke else args.rounds)
    text = table(rows, sizes, device, time.perf_counter() - started)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
