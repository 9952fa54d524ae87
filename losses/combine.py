"""Named loss terms over one VLM batch, and their weighted sum.

`LossInputs` holds a batch's logits and masks and owns the next-token shift; each term turns
it into a scalar; `WeightedLoss` adds active terms and returns every value for logging.
Divergences come from `losses/logit.py` by name, against dense teacher logits or a cached
top-k teacher (`teachers/cache.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from losses.logit import cross_entropy, forward_kl, jsd, reverse_kl, sparse_divergence, tvd

IGNORE_INDEX = -100

TOKEN_MASKS = ("answer", "image", "all", "answer+image")
DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "tvd": tvd}


def _check_choice(kind: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")


@dataclass
class LossInputs:
    """One batch as the loss terms see it; position t of the logits predicts token t + 1.

    Attributes:
        student_logits: (B, L, V) student logits.
        labels: (B, L) token ids on answer tokens, IGNORE_INDEX elsewhere.
        attention_mask: (B, L) 1 on real tokens, 0 on padding.
        image_mask: (B, L) bool, True on image-token positions.
        teacher_logits: (B, L, V) teacher logits, or None when no term needs them.
        teacher_topk: a cached sparse teacher instead of `teacher_logits`: (ids (M, K) integer,
            logp (M, K) float[, rest_logp (M,) float: log of the mass outside the top-k, when
            the cache stores it]) with one row per label, M = (labels != IGNORE_INDEX).sum(), in
            row-major (b, t) order; row (b, t) is the teacher's top-k for predicting
            labels[b, t], i.e. from position t - 1. logp is log_softmax(teacher_logits / tau)
            at the term's temperature. Rows for labels at t = 0 (nothing predicts them) are
            dropped, as the dense path drops them.
    """

    student_logits: Tensor
    labels: Tensor
    attention_mask: Tensor
    image_mask: Tensor
    teacher_logits: Tensor | None = None
    teacher_topk: tuple[Tensor, ...] | None = None

    def __post_init__(self) -> None:
        token_shape = self.student_logits.shape[:2]
        for name in ("labels", "attention_mask", "image_mask"):
            shape = getattr(self, name).shape
            if shape != token_shape:
                raise ValueError(
                    f"{name} has shape {tuple(shape)} but student_logits has shape "
                    f"{tuple(self.student_logits.shape)}; expected {tuple(token_shape)}"
                )
        if self.teacher_topk is not None:
            self._check_teacher_topk()

    def _check_teacher_topk(self) -> None:
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
        return self.student_logits[:, :-1]

    @property
    def shifted_teacher_logits(self) -> Tensor | None:
        """(B, L-1, V) teacher logits at prediction positions, or None."""
        return None if self.teacher_logits is None else self.teacher_logits[:, :-1]

    @property
    def shifted_labels(self) -> Tensor:
        """(B, L-1) the token each prediction position should predict."""
        return self.labels[:, 1:]

    def sparse_teacher_rows(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Student logits at the "answer" prediction positions and the cached teacher's rows there.

        Returns:
            student: (N, V) student logits where `token_mask("answer")` is True, row-major.
            topk_ids: (N, K) the teacher's top-k ids for the same positions.
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
        student = self.shifted_student_logits[self.token_mask("answer")]  # (N, V)
        return student, ids[predictable], logp[predictable], None if rest is None else rest[predictable]

    def token_mask(self, which: str) -> Tensor:
        """Which prediction positions a term averages over.

        Args:
            which: "answer" (the next token is an answer token), "image" (the position holds
                an image token), "all" (the position is not padding) or "answer+image" (the
                union, as LLaVA-KD's MDist distils answer tokens and image-token outputs).
        Returns:
            (B, L-1) bool mask over prediction positions.
        """
        _check_choice("token mask", which, TOKEN_MASKS)
        answer = self.shifted_labels != IGNORE_INDEX  # (B, L-1)
        image = self.image_mask[:, :-1].bool()  # (B, L-1)
        if which == "answer":
            return answer
        if which == "image":
            return image
        if which == "all":
            return self.attention_mask[:, :-1].bool()
        return answer | image


class CrossEntropyTerm(nn.Module):
    """Next-token cross-entropy on answer tokens: the hard-label term."""

    needs_teacher = False

    def forward(self, inputs: LossInputs) -> Tensor:
        """Returns the scalar per-answer-token mean cross-entropy."""
        return cross_entropy(inputs.shifted_student_logits, inputs.shifted_labels, inputs.token_mask("answer"))


class LogitDivergenceTerm(nn.Module):
    """A divergence from `losses/logit.py` between student and teacher next-token distributions.

    Uses `LossInputs.teacher_logits` when present, else the cached top-k teacher
    `LossInputs.teacher_topk` (through `sparse_divergence`, which covers answer tokens only).

    Args:
        divergence: "forward_kl", "reverse_kl", "jsd" or "tvd".
        temperature: softmax temperature tau > 0 (the loss carries the tau**2 factor).
        mask: which prediction positions count; see `LossInputs.token_mask`.
        beta: teacher weight of the JSD mixture, in [0, 1]; used by "jsd" only.
    """

    needs_teacher = True

    def __init__(self, divergence: str, temperature: float = 1.0, mask: str = "answer", beta: float = 0.5) -> None:
        super().__init__()
        _check_choice("divergence", divergence, list(DIVERGENCES))
        _check_choice("token mask", mask, TOKEN_MASKS)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.divergence = divergence
        self.temperature = temperature
        self.mask = mask
        self.beta = beta

    def forward(self, inputs: LossInputs) -> Tensor:
        """Returns the scalar per-token mean divergence over the positions of `self.mask`."""
        teacher = inputs.shifted_teacher_logits
        if teacher is None and inputs.teacher_topk is not None:
            return self._sparse(inputs)
        if teacher is None:
            raise ValueError(
                f"{self.divergence} term needs teacher_logits or teacher_topk, but LossInputs has neither"
            )
        extra = {"beta": self.beta} if self.divergence == "jsd" else {}
        return DIVERGENCES[self.divergence](
            inputs.shifted_student_logits, teacher, inputs.token_mask(self.mask), self.temperature, **extra
        )

    def _sparse(self, inputs: LossInputs) -> Tensor:
        if self.mask != "answer":
            raise ValueError(
                f"{self.divergence} term with mask={self.mask!r} needs dense teacher_logits; a cached top-k "
                "teacher (teacher_topk) covers answer tokens only, so use mask='answer'"
            )
        student, ids, logp, rest = inputs.sparse_teacher_rows()
        rows = sparse_divergence(student, ids, logp, self.divergence, self.temperature, self.beta, rest)  # (N,)
        if rows.shape[0] == 0:
            return rows.sum()  # empty sum: an exact 0 whose backward gives zero gradients
        return rows.mean()

    def extra_repr(self) -> str:
        beta = f", beta={self.beta}" if self.divergence == "jsd" else ""
        return f"{self.divergence}, temperature={self.temperature}, mask={self.mask!r}{beta}"


class WeightedLoss(nn.Module):
    """Weighted sum of named terms; terms with weight 0 are dropped and never computed.

    Args:
        terms: name -> (weight, term), where a term maps `LossInputs` to a scalar and has a
            `needs_teacher` attribute. Names become log keys (no "." allowed).
    """

    def __init__(self, terms: dict[str, tuple[float, nn.Module]]) -> None:
        super().__init__()
        active = {name: (weight, term) for name, (weight, term) in terms.items() if weight != 0}
        if not active:
            raise ValueError(f"WeightedLoss needs a term with non-zero weight, got {sorted(terms)}")
        self.weights = {name: float(weight) for name, (weight, _) in active.items()}
        self.terms = nn.ModuleDict({name: term for name, (_, term) in active.items()})

    @property
    def needs_teacher(self) -> bool:
        """Whether any active term reads teacher logits (so the trainer must run the teacher)."""
        return any(term.needs_teacher for term in self.terms.values())

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
