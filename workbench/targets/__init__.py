"""What the student learns from besides its labels: `Target`s, chosen by `target:`.

- `none` (`none.py`): no teacher.
- `online_teacher` (`online.py`): a frozen VLM or classifier run on every batch (logits, taps).
- `cached_teacher` (`cached.py`): top-k teacher logits from a cache, plus pseudo-labels.
- `vision_features` (`vision.py`): a vision encoder's patch features on the images.

With `target: auto` (the default) the applicable target of highest priority is chosen;
a registered name (`workbench.registry.TARGETS`) forces one.
"""

from __future__ import annotations

from workbench.errors import WorkbenchError
from workbench.registry import TARGETS
from workbench.targets.base import Target, TargetContext

__all__ = ["Target", "TargetContext", "choose_target"]


def choose_target(ctx: TargetContext) -> Target:
    """The target `ctx.cfg.target` names, or for `auto` the applicable one of highest priority."""
    name = ctx.cfg.target
    if name == "auto":
        ranked = sorted((TARGETS.get(n) for n in TARGETS.names()), key=lambda c: -c.priority)
        cls = next((c for c in ranked if c.applies(ctx)), None)
        if cls is None:
            raise WorkbenchError("no registered target applies to this config; set `target:` to one of "
                                 + ", ".join(TARGETS.names()))
    else:
        cls = TARGETS.get(name, "target")
    return cls.create(ctx)
