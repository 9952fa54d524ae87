"""Attention distillation: attention-map KL and MiniLMv2/MiniViT Q/K/V relation distillation.

Both compare softmax(X_a X_b^T * scale) row distributions between teacher and student and go
through `kernels.attention_kl`, which works from the queries and keys flash-style and never
holds a (B, H, N, N) map. Attention-map KL reads (query, key) pairs tapped at attention
modules (`workbench/taps.py` site "qk"); the Q/K/V relation reads the raw projections and
re-splits them into relation heads, so student and teacher widths may differ.
"""

from __future__ import annotations

import itertools

from torch import Tensor

from losses.inputs import FEATURE_MASKS, LossInputs, check_choice
from losses.term import TappedTerm, align_tokens

QKV = "{p}"  # placeholder for q / k / v in a Q/K/V relation tap template
ATTENTION_KINDS = ("kl", "ce")


def head_mapping(n_student: int, n_teacher: int, mapping=None) -> list[int]:
    """The teacher head each student head is compared with.

    Args:
        n_student, n_teacher: head counts.
        mapping: None / "uniform" (student head h -> teacher head h * n_teacher // n_student,
            the identity when counts match) or an explicit list of n_student teacher heads.
    """
    if mapping is None or mapping == "uniform":
        return [h * n_teacher // n_student for h in range(n_student)]
    heads = list(mapping)
    if len(heads) != n_student or not all(isinstance(h, int) and 0 <= h < n_teacher for h in heads):
        raise ValueError(f"head map {heads} must list {n_student} teacher heads in [0, {n_teacher})")
    return heads


def _repeat_kv(key: Tensor, n_heads: int) -> Tensor:
    """(B, Hkv, M, D) -> (B, n_heads, M, D): grouped-query keys shared by their query heads."""
    if key.shape[1] == n_heads:
        return key
    if n_heads % key.shape[1]:
        raise ValueError(f"{key.shape[1]} key heads do not divide {n_heads} query heads")
    return key.repeat_interleave(n_heads // key.shape[1], dim=1)


def attention_map_kl(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, *,
    scale_s: float | None = None, scale_t: float | None = None, causal: bool = False,
    key_mask: Tensor | None = None, query_mask: Tensor | None = None,
    head_map=None, kind: str = "kl",
) -> Tensor:
    """KL(teacher attention || student attention) per row, averaged over heads and counted rows.

    Args:
        q_s, k_s: (B, Hs, N, Ds) student queries, (B, Hs_kv, M, Ds) keys (grouped keys are
            repeated to the query heads).
        q_t, k_t: (B, Ht, N, Dt), (B, Ht_kv, M, Dt) teacher queries and keys.
        scale_s, scale_t: score scales (default 1 / sqrt(head dim)).
        causal: query i sees keys j <= i.
        key_mask: (B, M) bool, False on padding keys.
        query_mask: (B, N) bool, False on rows that do not count.
        head_map: which teacher head each student head matches (see `head_mapping`).
        kind: "kl" or "ce" (cross-entropy; the same gradient).
    Returns:
        Scalar.
    """
    from kernels.attention_kl import attention_kl

    check_choice("attention loss", kind, ATTENTION_KINDS)
    heads = head_mapping(q_s.shape[1], q_t.shape[1], head_map)
    k_s = _repeat_kv(k_s, q_s.shape[1])
    k_t = _repeat_kv(k_t.detach(), q_t.shape[1])[:, heads]
    q_t = q_t.detach()[:, heads]
    return attention_kl(q_s, k_s, q_t, k_t, scale_s=scale_s, scale_t=scale_t, causal=causal,
                        key_mask=key_mask, query_mask=query_mask, kind=kind)


def _relation_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    b, n, c = x.shape
    if c % heads:
        raise ValueError(f"width {c} is not divisible by {heads} relation heads")
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def qkv_relation(
    qkv_s: tuple[Tensor, Tensor, Tensor], qkv_t: tuple[Tensor, Tensor, Tensor], *,
    relation_heads: int = 1, mask: Tensor | None = None, kind: str = "ce",
) -> Tensor:
    """MiniLMv2 / MiniViT self-attention relation distillation over all 9 (Q, K, V) pairs.

    For each pair (a, b), R_ab = softmax(X_a X_b^T / sqrt(C / A_r)) per relation head, with
    X the raw projection output (B, N, C) split into A_r heads; the loss is the row-mean
    cross-entropy CE(R^T_ab, R^S_ab) (MiniViT's Swin code; "kl" subtracts the teacher's
    entropy), averaged over the 9 pairs. Works across widths: relations are N x N.

    Args:
        qkv_s: student (Q, K, V), each (B, N, Cs).
        qkv_t: teacher (Q, K, V), each (B, N, Ct).
        relation_heads: A_r (MiniViT's `--ar`, default 1: the whole width as one head).
        mask: (B, N) bool, True on real tokens (keys and counted rows).
        kind: "ce" or "kl".
    """
    from kernels.attention_kl import attention_kl

    check_choice("attention loss", kind, ATTENTION_KINDS)
    xs = [_relation_heads(x, relation_heads) for x in qkv_s]
    xt = [_relation_heads(x.detach(), relation_heads) for x in qkv_t]
    values = [attention_kl(xs[a], xs[b], xt[a], xt[b], key_mask=mask, query_mask=mask, kind=kind)
              for a, b in itertools.product(range(3), repeat=2)]
    return sum(values) / len(values)


class AttentionKLTerm(TappedTerm):
    """Attention-map KL at tapped attention modules (site "qk"), layer pair by layer pair.

    Args:
        student, teacher: attention-module templates, e.g. "model.language_model.layers.{i}.self_attn".
        layers: layer mapping (see `workbench.taps.layer_pairs`).
        heads: teacher head per student head when counts differ ("uniform" or a list).
        mask: rows that count (answer | image | all | answer+image; "none" = every row); on
            the token sequence, padding keys are masked too.
        kind: "kl" (default) or "ce".
    """

    site = "qk"

    def __init__(self, student: str | None = None, teacher: str | None = None, layers=None, heads=None,
                 mask: str = "all", kind: str = "kl") -> None:
        super().__init__(student, teacher, layers, projector="none")
        check_choice("mask", mask, FEATURE_MASKS)
        check_choice("attention loss", kind, ATTENTION_KINDS)
        self.heads, self.mask, self.kind = heads, mask, kind

    def compare(self, index: int, student, teacher, inputs: LossInputs) -> Tensor:
        key_mask = query_mask = None
        if inputs.attention_mask is not None and student.query.shape[2] == inputs.attention_mask.shape[1]:
            key_mask = inputs.attention_mask.bool()
            query_mask = inputs.position_mask(self.mask) if self.mask != "none" else None
        return attention_map_kl(student.query, student.key, teacher.query, teacher.key,
                                scale_s=student.scaling, scale_t=teacher.scaling,
                                causal=student.causal, key_mask=key_mask, query_mask=query_mask,
                                head_map=self.heads, kind=self.kind)


class QKVRelationTerm(TappedTerm):
    """MiniViT / MiniLMv2 Q/K/V relation distillation at tapped layers.

    Args:
        student, teacher: either a template with "{p}" for the three projections, e.g.
            "model.language_model.layers.{i}.self_attn.{p}_proj", or a fused qkv Linear whose
            output is split in three along the width, e.g. timm's "blocks.{i}.attn.qkv" (or a
            Swin's "layers.*.blocks.{i}.attn.qkv", per window). Off the token sequence, a
            teacher's extra leading (class) tokens are dropped (`align_tokens`).
        layers: layer mapping.
        relation_heads: A_r.
        mask: rows and keys that count on the token sequence; "none" = all.
        kind: "ce" (MiniViT, default) or "kl".
    """

    def __init__(self, student: str | None = None, teacher: str | None = None, layers=None, relation_heads: int = 1,
                 mask: str = "none", kind: str = "ce") -> None:
        super().__init__(student, teacher, layers, projector="none")
        check_choice("mask", mask, FEATURE_MASKS)
        check_choice("attention loss", kind, ATTENTION_KINDS)
        if relation_heads < 1:
            raise ValueError(f"relation_heads must be >= 1, got {relation_heads}")
        self.relation_heads, self.mask, self.kind = relation_heads, mask, kind

    def expand(self, tap: str) -> list[str]:
        return [tap.replace(QKV, p) for p in "qkv"] if QKV in tap else [tap]

    def _qkv(self, tap: str, features: dict) -> tuple[Tensor, Tensor, Tensor]:
        if QKV in tap:
            return tuple(features[t] for t in self.expand(tap))
        fused = features[tap]  # (B, N, 3C)
        if fused.shape[-1] % 3:
            raise ValueError(f"tap {tap} gives width {fused.shape[-1]}, not a fused q/k/v projection")
        return tuple(fused.chunk(3, dim=-1))

    def forward(self, inputs: LossInputs) -> Tensor:
        if not self.pairs:
            raise ValueError("QKVRelationTerm is not bound to taps; build it with workbench.build")
        values = []
        for s, t in self.pairs:
            qkv_s, qkv_t = self._qkv(s, inputs.student_features), self._qkv(t, inputs.teacher_features)
            if not inputs.on_sequence(qkv_s[0]):
                aligned = [align_tokens(a, b) for a, b in zip(qkv_s, qkv_t)]
                qkv_s, qkv_t = tuple(a for a, _ in aligned), tuple(b for _, b in aligned)
            mask = None
            if self.mask != "none" and inputs.on_sequence(qkv_s[0]):
                mask = inputs.position_mask(self.mask)
            values.append(qkv_relation(qkv_s, qkv_t, relation_heads=self.relation_heads, mask=mask, kind=self.kind))
        return sum(values) / len(values)
