"""The loss-term contract: what a term needs, declared on its class, and one `attach`.

A term is an `nn.Module` that maps `LossInputs` to a scalar. Its class says what the trainer
must give it, so the workbench never guesses:

- `needs_teacher`: teacher outputs (logits, taps or features) must be there;
- `needs_dense_teacher`: the teacher itself, not a cached top-k of its answer logits;
- `needs_hidden_states`: every hidden state of the student's decoder;
- `needs_vision_features`: a vision encoder's patch features on the batch's images;
- `carries_state`: trained parameters of its own that a recipe's next stage continues from.

`attach(student, teacher)` is called once, after both models are built and the term's taps
are bound; terms that hold parts of the models (or size layers from them) do it there.
`teacher_positions` says where a term reads teacher logits (fused mode asks the teacher for
those rows only). Options are checked in the constructor and nowhere else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from losses.inputs import LossInputs

STUDENT_TARGET = "student:"  # a tapped term's target read inside the student itself


class LossTerm(nn.Module):
    """Base of every loss term: class-level capabilities, `attach`, `teacher_positions`."""

    needs_teacher = False
    needs_dense_teacher = False
    needs_hidden_states = False
    needs_vision_features = False
    carries_state = False

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once with the built models (teacher: the module the teacher signal comes from)."""

    def teacher_positions(self, inputs: LossInputs) -> Tensor | None:
        """(B, L) bool: where this term reads teacher logits; None when it reads none."""
        return None

    def cache_temperature(self) -> float | None:
        """The temperature of the teacher distribution this term reads from a top-k cache, or
        None when it reads none (a cache stores one temperature)."""
        return None


def align_tokens(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N, ...) taps of different token counts -> the shorter count, dropping the longer's
    leading tokens: the class / register tokens timm ViTs put before the patches (a DeiT
    teacher has 1 + N tokens, a Mini-DeiT student N)."""
    n_s, n_t = student.shape[1], teacher.shape[1]
    if n_s == n_t or student.dim() < 3:
        return student, teacher
    n = min(n_s, n_t)
    return student[:, n_s - n:], teacher[:, n_t - n:]


class TappedTerm(LossTerm):
    """Base of the terms that compare tensors tapped inside the student and the teacher.

    Config gives tap templates (module paths, `{i}` for a layer index) and a layer mapping;
    `workbench/build/taps.py` resolves them against both models (`bind`), probes widths, and adds
    the projectors the term asks for. The term then reads `LossInputs.student_features[s]` and
    `LossInputs.teacher_features[t]` for each bound pair (s, t) and averages over pairs.

    Args:
        student: tap template on the student, e.g. "model.language_model.layers.{i}" or
            "model.multi_modal_projector" (":input" / ":qk" select another site).
        teacher: tap template on the teacher (default: the student's). Prefixed with
            "student:", the target is another tap inside the student itself (mmMamba's
            layer-wise stages compare each Mamba mixer with the attention kept beside it), and
            the term needs no teacher.
        layers: layer mapping when the templates hold `{i}` (see `workbench.taps.layer_pairs`),
            or "mamba": the student's Mamba layers, each with the same index on the other side.
        projector: "auto" (a learned Linear when widths differ), "linear" or "none".
    """

    needs_teacher = True
    needs_dense_teacher = True  # reads the teacher's insides, which no cache holds
    site = "output"  # the tap site this term reads when the template names none
    uses_projector = False

    def __init__(self, student: str | None, teacher: str | None = None, layers: Any = None,
                 projector: str = "auto") -> None:
        super().__init__()
        if not student:
            raise ValueError(f"{type(self).__name__} needs a 'student' tap (a module path)")
        target = teacher or student
        self.target_on_student = target.startswith(STUDENT_TARGET)
        if self.target_on_student:
            target = target[len(STUDENT_TARGET):]
            self.needs_teacher = self.needs_dense_teacher = False
        self.student_template = self._with_site(student)
        self.teacher_template = self._with_site(target)
        self.layers = layers
        self.projector_mode = projector
        self.pairs: list[tuple[str, str]] = []
        self.projectors = nn.ModuleList()

    def _with_site(self, template: str) -> str:
        """The template with this term's default site appended when it names none."""
        if ":" in template or self.site == "output":
            return template
        return f"{template}:{self.site}"

    def bind(self, pairs: list[tuple[str, str]], projectors: list[nn.Module | None]) -> None:
        """Fix the (student tap, teacher tap) pairs and their projectors (None = identity)."""
        self.pairs = list(pairs)
        self.projectors = nn.ModuleList([p if p is not None else nn.Identity() for p in projectors])

    def expand(self, tap: str) -> list[str]:
        """The taps one bound tap string stands for (Q/K/V templates stand for three)."""
        return [tap]

    def project(self, index: int, x: Tensor) -> Tensor:
        return self.projectors[index](x) if len(self.projectors) > index else x

    def forward(self, inputs: LossInputs) -> Tensor:
        if not self.pairs:
            raise ValueError(f"{type(self).__name__} is not bound to taps; build it with workbench.build")
        targets = inputs.student_features if self.target_on_student else inputs.teacher_features
        values = [self.compare(i, inputs.student_features[s], targets[t], inputs)
                  for i, (s, t) in enumerate(self.pairs)]
        return torch.stack(values).mean()

    def compare(self, index: int, student: Any, teacher: Any, inputs: LossInputs) -> Tensor:
        raise NotImplementedError
