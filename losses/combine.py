"""Named loss terms over one batch, and their weighted sum.

`LossInputs` holds a batch's logits and masks and owns the next-token shift (or, for image
classification, one row of class logits per sample); each term turns
it into a scalar; `WeightedLoss` adds active terms and returns every value for logging.
Divergences come from `losses/logit.py` by name, against dense teacher logits or a cached
top-k teacher (`teachers/cache.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from losses.logit import cross_entropy, forward_kl, jsd, reverse_kl, soft_cross_entropy, sparse_divergence, tvd

IGNORE_INDEX = -100

TOKEN_MASKS = ("answer", "image", "all", "answer+image")
FEATURE_MASKS = (*TOKEN_MASKS, "none")  # "none": every row of a tapped tensor (e.g. vision-tower tokens)
DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "tvd": tvd, "soft_ce": soft_cross_entropy}
STUDENT_TARGET = "student:"  # a tapped term's target read inside the student itself
FUSED_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")  # also the ones a top-k cache serves


def _check_choice(kind: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
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
            self._check_teacher_topk()

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
        _check_choice("mask", which, FEATURE_MASKS)
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
        _check_choice("token mask", which, TOKEN_MASKS)
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


def _fused(hidden_rows: Tensor, head: nn.Module, **target) -> Tensor:
    """`kernels.fused_linear_kd` on (N, H) hidden rows through the LM head `head`."""
    from kernels.fused_linear_kd import fused_linear_kd

    return fused_linear_kd(hidden_rows, head.weight, bias=getattr(head, "bias", None), **target)


class CrossEntropyTerm(nn.Module):
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


class LogitDivergenceTerm(nn.Module):
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
        _check_choice("reduction", reduction, ("mean", "batchmean"))
        self.reduction = reduction
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


class MDistTerm(nn.Module):
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


def align_tokens(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N, ...) taps of different token counts -> the shorter count, dropping the longer's
    leading tokens: the class / register tokens timm ViTs put before the patches (a DeiT
    teacher has 1 + N tokens, a Mini-DeiT student N)."""
    n_s, n_t = student.shape[1], teacher.shape[1]
    if n_s == n_t or student.dim() < 3:
        return student, teacher
    n = min(n_s, n_t)
    return student[:, n_s - n:], teacher[:, n_t - n:]


class TappedTerm(nn.Module):
    """Base of the terms that compare tensors tapped inside the student and the teacher.

    Config gives tap templates (module paths, `{i}` for a layer index) and a layer mapping;
    `workbench/build.py` resolves them against both models (`bind`), probes widths, and adds
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

    @property
    def needs_hidden_states(self) -> bool:
        """Whether any active term reads every hidden state of the student's decoder."""
        return any(getattr(term, "needs_hidden_states", False) for term in self.terms.values())

    def teacher_logit_positions(self, inputs: LossInputs) -> Tensor:
        """(B, L) bool: every position whose teacher logits an active term reads (fused mode
        asks the teacher for these rows only)."""
        inputs._sequence()
        keep = torch.zeros_like(inputs.image_mask, dtype=torch.bool)
        for term in self.terms.values():
            if hasattr(term, "teacher_positions"):
                keep |= term.teacher_positions(inputs)
        return keep

    def dense_teacher_terms(self) -> list[str]:
        """Active terms that need the teacher itself, not a top-k logit cache."""
        return [name for name, term in self.terms.items() if getattr(term, "needs_dense_teacher", False)]

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
        return list(dict.fromkeys(student)), list(dict.fromkeys(teacher))

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
