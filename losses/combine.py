"""The objective: named, weighted loss terms, and what they need taken together.

`WeightedLoss` adds the active terms and returns every value for logging; its properties
aggregate the terms' declared capabilities (`losses/term.py`) for the trainer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losses.inputs import LossInputs
from losses.term import LossTerm, TappedTerm


class WeightedLoss(nn.Module):
    """Weighted sum of named terms; terms with weight 0 are dropped and never computed.

    Args:
        terms: name -> (weight, `LossTerm`). Names become log keys (no "." allowed).
    """

    def __init__(self, terms: dict[str, tuple[float, LossTerm]]) -> None:
        super().__init__()
        wrong = [name for name, (_, term) in terms.items() if not isinstance(term, LossTerm)]
        if wrong:
            raise TypeError(f"loss terms {', '.join(wrong)} are not LossTerm subclasses (losses/term.py)")
        active = {name: (weight, term) for name, (weight, term) in terms.items() if weight != 0}
        if not active:
            raise ValueError(f"WeightedLoss needs a term with non-zero weight, got {sorted(terms)}")
        self.weights = {name: float(weight) for name, (weight, _) in active.items()}
        self.terms = nn.ModuleDict({name: term for name, (_, term) in active.items()})
        # teacher taps the *student* reads as inputs (a draft head reads its target's features):
        # the teacher then runs whatever the terms need, and captures these too
        self.student_reads: list[str] = []

    @property
    def needs_teacher(self) -> bool:
        """Whether any active term reads teacher logits (so the trainer must run the teacher)."""
        return bool(self.student_reads) or any(term.needs_teacher for term in self.terms.values())

    @property
    def needs_hidden_states(self) -> bool:
        """Whether any active term reads every hidden state of the student's decoder."""
        return any(term.needs_hidden_states for term in self.terms.values())

    def vision_feature_terms(self) -> list[str]:
        """Active terms that read a vision encoder's patch features."""
        return [name for name, term in self.terms.items() if term.needs_vision_features]

    def cache_temperatures(self) -> set[float]:
        """The temperatures at which the active terms read a cached top-k teacher."""
        return {t for term in self.terms.values() if (t := term.cache_temperature()) is not None}

    def teacher_logit_positions(self, inputs: LossInputs) -> Tensor:
        """(B, L) bool: every position whose teacher logits an active term reads (fused mode
        asks the teacher for these rows only)."""
        inputs._sequence()
        keep = torch.zeros_like(inputs.image_mask, dtype=torch.bool)
        for term in self.terms.values():
            positions = term.teacher_positions(inputs)
            if positions is not None:
                keep |= positions
        return keep

    def dense_teacher_terms(self) -> list[str]:
        """Active terms that need the teacher itself, not a top-k logit cache."""
        names = [name for name, term in self.terms.items() if term.needs_dense_teacher]
        return names + ["the student's inputs"] if self.student_reads else names

    def tapped_terms(self) -> dict[str, TappedTerm]:
        """The active terms that read feature taps."""
        return {name: term for name, term in self.terms.items() if isinstance(term, TappedTerm)}

    def tap_points(self) -> tuple[list[str], list[str]]:
        """Every student and teacher tap the bound terms read (strings, see `workbench.taps`)."""
        student, teacher = [], []
        for term in self.tapped_terms().values():
            for s, t in term.pairs:
                student += term.expand(s)
                (student if term.target_on_student else teacher).extend(term.expand(t))
        return list(dict.fromkeys(student)), list(dict.fromkeys(teacher + self.student_reads))

    def forward(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute every active term once.

        Args:
            inputs: the batch.
        Returns:
            total: scalar sum of weight * term.
            values: name -> detached, unweighted scalar value of each active term.
        """
        values = {name: term(inputs) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, {name: value.detach() for name, value in values.items()}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {weight:g}" for name, weight in self.weights.items())
