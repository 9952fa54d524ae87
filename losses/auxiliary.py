"""Auxiliary losses a student computes in its own forward: the `mod_router` term is gamma-MoD's
router loss (students/mod.py, `router: gamma`), the cross-entropy between each MoD layer's
2-way router and the selection it made, summed over the layers (weight 0.01 in gamma-MoD)."""

from __future__ import annotations

from torch import Tensor, nn

from losses.inputs import LossInputs
from losses.term import LossTerm


class RouterAuxTerm(LossTerm):
    """The student's own `mod_router` loss of this step's forward (`students.mod.aux_losses`)."""

    def __init__(self) -> None:
        super().__init__()
        self._student: list[nn.Module] = []  # a reference, not a submodule of the loss

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        from students.mod import mod_state

        state = mod_state(student)
        if state is None or not any(getattr(m, "mod_kind", None) == "gamma" for m in student.modules()):
            raise ValueError("the mod_router term needs a gamma-MoD student (transforms.mod.router: gamma)")
        self._student = [student]

    def forward(self, inputs: LossInputs) -> Tensor:
        from students.mod import aux_losses

        losses = aux_losses(self._student[0]) if self._student else {}
        if "mod_router" not in losses:
            raise ValueError("the student computed no router loss in this forward (no MoD layer ran)")
        return losses["mod_router"]
