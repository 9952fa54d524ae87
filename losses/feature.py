"""Feature distillation: match tapped hidden states or vision features, through a projector
when widths differ (FitNets-style hints).

`feature_mse` and `feature_cosine` are the pure functions; `FeatureTerm` reads one or more
tapped (student, teacher) pairs from `LossInputs` (see `losses/term.py` TappedTerm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.inputs import FEATURE_MASKS, LossInputs, check_choice
from losses.term import TappedTerm

FEATURE_KINDS = ("mse", "cosine", "smooth_l1")


def _rows(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} "
                         "must agree on every dim but the last")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"student width {student.shape[-1]} != teacher width {teacher.shape[-1]}; "
                         "project the student first")
    if mask is None:
        return student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    if mask.shape != student.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the features' leading dims {tuple(student.shape[:-1])}")
    return student[mask], teacher[mask]


def _elementwise(loss, student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    s, t = _rows(student, teacher, mask)
    if s.shape[0] == 0:
        return s.sum()
    return loss(s.float(), t.detach().float())


def feature_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over kept rows and channels (`F.mse_loss` on the kept rows).

    Args:
        student: (..., D) student features (already projected to the teacher's width).
        teacher: (..., D) teacher features (detached here).
        mask: (...) bool, True = row counts; None = every row.
    Returns:
        Scalar mean over kept rows x D; 0 (attached) when no row is kept.
    """
    return _elementwise(F.mse_loss, student, teacher, mask)


def feature_smooth_l1(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Smooth L1 (Huber, beta 1) over kept rows and channels, as `feature_mse` takes them:
    EAGLE's regression of a draft head onto its target's final hidden states."""
    return _elementwise(F.smooth_l1_loss, student, teacher, mask)


def feature_cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 - cosine similarity per row, averaged over kept rows; invariant to each row's scale.

    Args:
        student: (..., D) student features (already projected to the teacher's width).
        teacher: (..., D) teacher features (detached here).
        mask: (...) bool, True = row counts; None = every row.
    Returns:
        Scalar in [0, 2]; 0 (attached) when no row is kept.
    """
    s, t = _rows(student, teacher, mask)
    if s.shape[0] == 0:
        return s.sum()
    return (1 - F.cosine_similarity(s.float(), t.detach().float(), dim=-1)).mean()


class FeatureTerm(TappedTerm):
    """Match student features to the teacher's at tapped modules, pair by pair.

    Args:
        kind: "mse", "cosine" (1 - cos per row) or "smooth_l1" (EAGLE's draft-head loss).
        student, teacher, layers, projector: see `TappedTerm`.
        mask: which rows count when the tapped tensor is (B, L, D) over the token sequence:
            answer | image | all | answer+image (see `LossInputs.position_mask`), or "none"
            for every row (e.g. vision-tower tokens, which are not sequence positions).
    """

    uses_projector = True

    def __init__(self, kind: str, student: str | None = None, teacher: str | None = None, layers=None,
                 projector: str = "auto", mask: str = "none") -> None:
        super().__init__(student, teacher, layers, projector)
        check_choice("feature loss", kind, FEATURE_KINDS)
        check_choice("mask", mask, FEATURE_MASKS)
        self.kind = kind
        self.mask = mask

    def compare(self, index: int, student: Tensor, teacher: Tensor, inputs: LossInputs) -> Tensor:
        mask = None
        if self.mask != "none":
            mask = inputs.position_mask(self.mask)  # (B, L)
            if student.shape[:2] != mask.shape:
                raise ValueError(f"feature tap {self.pairs[index][0]} gives {tuple(student.shape)}, which is not "
                                 f"over the {tuple(mask.shape)} token sequence; use mask: none")
        fn = {"mse": feature_mse, "cosine": feature_cosine, "smooth_l1": feature_smooth_l1}[self.kind]
        return fn(self.project(index, student), teacher, mask)

    def extra_repr(self) -> str:
        return f"{self.kind}, pairs={self.pairs}, mask={self.mask!r}"


REPLAY_KINDS = ("l2", "mse")


class LayerReplayTerm(TappedTerm):
    """MaTVLM's teacher-input layer loss: each chosen student layer runs again on the
    teacher's input hidden state of its paired layer and is compared with that teacher
    layer's output, so a converted layer learns to stand in for the attention layer it
    replaced regardless of errors upstream.

    Args:
        student: template of the student's decoder layers, e.g. "model.language_model.layers.{i}".
        teacher: the teacher's (default: the same paths).
        layers: "mamba" (default: the student's Mamba layers, each with the same teacher
            layer) or any mapping `workbench.taps.layer_pairs` takes. The layers run without
            position embeddings or masks, so only Mamba layers may be replayed.
        kind: "l2" - MaTVLM's ||layer(h_in) - h_out|| over the whole (B, L, D) tensor
            (Frobenius, not squared, not averaged), summed over layers; or "mse" - the mean
            squared error, averaged over layers.
    """

    def __init__(self, student: str | None = None, teacher: str | None = None, layers: Any = "mamba",
                 kind: str = "l2") -> None:
        super().__init__(student, teacher, layers, projector="none")
        check_choice("layer replay distance", kind, REPLAY_KINDS)
        self.kind = kind
        object.__setattr__(self, "_layers", [])  # the student's layer modules (not submodules of the loss)

    def expand(self, tap: str) -> list[str]:
        return [f"{tap}:input", tap]

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Look up the student layers the bound pairs name (`workbench.build` calls this)."""
        from students.hybrid import MambaAttention

        layers = []
        for s, _ in self.pairs:
            module = student.get_submodule(s)  # the pairs were resolved against the student when bound
            if not isinstance(getattr(module, "self_attn", None), MambaAttention):
                raise ValueError(f"layer_replay: student layer {s} is not a Mamba layer; replayed layers run "
                                 "without position embeddings and masks (use layers: mamba)")
            layers.append(module)
        object.__setattr__(self, "_layers", layers)

    def forward(self, inputs: LossInputs) -> Tensor:
        if len(self._layers) != len(self.pairs) or not self.pairs:
            raise ValueError("LayerReplayTerm is not bound to the student's layers; build it with workbench.build")
        values = []
        for layer, (_, t) in zip(self._layers, self.pairs):
            h_in, h_out = inputs.teacher_features[f"{t}:input"], inputs.teacher_features[t]
            weight = next(layer.parameters())
            y = layer(h_in.detach().to(weight.dtype))
            y = y[0] if isinstance(y, tuple) else y
            diff = y.float() - h_out.detach().float()
            values.append(torch.linalg.vector_norm(diff) if self.kind == "l2" else diff.pow(2).mean())
        stacked = torch.stack(values)
        return stacked.sum() if self.kind == "l2" else stacked.mean()

    def extra_repr(self) -> str:
        return f"{self.kind}, pairs={self.pairs}"
