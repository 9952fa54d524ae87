"""The interface of what the student learns from besides its labels: a `Target`.

A target is chosen at build time (`target: auto` picks by the rules in
`workbench/targets/__init__.py`; a registered name forces one) and then asked, at each step,
to fill the teacher side of the loss inputs. It owns everything teacher-shaped: the teacher
module (if one runs beside the student), the batches' extra keys, the training set when the
teacher rewrites it (pseudo-labels), and the per-epoch pool. Adding a new kind of teacher
signal is one new file with a `Target` subclass and one registration line.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from torch import nn
from torch.utils.data import Dataset

from losses.combine import WeightedLoss
from losses.inputs import LossInputs
from workbench.data.label_split import LabelSplit, labeled_subset


@dataclass
class TargetContext:
    """What a target may read when it is chosen and built: the config and the built parts.

    `teacher` builds the configured teacher once, on first use (a build may need it twice:
    `init_from: teacher` of an image student, then the target)."""

    cfg: Any
    student: nn.Module
    processor: Any
    loss: WeightedLoss
    train: Dataset
    split: LabelSplit | None  # VLM records only
    collator: Any
    num_classes: int | None  # image classification; None for a VLM

    @property
    def classification(self) -> bool:
        return self.num_classes is not None

    @cached_property
    def teacher(self) -> nn.Module | None:
        from workbench.build.teacher import build_teacher

        return build_teacher(self.cfg)


class Target:
    """Base: no teacher signal. Subclasses override what they provide.

    Class attributes:
        name: the registry key (`target:` in a config).
        priority: with `target: auto`, the applicable target of highest priority is chosen.
        scores_validation: whether held-out batches carry the signal, so validation can
            compute the loss (a training-set cache has no rows for them).
    """

    name: ClassVar[str] = "none"
    priority: ClassVar[int] = 0
    scores_validation: ClassVar[bool] = True
    teacher: nn.Module | None = None  # a model run beside the student (never a submodule)

    @classmethod
    def applies(cls, ctx: TargetContext) -> bool:
        """Whether `target: auto` may choose this target for the config."""
        return True

    @classmethod
    def create(cls, ctx: TargetContext) -> Target:
        return cls()

    @property
    def answering_teacher(self) -> nn.Module | None:
        """A teacher that answers the held-out questions itself (scored as `teacher` in the summary)."""
        return None

    def prepare(self) -> dict[str, Any]:
        """Work over the data set before training (a teacher cache); returns summary notes.
        Runs after the run directory exists, on every rank."""
        return {}

    def train_set(self, train: Dataset, split: LabelSplit | None) -> Dataset:
        """The records the student trains on (default: the labelled ones)."""
        return train if split is None else labeled_subset(train, split)

    def train_size(self, train: Dataset, split: LabelSplit | None) -> int:
        """How many records `train_set` will hold (known at build time)."""
        return len(self.train_set(train, split))

    def train_collator(self, collator: Any) -> Any:
        return collator

    def eval_collator(self, collator: Any) -> Any:
        return collator

    def pool_fn(self, student: nn.Module, train: Dataset, collator: Any) -> Any:
        """A per-epoch training pool (`StepBatchSampler`), or None for all records."""
        return None

    def callbacks(self) -> list[Any]:
        return []

    def to(self, device: Any) -> None:
        if self.teacher is not None:
            self.teacher.to(device)

    def fill(self, batch: dict[str, Any], inputs: LossInputs, loss: WeightedLoss, fused: bool) -> None:
        """Put this target's signal for `batch` into `inputs` (the student pass is done)."""
