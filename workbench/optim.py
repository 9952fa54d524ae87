"""AdamW parameter groups and per-step learning-rate schedules (cosine, WSD, constant)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms, 1-d)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(
    schedule: str, total_steps: int, warmup_steps: int, decay_fraction: float = 0.2, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """step -> LR multiplier in [min_ratio, 1], linear warmup first.

    cosine: half-cosine from 1 to `min_ratio` over the steps after warmup.
    wsd: MiniCPM's warmup-stable-decay: constant 1 until the last `decay_fraction` of the
        steps, then linear decay to `min_ratio` (a run can be branched off before decay).
    constant: 1 after warmup.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if schedule == "wsd":
            decay_start = total_steps - int(decay_fraction * total_steps)
            if step < decay_start:
                return 1.0
            t = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
            return 1.0 - (1 - min_ratio) * t
        raise ValueError(f"unknown schedule {schedule!r}")

    return f


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, schedule: str, total_steps: int,
                   warmup_steps: int, decay_fraction: float, min_ratio: float):
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(schedule, total_steps, warmup_steps, decay_fraction, min_ratio)
    )
    return optimizer, scheduler
