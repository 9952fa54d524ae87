"""The logit terms: cross-entropy, a divergence against the teacher, LLaVA-KD's MDist.

Divergences come from `losses/logit.py` by name, against dense teacher logits or a cached
top-k teacher (`teachers/cache.py`); in fused mode (`trainer.fused_logits`) from
`kernels.fused_linear_kd`, which never holds the (B, L, V) student logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losses.inputs import TOKEN_MASKS, LossInputs, check_choice
from losses.logit import (check_divergence_options, cross_entropy, forward_kl, jsd, reverse_kl, soft_cross_entropy,
                          sparse_divergence, tvd)
from losses.term import LossTerm

DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "tvd": tvd, "soft_ce": soft_cross_entropy}
FUSED_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")  # also the ones a top-k cache serves


def _fused(hidden_rows: Tensor, head: nn.Module, **target) -> Tensor:
    """`kernels.fused_linear_kd` on (N, H) hidden rows through the LM head `head`."""
    from kernels.fused_linear_kd import fused_linear_kd

    weight = head.fused_weight() if hasattr(head, "fused_weight") else head.weight  # e.g. a fake-quantized head
    return fused_linear_kd(hidden_rows, weight, bias=getattr(head, "bias", None), **target)


class CrossEntropyTerm(LossTerm):
    """Next-token cross-entropy on answer tokens (or on the class of each image): the hard-label term.

    Args:
        label_smoothing: epsilon of label smoothing (DeiT / MiniViT train with 0.1).
    """

    needs_teacher = False
    needs_dense_teacher = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, inputs: LossInputs) -> Tensor:
        """Returns the scalar per-answer-token (per-image) mean cross-entropy."""
        if inputs.classification:
            return cross_entropy(inputs.student_logits, inputs.labels, label_smoothing=self.label_smoothing)
        if self.label_smoothing and inputs.fused:
            raise ValueError("label smoothing is not supported with trainer.fused_logits")
        mask = inputs.token_mask("answer")  # (B, L-1)
        if inputs.fused:
            # CE is the forward KL to a one-hot teacher: top-1 = the label, log p = 0, no rest mass
            targets = inputs.shifted_labels[mask]  # (N,)
            zeros = torch.zeros(targets.shape[0], 1, device=targets.device)
            return _fused(inputs.student_hidden[:, :-1][mask], inputs.student_head, topk_ids=targets[:, None],
                          topk_logp=zeros, rest_logp=torch.full_like(zeros[:, 0], float("-inf")))
        return cross_entropy(inputs.shifted_student_logits, inputs.shifted_labels, mask,
                             label_smoothing=self.label_smoothing)


class LogitDivergenceTerm(LossTerm):
    """A divergence from `losses/logit.py` between student and teacher next-token distributions.

    Uses `LossInputs.teacher_logits` when present, else the cached top-k teacher
    `LossInputs.teacher_topk` (through `sparse_divergence`, which covers answer tokens only).
    In fused mode the same value comes from `kernels.fused_linear_kd`, which never holds
    more than a chunk of student logits.

    On an image-classification batch every sample counts (one row of class logits each).

    Args:
        divergence: "forward_kl", "reverse_kl", "jsd", "tvd", or "soft_ce" (MiniViT's
            prediction-logit loss: -sum p_T log p_S, no tau**2; dense teacher logits, unfused only).
        temperature: softmax temperature tau > 0 (the loss carries the tau**2 factor).
        mask: which prediction positions count; see `LossInputs.token_mask`.
        beta: teacher weight of the JSD mixture, in [0, 1]; used by "jsd" only.
        reduction: "mean" (per kept token) or "batchmean" (summed over kept tokens, divided
            by the batch size: PyTorch's KLDivLoss(reduction="batchmean") on (B, L, V) logits,
            as MaTVLM and mmMamba compute it).
    """

    needs_teacher = True

    def __init__(self, divergence: str, temperature: float = 1.0, mask: str = "answer", beta: float = 0.5,
                 reduction: str = "mean") -> None:
        super().__init__()
        check_choice("reduction", reduction, ("mean", "batchmean"))
        self.reduction = reduction
        check_divergence_options(divergence, temperature, beta, kinds=tuple(DIVERGENCES))
        check_choice("token mask", mask, TOKEN_MASKS)
        self.divergence = divergence
        self.temperature = temperature
        self.mask = mask
        self.beta = beta
        self.needs_dense_teacher = mask != "answer" or divergence not in FUSED_DIVERGENCES  # a top-k cache: answers only

    def forward(self, inputs: LossInputs) -> Tensor:
        """Returns the divergence over the positions of `self.mask`, averaged per token (or
        summed per sample with `reduction="batchmean"`)."""
        value = self._mean(inputs)
        if self.reduction == "batchmean" and not inputs.classification:
            mask = inputs.token_mask("answer" if inputs.teacher_logits is None else self.mask)
            value = value * mask.sum() / mask.shape[0]
        return value

    def _mean(self, inputs: LossInputs) -> Tensor:
        if inputs.teacher_logits is None and inputs.teacher_topk is not None:
            return self._sparse(inputs)
        if inputs.teacher_logits is None:
            raise ValueError(
                f"{self.divergence} term needs teacher_logits or teacher_topk, but LossInputs has neither"
            )
        extra = {"beta": self.beta} if self.divergence == "jsd" else {}
        if inputs.classification:
            return DIVERGENCES[self.divergence](inputs.student_logits, inputs.teacher_logits, None, self.temperature,
                                                **extra)
        if inputs.fused and self.divergence not in FUSED_DIVERGENCES:
            raise ValueError(f"{self.divergence} has no fused kernel; set trainer.fused_logits=false")
        if inputs.fused:
            positions = inputs.position_mask(self.mask)  # (B, L): the prediction positions, unshifted
            return _fused(inputs.student_hidden[positions], inputs.student_head,
                          teacher_logits=inputs.teacher_logits_at(positions),
                          kind=self.divergence, temperature=self.temperature, beta=self.beta)
        return DIVERGENCES[self.divergence](inputs.shifted_student_logits, inputs.shifted_teacher_logits,
                                            inputs.token_mask(self.mask), self.temperature, **extra)

    def teacher_positions(self, inputs: LossInputs) -> Tensor:
        """(B, L) bool: where this term reads teacher logits."""
        return inputs.position_mask(self.mask)

    def cache_temperature(self) -> float | None:
        return None if self.needs_dense_teacher else self.temperature

    def _sparse(self, inputs: LossInputs) -> Tensor:
        if self.divergence not in FUSED_DIVERGENCES:
            raise ValueError(f"{self.divergence} needs dense teacher logits; a top-k teacher cache cannot serve it")
        if self.mask != "answer":
            raise ValueError(
                f"{self.divergence} term with mask={self.mask!r} needs dense teacher_logits; a cached top-k "
                "teacher (teacher_topk) covers answer tokens only, so use mask='answer'"
            )
        ids, logp, rest = inputs.sparse_teacher_rows()
        if inputs.fused:
            return _fused(inputs.student_hidden[:, :-1][inputs.token_mask("answer")], inputs.student_head,
                          topk_ids=ids, topk_logp=logp, rest_logp=rest, kind=self.divergence,
                          temperature=self.temperature, beta=self.beta)
        student = inputs.shifted_student_logits[inputs.token_mask("answer")]  # (N, V)
        rows = sparse_divergence(student, ids, logp, self.divergence, self.temperature, self.beta, rest)  # (N,)
        if rows.shape[0] == 0:
            return rows.sum()  # empty sum: an exact 0 whose backward gives zero gradients
        return rows.mean()

    def extra_repr(self) -> str:
        beta = f", beta={self.beta}" if self.divergence == "jsd" else ""
        reduction = f", reduction={self.reduction!r}" if self.reduction != "mean" else ""
        return f"{self.divergence}, temperature={self.temperature}, mask={self.mask!r}{beta}{reduction}"


class MDistTerm(LossTerm):
    """LLaVA-KD's multimodal distillation: KL on answer tokens + KL at image-token positions.

    Each part is a per-token mean over its own positions (the unofficial re-implementation
    averages the response and visual KL separately and adds them, weights 1; docs/methods.md §8);
    the image part distils the LM-head outputs at the positions holding image tokens.

    Args:
        temperature: tau of both parts.
        divergence: the divergence of both parts (LLaVA-KD: forward KL).
    """

    needs_teacher = True
    needs_dense_teacher = True  # image positions are not in a top-k cache

    def __init__(self, temperature: float = 1.0, divergence: str = "forward_kl") -> None:
        super().__init__()
        self.response = LogitDivergenceTerm(divergence, temperature, mask="answer")
        self.visual = LogitDivergenceTerm(divergence, temperature, mask="image")

    def teacher_positions(self, inputs: LossInputs) -> Tensor:
        return self.response.teacher_positions(inputs) | self.visual.teacher_positions(inputs)

    def forward(self, inputs: LossInputs) -> Tensor:
        return self.response(inputs) + self.visual(inputs)
