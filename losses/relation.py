"""Relation distillation: match how samples or tokens relate to each other, not the features.

LLaVA-KD's RDist (per image, the Gram matrix of the visual tokens' outputs, 1 - cosine between
the flattened student and teacher matrices), MiniViT's hidden-state Gram relation (rows
L2-normalised, mean squared difference), and RKD's distance and angle losses (Park et al.,
2019) over pooled sample embeddings. Relations are N x N, so student and teacher widths may
differ. Gram losses go through `kernels.relation_loss`, which never builds the N x N matrices.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.inputs import FEATURE_MASKS, LossInputs, check_choice
from losses.term import LossTerm, TappedTerm, align_tokens

_PDIST_EPS = 1e-12


def gram_relation(x_s: Tensor, x_t: Tensor, kind: str = "cosine", mask: Tensor | None = None) -> Tensor:
    """Compare the Gram matrices x x^T of student and teacher, item by item (tiled kernel).

    Args:
        x_s: (B, N, Ds) student features, one relation per item b.
        x_t: (B, N, Dt) teacher features.
        kind: "cosine": mean_b [1 - cos(vec G_s, vec G_t)]; "mse": mean_b mean_ij (G_s - G_t)^2.
        mask: (B, N) bool, False drops a token's row and column.
    Returns:
        Scalar.
    """
    from kernels.relation_loss import relation_loss

    return relation_loss(x_s, x_t.detach(), kind=kind, mask=mask)


def rdist(x_s: Tensor, x_t: Tensor, mask: Tensor | None = None) -> Tensor:
    """LLaVA-KD RDist: 1 - cos(vec(V_s V_s^T), vec(V_t V_t^T)) per image, averaged over images.

    Invariant to a uniform scale of either side's features (G scales by c^2).

    Args:
        x_s: (B, N, Ds) each image's visual-token outputs (student).
        x_t: (B, N, Dt) the same for the teacher.
        mask: (B, N) bool, True on real tokens (images of different token counts are padded).
    """
    return gram_relation(x_s, x_t, "cosine", mask)


def hidden_relation(h_s: Tensor, h_t: Tensor, mask: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """MiniViT hidden-state relation: G = H~ H~^T of L2-normalised rows, scale * mean (G_s - G_t)^2.

    MiniViT's Swin code (`--hidden_relation`) multiplies by the window size, 49.

    Args:
        h_s: (B, N, Ds) student hidden states, one relation per item.
        h_t: (B, N, Dt) teacher hidden states.
        mask: (B, N) bool, True on tokens that count.
        scale: factor on the mean squared difference.
    """
    return scale * gram_relation(F.normalize(h_s.float(), dim=-1), F.normalize(h_t.float(), dim=-1), "mse", mask)


def _pairwise_distances(e: Tensor) -> Tensor:
    """(N, D) -> (N, N) Euclidean distances, exactly 0 on the diagonal, with a finite gradient there."""
    sq = e.pow(2).sum(-1)  # (N,)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=_PDIST_EPS)  # (N, N)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def rkd_distance(e_s: Tensor, e_t: Tensor) -> Tensor:
    """RKD distance loss: pairwise distances, each normalised by its mean off-diagonal distance,
    compared with the Huber (smooth L1) loss over all N x N pairs.

    Args:
        e_s: (N, Ds) student embeddings of N samples.
        e_t: (N, Dt) teacher embeddings of the same samples.
    Returns:
        Scalar; invariant to a uniform scale of either side.
    """
    if e_s.shape[0] != e_t.shape[0] or e_s.shape[0] < 2:
        raise ValueError(f"rkd needs the same N >= 2 samples on both sides, got {tuple(e_s.shape)} and {tuple(e_t.shape)}")
    n = e_s.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=e_s.device)
    with torch.no_grad():
        d_t = _pairwise_distances(e_t.float())
        d_t = d_t / d_t[off].mean()
    d_s = _pairwise_distances(e_s.float())
    d_s = d_s / d_s[off].mean()
    return F.smooth_l1_loss(d_s, d_t)


def _angles(e: Tensor) -> Tensor:
    """(N, D) -> (N, N, N): cos of the angle at j between i and k, <unit(e_i - e_j), unit(e_k - e_j)>."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=-1)  # (N, N, D): [j, i] = e_i - e_j
    return diff @ diff.transpose(1, 2)  # (N, N, N)


