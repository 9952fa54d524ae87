"""One batch as the loss terms see it: `LossInputs`, its masks and the next-token shift.

`LossInputs` holds a batch's logits and masks and owns the next-token shift (or, for image
classification, one row of class logits per sample); every term (`losses/term.py`) turns it
into a scalar.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100

TOKEN_MASKS = ("answer", "image", "all", "answer+image")
FEATURE_MASKS = (*TOKEN_MASKS, "none")  # "none": every row of a tapped tensor (e.g. vision-tower tokens)


def check_choice(kind: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")


@dataclass
class LossInputs:
    """One batch as the loss terms see it; position t of the logits predicts token t + 1.

    For image classification there is no token sequence: `student_logits` is (B, C),
    `labels` is (B,) and `attention_mask` / `image_mask` are None (`classification` is True).

    Attributes:
        student_logits: (B, L, V) student logits, or None in fused mode, where the logit terms
            work from `student_hidden` and `student_head` chunk by chunk
            (`kernels.fused_linear_kd`) and the (B, L, V) logits never exist.
        labels: (B, L) token ids on answer tokens, IGNORE_INDEX elsewhere.
        attention_mask: (B, L) 1 on real tokens, 0 on padding.
        image_mask: (B, L) bool, True on image-token positions.
        teacher_logits: (B, L, V) teacher logits, or None when no term needs them; with
            `teacher_keep`, only the rows at its True positions: (N_keep, V), row-major.
        teacher_topk: a cached sparse teacher instead of `teacher_logits`: (ids (M, K) integer,
            logp (M, K) float[, rest_logp (M,) float: log of the mass outside the top-k, when
            the cache stores it]) with one row per label, M = (labels != IGNORE_INDEX).sum(), in
            row-major (b, t) order; row (b, t) is the teacher's top-k for predicting
            labels[b, t], i.e. from position t - 1. logp is log_softmax(teacher_logits / tau)
            at the term's temperature. Rows for labels at t = 0 (nothing predicts them) are
            dropped, as the dense path drops them.
        student_hidden: (B, L, H) the student's final hidden states (the LM head's input);
            set in fused mode.
        student_head: the student's LM head (an `nn.Linear`), with `student_hidden`.
        student_features, teacher_features: tap string (see `workbench/taps.py`) -> what the
            tap captured in this forward pass, for the feature, relation and attention terms.
        teacher_keep: (B, L) bool, the positions whose teacher logits `teacher_logits` holds
            (fused mode asks the teacher for those rows only), or None for all positions.
        student_hidden_states: every hidden state of the student's decoder (embeddings first,
            the final normed state last), when a term reads them (`needs_hidden_states`).
        image_grids: per image of the batch (in order), its (rows, columns) of cells - the
            encoder-free students' tokenizer grid.
        vision_features: (N_images, grid_h * grid_w, D) patch features of a frozen vision
            encoder teacher (`teachers/vision_encoder.py`) on the batch's images, row by row
            on `vision_grid`.
    """

    student_logits: Tensor | None
    labels: Tensor
    attention_mask: Tensor | None = None
    image_mask: Tensor | None = None
    teacher_logits: Tensor | None = None
    teacher_topk: tuple[Tensor, ...] | None = None
    student_hidden: Tensor | None = None
    student_head: nn.Module | None = None
    student_features: dict[str, Any] = field(default_factory=dict)
    teacher_features: dict[str, Any] = field(default_factory=dict)
    teacher_keep: Tensor | None = None
    student_hidden_states: tuple[Tensor, ...] | None = None
    image_grids: list[tuple[int, int]] | None = None
    vision_features: Tensor | None = None
    vision_grid: tuple[int, int] | None = None

    @classmethod
    def before_student(cls, labels: Tensor, attention_mask: Tensor | None = None,
                       image_mask: Tensor | None = None) -> LossInputs:
        """A batch's inputs before the student pass, for the teacher side to fill first; not
        checked until `dataclasses.replace(inputs, student_logits=...)` completes it."""
        inputs = object.__new__(cls)
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else (
                None if f.default is MISSING else f.default)
            setattr(inputs, f.name, default)
        inputs.labels, inputs.attention_mask, inputs.image_mask = labels, attention_mask, image_mask
        return inputs

    def __post_init__(self) -> None:
        if self.classification:
            self._check_classification()
            return
        if self.student_logits is None and (self.student_hidden is None or self.student_head is None):
            raise ValueError("LossInputs needs student_logits, or student_hidden and student_head (fused mode)")
        source = self.student_logits if self.student_logits is not None else self.student_hidden
        token_shape = source.shape[:2]
        for name in ("labels", "attention_mask", "image_mask"):
            shape = getattr(self, name).shape
            if shape != token_shape:
                raise ValueError(
                    f"{name} has shape {tuple(shape)} but the student's outputs have shape "
                    f"{tuple(source.shape)}; expected {tuple(token_shape)}"
                )
        if self.teacher_topk is not None:
            self.check_teacher_topk()

    @property
    def classification(self) -> bool:
        """One label per sample (image classification) instead of a token sequence."""
        return self.image_mask is None

    def _check_classification(self) -> None:
        if self.student_logits is None or self.student_logits.dim() != 2:
            raise ValueError("classification LossInputs need (B, C) student_logits (no fused mode)")
        if self.labels.shape != self.student_logits.shape[:1]:
            raise ValueError(f"labels have shape {tuple(self.labels.shape)}; expected ({self.student_logits.shape[0]},), "
                             "one class per sample")
        if self.attention_mask is not None or self.teacher_topk is not None:
            raise ValueError("classification LossInputs take no attention_mask and no teacher_topk")

    def on_sequence(self, x: Tensor) -> bool:
        """Whether a tapped tensor is laid out over the batch's token sequence, (B, L, ...)."""
        return self.image_mask is not None and tuple(x.shape[:2]) == tuple(self.image_mask.shape)

    def _sequence(self) -> None:
        if self.classification:
            raise ValueError("token and position masks need a token sequence; an image-classification batch has "
                             "none (use mask: none)")

    @property
    def fused(self) -> bool:
        """Whether the student logits are left unmaterialised (terms work from hidden states)."""
        return self.student_logits is None

    def check_teacher_topk(self) -> None:
        if not (isinstance(self.teacher_topk, tuple | list) and len(self.teacher_topk) in (2, 3)):
            raise ValueError("teacher_topk must be (topk_ids (M, K), topk_logp (M, K)[, rest_logp (M,)])")
        ids, logp = self.teacher_topk[:2]
        if len(self.teacher_topk) == 3 and self.teacher_topk[2].shape != ids.shape[:1]:
            raise ValueError(f"teacher_topk rest_logp has shape {tuple(self.teacher_topk[2].shape)}; "
                             f"expected ({ids.shape[0]},), one per row")
        n_labels = int((self.labels != IGNORE_INDEX).sum())
        if ids.dim() != 2 or ids.shape != logp.shape or ids.shape[0] != n_labels:
            raise ValueError(
                f"teacher_topk has shapes {tuple(ids.shape)} and {tuple(logp.shape)} but the batch has "
                f"{n_labels} labels; expected two (M, K) tensors with M = {n_labels}, one row per label"
            )

    @property
    def shifted_student_logits(self) -> Tensor:
        """(B, L-1, V) student logits at prediction positions."""
        if self.student_logits is None:
            raise ValueError("this term needs the full student logits, which fused mode does not compute")
        return self.student_logits[:, :-1]

    def student_logits_at(self, positions: Tensor) -> Tensor:
        """(N, V) student logits at the True positions of a (B, L) mask, computed from the hidden
        states (only those rows) in fused mode."""
        if self.student_logits is not None:
            return self.student_logits[positions]
        return self.student_head(self.student_hidden[positions])

    def position_mask(self, which: str) -> Tensor:
        """`token_mask` over all L input positions: (B, L) bool; "none" is every position.

        Position t counts as "answer" when it predicts an answer token (labels[t + 1] is
        set), as in `token_mask`; "image" when it holds an image token.
        """
        check_choice("mask", which, FEATURE_MASKS)
        self._sequence()
        if which == "none":
            return torch.ones_like(self.image_mask, dtype=torch.bool)
        mask = self.token_mask(which)  # (B, L-1)
        return torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)  # (B, L)

    @property
    def shifted_teacher_logits(self) -> Tensor | None:
        """(B, L-1, V) teacher logits at prediction positions, or None."""
        if self.teacher_keep is not None:
            raise ValueError("the teacher logits hold selected rows only (teacher_keep); use teacher_logits_at")
        return None if self.teacher_logits is None else self.teacher_logits[:, :-1]

    def teacher_logits_at(self, positions: Tensor) -> Tensor:
        """(N, V) teacher logits at the True positions of a (B, L) mask, row-major."""
        if self.teacher_logits is None:
            raise ValueError("this term needs dense teacher logits, but LossInputs has none")
        if self.teacher_keep is None:
            return self.teacher_logits[positions]
        if (positions & ~self.teacher_keep).any():
            raise ValueError("a term reads teacher logits at positions the teacher was not asked for")
        row = self.teacher_keep.flatten().long().cumsum(0) - 1  # (B * L,) row of each kept position
        return self.teacher_logits[row[positions.flatten()]]

    @property
    def shifted_labels(self) -> Tensor:
        """(B, L-1) the token each prediction position should predict."""
        return self.labels[:, 1:]

    def sparse_teacher_rows(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The cached teacher's rows at the "answer" prediction positions.

        Returns:
            topk_ids: (N, K) the teacher's top-k ids where `token_mask("answer")` is True, row-major.
            topk_logp: (N, K) the teacher's log-probabilities at those ids.
            rest_logp: (N,) log of the teacher's mass outside them, or None if not cached.
        """
        if self.teacher_topk is None:
            raise ValueError("sparse_teacher_rows needs LossInputs.teacher_topk, which is None")
        ids, logp = self.teacher_topk[:2]
        rest = self.teacher_topk[2] if len(self.teacher_topk) == 3 else None
        labelled = self.labels != IGNORE_INDEX  # (B, L)
        # Cache rows follow labels over (B, L); prediction rows follow labels[:, 1:]. Both are
        # row-major, so dropping the rows of labels at t = 0 aligns them one to one.
        predictable = labelled.nonzero()[:, 1] > 0  # (M,)
        return ids[predictable], logp[predictable], None if rest is None else rest[predictable]

    def token_mask(self, which: str) -> Tensor:
        """Which prediction positions a term averages over.

        Args:
            which: "answer" (the next token is an answer token), "image" (the position holds
                an image token), "all" (the position is not padding) or "answer+image" (the
                union, as LLaVA-KD's MDist distils answer tokens and image-token outputs).
        Returns:
            (B, L-1) bool mask over prediction positions.
        """
        check_choice("token mask", which, TOKEN_MASKS)
        self._sequence()
        answer = self.shifted_labels != IGNORE_INDEX  # (B, L-1)
        image = self.image_mask[:, :-1].bool()  # (B, L-1)
        if which == "answer":
            return answer
        if which == "image":
            return image
        if which == "all":
            return self.attention_mask[:, :-1].bool()
        return answer | image
