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

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
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
        return cls(teacher)

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
            logits = self.teacher(**model_inputs(batch), **({} if keep is None else {"logits_to_keep": keep})).logits
        if keep is not None and logits.shape[0] != int(keep.sum()):
            raise RuntimeError(f"the teacher returned logits of shape {tuple(logits.shape)} for {int(keep.sum())} "
                               "kept positions: its forward ignores `logits_to_keep`; set trainer.fused_logits=false")
        inputs.teacher_logits, inputs.teacher_keep = logits, keep
        inputs.teacher_features = {str(p): v for p, v in found.items()}
