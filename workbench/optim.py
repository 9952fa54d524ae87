"""AdamW parameter groups and per-step learning-rate schedules (cosine, WSD, constant, and
BitNet b1.58's two-stage LR and weight-decay schedule)."""

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


TWO_STAGE = (0.5, 0.533, 0.333)  # BitNet b1.58 2B4T: 1.5e-3 -> 8e-4 over the first half, then 5e-4 -> 0


def lr_multiplier(
    schedule: str, total_steps: int, warmup_steps: int, decay_fraction: float = 0.2, min_ratio: float = 0.0,
    two_stage: tuple[float, float, float] = TWO_STAGE,
) -> Callable[[int], float]:
    """step -> LR multiplier in [min_ratio, 1], linear warmup first.

    cosine: half-cosine from 1 to `min_ratio` over the steps after warmup.
    wsd: MiniCPM's warmup-stable-decay: constant 1 until the last `decay_fraction` of the
        steps, then linear decay to `min_ratio` (a run can be branched off before decay).
    constant: 1 after warmup.
    two_stage: the BitNet b1.58 training recipe; `two_stage` = (switch fraction, end of stage 1,
        peak of stage 2): linear decay from 1 to the stage-1 end until the switch step
        (`int(switch * total_steps)`), then a drop to the stage-2 peak and linear decay to
        `min_ratio` (the weight decay goes to 0 at the switch: `TwoStageLR`).
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
        if schedule == "two_stage":
            switch = max(int(two_stage[0] * total_steps), warmup_steps)
            if step < switch:
                t = (step - warmup_steps) / max(1, switch - warmup_steps)
                return 1.0 - (1 - two_stage[1]) * t
            t = min(1.0, (step - switch) / max(1, total_steps - switch))
            return two_stage[2] - (two_stage[2] - min_ratio) * t
        raise ValueError(f"unknown schedule {schedule!r}")

    return f


class TwoStageLR(torch.optim.lr_scheduler.LambdaLR):
    """The LR multiplier of `lr_multiplier`, plus the two-stage weight decay: every group's
    decay is kept until step `switch` and is 0 from then on (the BitNet recipe: 0.1, then 0).
    The decay values live in the optimizer's state, so a resumed run continues where it was."""

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float], switch: int):
        self.switch = switch
        self.stage1_decay = [g["weight_decay"] for g in optimizer.param_groups]
        super().__init__(optimizer, multiplier)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        for group, decay in zip(self.optimizer.param_groups, self.stage1_decay):
            group["weight_decay"] = decay if self.last_epoch < self.switch else 0.0


def make_optimizer(model: nn.Module, optim, total_steps: int):
    """AdamW over `param_groups` and the per-step scheduler `optim` (an `OptimConfig`) asks for."""
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas))
    two_stage = tuple(optim.two_stage)
    multiplier = lr_multiplier(optim.schedule, total_steps, optim.warmup_steps, optim.decay_fraction,
                               optim.min_lr_ratio, two_stage)
    if optim.schedule == "two_stage":
        switch = max(int(two_stage[0] * total_steps), min(optim.warmup_steps, max(total_steps - 1, 0)))
        return optimizer, TwoStageLR(optimizer, multiplier, switch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
