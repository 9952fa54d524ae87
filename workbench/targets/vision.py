"""A vision encoder's patch features on the batch's images (EVE / BREEN supervision).

The encoder reads the images with its own preprocessing (`teacher_pixel_values`, added by
the collator); the vision-feature loss terms compare the student's hidden states with them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from losses.combine import WeightedLoss
from losses.inputs import LossInputs
from workbench.build.teacher import is_feature_teacher
from workbench.errors import WorkbenchError
from workbench.targets.base import Target, TargetContext


class VisionFeatures(Target):
    """A frozen vision encoder run on each batch's images."""

    name = "vision_features"
    priority = 30

    def __init__(self, teacher: nn.Module, needed: bool):
        self.teacher = teacher
        self.needed = needed  # some active term reads the features

    @classmethod
    def applies(cls, ctx: TargetContext) -> bool:
        return ctx.cfg.teacher is not None and is_feature_teacher(ctx.cfg.teacher)

    @classmethod
    def create(cls, ctx: TargetContext) -> VisionFeatures:
        if ctx.cfg.teacher.cache is not None:
            raise WorkbenchError(f"config key 'teacher.cache': teacher.type {ctx.cfg.teacher.type!r} gives image "
                                 "features, not answer logits, so there is nothing to cache; unset it")
        loss = ctx.loss
        vision_terms = set(loss.vision_feature_terms())
        logit_terms = [n for n, t in loss.terms.items() if t.needs_teacher and n not in vision_terms]
        if logit_terms:
            raise WorkbenchError(f"loss terms {', '.join(logit_terms)} read teacher logits, but teacher.type "
                                 f"{ctx.cfg.teacher.type!r} gives image features only")
        return cls(ctx.teacher, loss.needs_teacher)

    def _with_images(self, collator: Any) -> Any:
        if not self.needed:
            return collator
        return dataclasses.replace(collator, teacher_images=self.teacher.preprocess)

    def train_collator(self, collator: Any) -> Any:
        return self._with_images(collator)

    def eval_collator(self, collator: Any) -> Any:
        return self._with_images(collator)

    def fill(self, batch: dict[str, Any], inputs: LossInputs, loss: WeightedLoss, fused: bool) -> None:
        if self.needed:
            inputs.vision_features = self.teacher(batch["teacher_pixel_values"])
            inputs.vision_grid = self.teacher.grid
