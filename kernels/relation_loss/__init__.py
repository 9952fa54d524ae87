"""Gram-relation distillation loss (LLaVA-KD RDist, MiniViT hidden-state relations), tiled.

`relation_loss` dispatches to the Triton kernels (`triton.py`) on CUDA or when forced with
WB_KERNELS=triton, and to the tiled torch path (`ref.py`) otherwise; the choice is logged once.
Neither path materialises the N x N Gram matrices.
"""

from __future__ import annotations

from torch import Tensor

import kernels
from kernels.relation_loss.ref import relation_loss_naive, relation_loss_ref

__all__ = ["relation_loss", "relation_loss_naive", "relation_loss_ref"]


def relation_loss(x_s: Tensor, x_t: Tensor, *, kind: str = "cosine", mask: Tensor | None = None) -> Tensor:
    """Distance between student and teacher Gram relations, mean over items.

    For each item b, G = X X^T over its valid tokens (no normalisation inside; MiniViT-style
    callers L2-normalise rows first). "cosine" is LLaVA-KD's RDist, 1 - <G_s, G_t>_F /
    max(||G_s||_F ||G_t||_F, 1e-12); "mse" is sum_ij (G_s - G_t)_ij^2 / n_b^2 with n_b the
    item's valid tokens. Items without a valid token are left out of the mean (all left out:
    exactly 0, still attached to the graph). Memory is O(B N D + tiles), never N x N.

    Args:
        x_s: (B, N, Ds) student features; gradients flow here. B = images (or images x heads).
        x_t: (B, N, Dt) teacher features (detached inside); Dt may differ from Ds.
        kind: "cosine" or "mse".
        mask: (B, N) bool, False = token excluded (its row and column of G are dropped).

    Returns:
        () the loss, in float32 (float64 if an input is float64).

    Raises:
        ValueError: shapes, dtypes or devices that do not fit, naming the tensors.
    """
    if kernels.use_triton("relation_loss", x_s):
        from kernels.relation_loss.triton import relation_loss_triton

        return relation_loss_triton(x_s, x_t, kind=kind, mask=mask)
    return relation_loss_ref(x_s, x_t, kind=kind, mask=mask)
