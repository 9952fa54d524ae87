"""An online teacher: loaded beside the student and run on every batch (no gradients).

It gives the loss terms dense logits (in fused mode only at the positions the terms read,
`WeightedLoss.teacher_logit_positions`) and what the terms' taps capture inside it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from losses.combine import WeightedLoss
from losses.inputs import LossInputs
from workbench.batch import model_inputs
from workbench.build.teacher import check_vocabularies, is_feature_teacher
from workbench.errors import WorkbenchError
from workbench.targets.base import Target, TargetContext
from workbench.taps import FeatureTaps, TapPoint


class OnlineTeacher(Target):
    """A frozen VLM or image classifier run on each batch."""

    name = "online_teacher"
    priority = 10

    def __init__(self, teacher: nn.Module, device: str = "auto"):
        self.teacher = teacher
        self.device = device  # "cpu": the teacher stays there, whatever the student's device
        self._taps: FeatureTaps | None = None
        self._tap_points: tuple[str, ...] = ()

    @classmethod
    def applies(cls, ctx: TargetContext) -> bool:
        return ctx.cfg.teacher is not None and not is_feature_teacher(ctx.cfg.teacher)

    @classmethod
    def create(cls, ctx: TargetContext) -> OnlineTeacher:
        if ctx.cfg.teacher.cache is not None:  # auto chose this target: the cache cannot serve the run
            raise WorkbenchError("config key 'teacher.cache': teacher caches hold VLM answer tokens; unset it for "
                                 "image classification")
        teacher = ctx.teacher
        if ctx.classification:
            if teacher.num_classes != ctx.num_classes:
                raise WorkbenchError(f"the teacher has {teacher.num_classes} classes but the data has {ctx.num_classes}")
        else:
            check_vocabularies(ctx.student, ctx.processor, teacher)
        return cls(teacher, ctx.cfg.teacher.device)

    def to(self, device: Any) -> None:
        self.teacher.to("cpu" if self.device == "cpu" else device)

    @property
    def answering_teacher(self) -> nn.Module | None:
        return self.teacher

    def _teacher_taps(self, points: list[str]) -> FeatureTaps | None:
        if tuple(points) != self._tap_points:
            self._tap_points = tuple(points)
            self._taps = FeatureTaps(getattr(self.teacher, "model", self.teacher),
                                     [TapPoint.parse(p) for p in points], "teacher") if points else None
        return self._taps

    def fill(self, batch: dict[str, Any], inputs: LossInputs, loss: WeightedLoss, fused: bool) -> None:
        if not loss.needs_teacher:
            return
        keep = loss.teacher_logit_positions(inputs) if fused else None  # fused: only the rows terms read
        taps = self._teacher_taps(loss.tap_points()[1])
        with torch.no_grad(), contextlib.ExitStack() as stack:
            found = stack.enter_context(taps.capture()) if taps is not None else {}
            where = next(self.teacher.parameters()).device
            given = {k: v.to(where) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
            extra = {} if keep is None else {"logits_to_keep": keep.to(where)}
            logits = self.teacher(**given, **extra).logits.to(inputs.labels.device)
        if keep is not None and logits.shape[0] != int(keep.sum()):
            raise RuntimeError(f"the teacher returned logits of shape {tuple(logits.shape)} for {int(keep.sum())} "
                               "kept positions: its forward ignores `logits_to_keep`; set trainer.fused_logits=false")
        inputs.teacher_logits, inputs.teacher_keep = logits, keep
        inputs.teacher_features = {str(p): _to(v, inputs.labels.device) for p, v in found.items()}


def _to(value: Any, device: torch.device) -> Any:
    """A captured tap (a tensor, or a tuple of them) on the student's device."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    return value
