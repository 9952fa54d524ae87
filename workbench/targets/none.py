"""No teacher: the student learns from its labels only."""

from __future__ import annotations

from workbench.targets.base import Target, TargetContext


class NoTeacher(Target):
    """Supervised training: loss terms read labels (and the student itself) only."""

    name = "none"
    priority = 0

    @classmethod
    def applies(cls, ctx: TargetContext) -> bool:
        return ctx.cfg.teacher is None
