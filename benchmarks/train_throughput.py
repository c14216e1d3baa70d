"""Images/s of ek's training step vs a plain hand-written fp32 PyTorch loop, same model and batch.

ek runs with its defaults (the cached uint8 inputs decoded on the device); on CUDA also
bf16 autocast, channels_last and torch.compile(mode="reduce-overhead"). On CPU ek must not be
slower (>= 1.0x). On CUDA the fast path is measured against the plain fp32 loop (target >= 2.5x at batch 16, 256 px, resnet34 U-Net, 9 channels, Adam, dice+BCE).

    .venv/bin/python benchmarks/train_throughput.py                # CPU defaults (small)
    python benchmarks/train_throughput.py --device cuda --size 256 --batch 16 --encoder resnet34
"""

from __future__ import annotations

import argparse
import time

import segmentation_models_pytorch as smp
import torch

from ensemble_kit.config import config_from_dict
from ensemble_kit.runtime import resolve_runtime
from ensemble_kit.training.trainer import Trainer


def plain_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probs = torch.sigmoid(logits)
    dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
    return dice + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, steps: int, warmup: int, device: torch.device, batch: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - started)


def plain_step(args, device, x_uint8, y):
    model = smp.Unet(args.encoder, encoder_weights=None, in_channels=9, classes=1).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        x = x_uint8.float() / 255.0
        loss = plain_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def ek_step(args, device, x_uint8, y):
    fast = device.type == "cuda"
    config = config_from_dict(
        {
            "input": {"channels": "ash", "frames": [3, 4, 5]},
            "model": {"arch": "Unet", "encoder": args.encoder},
            "optim": {"name": "adam", "lr": 1e-4},
            "train": {
                "amp": "bf16" if fast else "none",
                "channels_last": fast or args.channels_last,
                "compile": fast and not args.no_compile,
            },
        }
    )
    trainer = Trainer(config, resolve_runtime(config, device), total_steps=10**6)
    trainer.model.train()
    generator = torch.Generator().manual_seed(0)

    def step():
        x, target = trainer.prepare(x_uint8, y.squeeze(1).to(torch.uint8))
        trainer.train_step(x, target, 0, generator)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--channels-last", action="store_true", help="also on CPU (not ek's CPU default)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.encoder = args.encoder or ("resnet34" if cuda else "resnet18")
    args.size = args.size or (256 if cuda else 128)
    args.batch = args.batch or (16 if cuda else 8)
    args.steps = args.steps or (50 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (15 if cuda else 1)
    generator = torch.Generator().manual_seed(0)
    x_uint8 = torch.randint(
        0, 256, (args.batch, 9, args.size, args.size), generator=generator, dtype=torch.uint8
    ).to(device)
    y = (
        (torch.rand(args.batch, 1, args.size, args.size, generator=generator) > 0.99)
        .float()
        .to(device)
    )
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    torch.manual_seed(0)
    steps = {
        "plain fp32": plain_step(args, device, x_uint8, y),
        "ek": ek_step(args, device, x_uint8, y),
    }
    rates = {label: [] for label in steps}
    for _ in range(args.rounds):  # alternate, so load changes hit both alike; keep the best round
        for label, step in steps.items():
            rates[label].append(timed(step, args.steps, args.warmup, device, args.batch))
    for label, values in rates.items():
        print(
            f"{label:12s} best {max(values):8.1f} img/s  (rounds: {', '.join(f'{v:.1f}' for v in values)})"
        )
    target = 2.5 if cuda else 1.0
    print(
        f"{name}: {args.encoder} U-Net, {args.size} px, batch {args.batch}, {args.steps} steps x {args.rounds} rounds"
    )
    print(
        f"ratio ek / plain: {max(rates['ek']) / max(rates['plain fp32']):.2f}x (target >= {target}x)"
    )


if __name__ == "__main__":
    main()