def rkd_angle(e_s: Tensor, e_t: Tensor) -> Tensor:
    """RKD angle loss: Huber loss between the cosines of all triplet angles (O(N^3) memory).

    Args:
        e_s: (N, Ds) student embeddings of N samples.
        e_t: (N, Dt) teacher embeddings of the same samples.
    Returns:
        Scalar; invariant to scale and translation of either side.
    """
    if e_s.shape[0] != e_t.shape[0] or e_s.shape[0] < 3:
        raise ValueError(f"rkd angle needs the same N >= 3 samples on both sides, got {tuple(e_s.shape)} and {tuple(e_t.shape)}")
    with torch.no_grad():
        a_t = _angles(e_t.float())
    return F.smooth_l1_loss(_angles(e_s.float()), a_t)


def image_groups(rows: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Split rows taken at image-token positions into images: one run of consecutive positions each.

    Args:
        rows: (M, D) features at the True positions of `positions`, in row-major order.
        positions: (B, L) bool, True at image tokens; M = positions.sum().
    Returns:
        (G, n, D) features per image, zero-padded to the longest run n, and (G, n) bool
        marking real tokens; G = number of images.
    """
    where = positions.nonzero()  # (M, 2) rows of (b, t)
    if where.shape[0] != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows for {where.shape[0]} image positions")
    if where.shape[0] == 0:
        return rows.new_zeros(0, 0, rows.shape[-1]), torch.zeros(0, 0, dtype=torch.bool, device=rows.device)
    starts = torch.ones(where.shape[0], dtype=torch.bool, device=rows.device)
    starts[1:] = (where[1:, 0] != where[:-1, 0]) | (where[1:, 1] != where[:-1, 1] + 1)
    group = starts.cumsum(0) - 1  # (M,)
    first = torch.nonzero(starts).squeeze(-1)  # (G,)
    offset = torch.arange(where.shape[0], device=rows.device) - first[group]  # (M,)
    n_groups, longest = int(first.shape[0]), int(offset.max()) + 1
    out = rows.new_zeros(n_groups, longest, rows.shape[-1])
    out[group, offset] = rows
    mask = torch.zeros(n_groups, longest, dtype=torch.bool, device=rows.device)
    mask[group, offset] = True
    return out, mask


class RDistTerm(LossTerm):
    """LLaVA-KD RDist on the LM-head outputs at image-token positions, per image.

    This is the unofficial re-implementation's choice (docs/methods.md §8): V = the image
    positions' logits (N_v x |V|), R = V V^T. `RDistTapTerm` takes the relation over a tapped
    module instead. In fused mode only the image rows' student logits are computed.
    """

    needs_teacher = True
    needs_dense_teacher = True  # image positions are not in a top-k cache

    def teacher_positions(self, inputs: LossInputs) -> Tensor:
        return inputs.image_mask.bool()

    def forward(self, inputs: LossInputs) -> Tensor:
        if inputs.teacher_logits is None:
            raise ValueError("rdist on logits needs dense teacher logits (a top-k cache has no image-position logits)")
        positions = inputs.image_mask.bool()  # (B, L)
        x_s, mask = image_groups(inputs.student_logits_at(positions), positions)  # (G, n, V)
        x_t, _ = image_groups(inputs.teacher_logits_at(positions), positions)  # (G, n, V)
        return rdist(x_s, x_t, mask)


class RDistTapTerm(TappedTerm):
    """RDist over a tapped module's outputs, e.g. "model.multi_modal_projector" (the projected
    image features, whose self-similarity the official LLaVA-KD model code returns).

    A tap over the token sequence is split into images at image-token positions; any other
    (B, N, D) tap is one image per sample. No projector: relations are N x N.
    """

    def __init__(self, student: str | None = None, teacher: str | None = None, layers=None) -> None:
        super().__init__(student, teacher, layers, projector="none")

    def compare(self, index: int, student: Tensor, teacher: Tensor, inputs: LossInputs) -> Tensor:
        if inputs.on_sequence(student):
            positions = inputs.image_mask.bool()  # (B, L)
            x_s, mask = image_groups(student[positions], positions)
            x_t, _ = image_groups(teacher[positions], positions)
            return rdist(x_s, x_t, mask)
        return rdist(student, teacher)


def rdist_term(student: str = "logits", teacher: str | None = None, layers: Any = None) -> LossTerm:
    """The `rdist` loss type: on the LM-head outputs at image positions (`student: logits`,
    the default) or over a tapped module (`student: <tap template>`)."""
    if student == "logits":
        if teacher is not None or layers is not None:
            raise ValueError("rdist on logits reads no taps; teacher and layers apply to a tapped student module")
        return RDistTerm()
    return RDistTapTerm(student, teacher, layers)


def _pool(x: Tensor, inputs: LossInputs, mask: str) -> Tensor:
    """(B, L, D) over the token sequence -> mean over `mask` positions; (B, N, D) -> mean over N; (B, D) as is."""
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise ValueError(f"rkd needs (B, D) or (B, N, D) features, got {tuple(x.shape)}")
    if mask != "none" and inputs.on_sequence(x):
        keep = inputs.position_mask(mask).to(x.dtype)[..., None]  # (B, L, 1)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1)
    return x.mean(1)


class RKDTerm(TappedTerm):
    """RKD distance or angle loss between the samples of a batch, on pooled tapped features.

    Args:
        kind: "distance" or "angle".
        student, teacher, layers: see `TappedTerm`.
        mask: positions averaged into each sample's embedding when the tap is over the token
            sequence (default all non-padding tokens); "none" averages every row.
    """

    def __init__(self, kind: str, student: str | None = None, teacher: str | None = None, layers=None,
                 mask: str = "all") -> None:
        super().__init__(student, teacher, layers, projector="none")
        check_choice("rkd loss", kind, ("distance", "angle"))
        check_choice("mask", mask, FEATURE_MASKS)
        self.kind = kind
        self.mask = mask

    def compare(self, index: int, student: Tensor, teacher: Tensor, inputs: LossInputs) -> Tensor:
        e_s, e_t = _pool(student, inputs, self.mask), _pool(teacher, inputs, self.mask)
        return (rkd_distance if self.kind == "distance" else rkd_angle)(e_s, e_t)


class HiddenRelationTerm(TappedTerm):
    """MiniViT's hidden-state Gram relation at tapped layers (`hidden_relation`).

    Args:
        student, teacher, layers: see `TappedTerm`; taps give (B, N, D) per layer.
        mask: rows that count when the tap is over the token sequence; "none" = every row.
        scale: factor on the mean squared difference (MiniViT Swin: 49, the window size).
    """

    def __init__(self, student: str | None = None, teacher: str | None = None, layers=None, mask: str = "none",
                 scale: float = 1.0) -> None:
        super().__init__(student, teacher, layers, projector="none")
        check_choice("mask", mask, FEATURE_MASKS)
        self.mask = mask
        self.scale = scale

    def compare(self, index: int, student: Tensor, teacher: Tensor, inputs: LossInputs) -> Tensor:
        mask = None
        if self.mask != "none" and inputs.on_sequence(student):
            mask = inputs.position_mask(self.mask)
        if student.dim() == 4:  # (B, H, W, C) maps, e.g. timm Swin blocks: all H * W tokens
            student, teacher = student.flatten(1, 2), teacher.flatten(1, 2)
        if mask is None:
            student, teacher = align_tokens(student, teacher)  # e.g. a DeiT teacher's class token
        return hidden_relation(student, teacher, mask, self.scale)
