"""The objective: each `loss.<name>` block is `{type, weight, ...}`, the rest checked against
the term's constructor (like `student.kwargs` against a student builder)."""

from __future__ import annotations

from typing import Any

from losses.combine import WeightedLoss
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.registry import LOSSES


def build_term(name: str, spec: dict[str, Any]):
    """The term one `loss.<name>` block describes (its weight is the caller's)."""
    options = {k: v for k, v in spec.items() if k not in ("type", "weight")}
    try:
        return LOSSES.build(spec["type"], f"loss.{name}", **options)
    except ValueError as e:
        raise WorkbenchError(f"loss.{name} ({spec['type']}): {e}") from None


def build_loss(cfg: RunConfig, has_teacher: bool) -> WeightedLoss:
    terms = {}
    for name, spec in cfg.loss.items():
        LOSSES.get(spec["type"], f"loss.{name}.type")
        term = build_term(name, spec)
        weight = spec.get("weight", 1.0)
        if term.needs_teacher and weight and not has_teacher:
            raise WorkbenchError(
                f"loss term '{name}' ({spec['type']}) needs a teacher but 'teacher' is null; "
                "set teacher.path or give the term weight 0"
            )
        terms[name] = (weight, term)
    try:
        return WeightedLoss(terms)
    except ValueError as e:
        raise WorkbenchError(f"config key 'loss': {e}") from None
