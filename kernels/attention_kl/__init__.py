"""`attention_kl`: KL or cross-entropy between teacher and student attention distributions.

Serves attention-map distillation and MiniLMv2/MiniViT Q/K/V relation distillation (any two of
a layer's Q, K, V split into relation heads) without materialising the (B, H, N, M) scores.
Dispatch: `kernels.backend()` == "triton" -> `triton.py`, else the torch path in `ref.py`.
"""

from __future__ import annotations

from torch import Tensor

import kernels

from .ref import attention_kl_naive, attention_kl_ref

__all__ = ["attention_kl", "attention_kl_naive", "attention_kl_ref"]


def attention_kl(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, *,
    scale_s: float | None = None, scale_t: float | None = None, causal: bool = False,
    key_mask: Tensor | None = None, query_mask: Tensor | None = None, kind: str = "kl",
) -> Tensor:
    """Mean per-row KL (or CE) from teacher to student attention, computed flash-style.

    p_t = softmax(scale_t * q_t k_t^T) and p_s = softmax(scale_s * q_s k_s^T) per query row over
    visible keys; q and k need not come from the same projection, and Ds may differ from Dt.
    The gradient wrt the student scores is (p_s - p_t) / n_rows for both kinds.

    Args:
        q_s: (B, H, N, Ds) student queries; gradients flow here.
        k_s: (B, H, M, Ds) student keys; gradients flow here.
        q_t: (B, H, N, Dt) teacher queries (detached inside).
        k_t: (B, H, M, Dt) teacher keys (detached inside).
        scale_s: student score scale, default Ds ** -0.5.
        scale_t: teacher score scale, default Dt ** -0.5.
        causal: query i sees keys j <= i (requires N == M).
        key_mask: (B, M) bool, False = padding key, never attended by either distribution.
        query_mask: (B, N) bool, False = row not counted in the mean.
        kind: "kl" for sum_j p_t log(p_t / p_s), "ce" for -sum_j p_t log p_s (MiniViT).

    Returns:
        Scalar (float32, or float64 for float64 inputs): the mean over counted rows (b, h, i).
        Rows with no visible key are not counted; with no counted row it is an exact 0 that
        still backpropagates (zero gradients).

    Raises:
        ValueError: shapes, dtypes, masks or `kind` disagree (the message names the tensor).
        RuntimeError: WB_KERNELS=triton with CPU tensors and TRITON_INTERPRET unset.
    """
    options = dict(scale_s=scale_s, scale_t=scale_t, causal=causal, key_mask=key_mask, query_mask=query_mask, kind=kind)
    if kernels.use_triton("attention_kl", q_s):
        from .triton import attention_kl_triton

        return attention_kl_triton(q_s, k_s, q_t, k_t, **options)
    return attention_kl_ref(q_s, k_s, q_t, k_t, **options)
