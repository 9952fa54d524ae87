"""The one place where a `RunConfig` becomes objects, in the order data flows:

data and processor (`data.py`) -> loss terms (`loss.py`) -> student and its transforms
(`student.py`) -> what the student learns from (`workbench/targets/`) -> taps and terms
attached to both models (`taps.py`).

Everything that can be wrong with a config or its files (unknown names, missing paths,
corrupt checkpoints, teacher/student vocabulary mismatches) fails here, before a run
directory is created. Nothing here runs a model over the data set: a target that needs to
(a teacher cache) does it in `Target.prepare`, which the run calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from losses.combine import WeightedLoss
from workbench.build.data import Data, build_data, make_collator
from workbench.build.loss import build_loss
from workbench.build.student import build_student, student_processor
from workbench.build.taps import attach_terms
from workbench.build.teacher import check_vocabularies
from workbench.config import RunConfig
from workbench.data.label_split import LabelSplit, split_for
from workbench.errors import WorkbenchError
from workbench.targets import Target, TargetContext, choose_target

__all__ = ["Built", "build"]


@dataclass(frozen=True)
class Built:
    """Everything a run needs, built and cross-checked."""

    data: Data
    processor: Any  # what the student reads (None for image classification)
    collator: Any  # held-out batches; training batches go through `target.train_collator`
    student: nn.Module
    loss: WeightedLoss
    target: Target
    split: LabelSplit | None  # which VLM training records keep their answers
    notes: dict[str, Any] = field(default_factory=dict)  # extra summary.json entries

    @property
    def classification(self) -> bool:
        return self.data.classification

    @property
    def splits(self):
        return self.data.splits

    @property
    def teacher(self) -> nn.Module | None:
        return self.target.teacher


def build(cfg: RunConfig) -> Built:
    """Config -> data, loss, student, target; raises `WorkbenchError` on any bad input."""
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    # a teacher signal comes from a configured teacher, or from a target named explicitly
    loss = build_loss(cfg, cfg.teacher is not None or cfg.target not in ("auto", "none"))
    ctx = TargetContext(cfg, None, None, loss, data.splits.train, None, None, data.num_classes)
    student, notes = build_student(cfg, data, lambda: ctx.teacher)
    loss.student_reads = list(getattr(student, "teacher_reads", {}).values())  # a draft head's target features
    processor = None if data.classification else student_processor(student, data.processor)
    if processor is not None:
        check_vocabularies(student, processor)
    collator = make_collator(cfg, data, processor)
    split = None if data.classification else split_for(cfg, data.splits.train)
    if split is not None and cfg.data.labeled_fraction < 1:
        notes["data"] = split.notes()
    ctx.student, ctx.processor, ctx.split, ctx.collator = student, processor, split, collator
    target = choose_target(ctx)
    if loss.student_reads and target.teacher is None:
        raise WorkbenchError(f"student.type {cfg.student.type} reads the teacher's features as its input, but "
                             f"target '{target.name}' runs no teacher; use target: auto or online_teacher")
    sample = collator([data.splits.train[0]]) if loss.tapped_terms() else None
    taps = attach_terms(loss, student, target.teacher, sample)
    if taps:
        notes["taps"] = taps
    n_train = target.train_size(data.splits.train, split)  # after the label split: what the student trains on
    if n_train < cfg.data.batch_size:
        raise WorkbenchError(f"data.batch_size={cfg.data.batch_size} is larger than the training set ({n_train} samples)")
    return Built(data, processor, collator, student, loss, target, split, {**data.notes, **notes})
