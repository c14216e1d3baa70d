"""Optimisers, learning-rate schedules and the weight EMA, each registered by name."""

from __future__ import annotations

import copy
import math

import torch

from ..config import OptimSpec, ScheduleSpec
from ..registry import OPTIMIZERS, SCHEDULES

OPTIMIZERS.register("adam")(
    lambda spec, params: torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
)
OPTIMIZERS.register("adamw")(
    lambda spec, params: torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
)
OPTIMIZERS.register("sgd")(
    lambda spec, params: torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
)


def make_optimizer(spec: OptimSpec, params) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(spec.name)(spec, params)


def lr_factor(spec: ScheduleSpec, step: int, total: int, base_lr: float) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (linear warm-up, then the schedule)."""
    if spec.warmup_iters and step < spec.warmup_iters:
        return (step + 1) / spec.warmup_iters
    if spec.name == "none":
        return 1.0
    span = max(1, total - spec.warmup_iters)
    progress = min(1.0, (step - spec.warmup_iters) / span)
    floor = spec.min_lr / base_lr if base_lr else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _onecycle(spec: ScheduleSpec, optimizer: torch.optim.Optimizer, total_steps: int):
    base_lr = optimizer.param_groups[0]["lr"]
    pct = spec.warmup_iters / total_steps if spec.warmup_iters else 0.3
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=base_lr,
        total_steps=max(total_steps, 2),
        pct_start=min(max(pct, 0.01), 0.99),
    )


def _warmup_then_cosine(spec: ScheduleSpec, optimizer: torch.optim.Optimizer, total_steps: int):
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(spec, step, total_steps, base_lr)
    )


SCHEDULES.register("onecycle")(_onecycle)
SCHEDULES.register("cosine")(_warmup_then_cosine)
SCHEDULES.register("none")(_warmup_then_cosine)  # lr_factor: warm-up, then constant


def make_scheduler(spec: ScheduleSpec, optimizer: torch.optim.Optimizer, total_steps: int):
    return SCHEDULES.get(spec.name)(spec, optimizer, total_steps)


class Ema:
    """Exponential moving average of a model's weights (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
