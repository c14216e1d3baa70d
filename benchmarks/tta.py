"""Throughput of ``predict_probs`` with 4 flips against one forward pass per flip (ttach's way).

    HF_HUB_OFFLINE=1 python benchmarks/tta.py [--repeats 3] [--batch 4] [--size 256]

For a tiny U-Net (``tu-test_resnet``) and a resnet18 U-Net on a batch of 9-channel
inputs, on CPU and, when present, CUDA: images per second of

- ``auto``: ``predict_probs(chunk=0)``, the chunk auto_chunk picks by its fixed rule;
- ``all``: ``predict_probs(chunk=4)``, all four copies in one batch (for reference);
- ``per-flip``: one forward pass per flip, merged the same way (the baseline).

Each is timed ``--repeats`` times, interleaved, and the best run counts (the machine may be
shared); outputs are checked equal to 1e-5 before timing.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ensemble_kit.config import Config, InputSpec, ModelSpec  # noqa: E402
from ensemble_kit.inference.tta import auto_chunk, predict_probs, tta_inverse, tta_transform  # noqa: E402
from ensemble_kit.models import build_model, count_parameters  # noqa: E402

FLIPS = ("identity", "hflip", "vflip", "hvflip")
ENCODERS = ("tu-test_resnet", "resnet18")


def per_flip(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The baseline: one forward pass per flip, mean of the de-flipped probabilities."""
    with torch.inference_mode():
        total = sum(tta_inverse(model(tta_transform(x, n)), n).float().sigmoid() for n in FLIPS)
    return total / len(FLIPS)


def best_seconds(fn, x: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def bench(encoder: str, device: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    config = Config(
        input=InputSpec(channels="bands"), model=ModelSpec(arch="Unet", encoder=encoder)
    )
    model = build_model(config).to(device).eval()
    x = torch.randn(args.batch, config.input.in_channels, args.size, args.size, device=device)
    methods = {
        "auto": lambda t: predict_probs([model], t, FLIPS, chunk=0),
        "all": lambda t: predict_probs([model], t, FLIPS, chunk=len(FLIPS)),
        "per-flip": lambda t: per_flip(model, t),
    }
    reference = methods["per-flip"](x)
    for name, fn in methods.items():  # warm-up, equal outputs
        torch.testing.assert_close(fn(x), reference, atol=1e-5, rtol=0, msg=f"{name} differs")
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            times[name] += best_seconds(fn, x, 1)
    with torch.inference_mode():
        chunk = auto_chunk(model, x, len(FLIPS))
    base = min(times["per-flip"])
    print(
        f"{device:4} {encoder:15} {count_parameters(model) / 1e6:5.1f}M params  auto chunk={chunk}"
    )
    for name, runs in times.items():
        best = min(runs)
        print(
            f"    {name:9} {args.batch / best:7.2f} img/s  best {best:.3f} s  "
            f"median {sorted(runs)[len(runs) // 2]:.3f} s  x{base / best:.2f} vs per-flip"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch "
        f"{args.batch} x 9 x {args.size}^2, TTA {'+'.join(FLIPS)}"
    )
    for device in devices:
        for encoder in ENCODERS:
            bench(encoder, device, args)


if __name__ == "__main__":
    main()
