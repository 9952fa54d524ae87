"""Fused LM head + logit distillation: the loss from hidden states without (N, V) student logits.

`fused_linear_kd` dispatches to the Triton path (`triton.py`) or the chunked torch path
(`ref.py`) by `kernels.backend()`; `ref.fused_linear_kd_naive` is the full-logits oracle.
"""

from __future__ import annotations

from torch import Tensor

import kernels
from kernels.fused_linear_kd.ref import fused_linear_kd_naive, fused_linear_kd_ref

__all__ = ["fused_linear_kd", "fused_linear_kd_naive", "fused_linear_kd_ref"]


def fused_linear_kd(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    topk_ids: Tensor | None = None,
    topk_logp: Tensor | None = None,
    rest_logp: Tensor | None = None,
    bias: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Logit divergence between the student (hidden @ weight.T + bias) and a teacher, in row chunks.

    Equals `losses.logit.<kind>(hidden @ weight.T + bias, teacher_logits, mask=labels !=
    ignore_index, temperature[, beta])` for a dense teacher and the mean over kept rows of
    `losses.logit.sparse_divergence` for a top-k teacher, without holding the (N, V) student
    logits: each chunk's loss and gradients are computed in the forward pass (matmul in the
    inputs' dtype, divergence in float32 or wider) and backward only scales them.

    Args:
        hidden: (N, H) student hidden states, one row per token position.
        weight: (V, H) student LM-head weight.
        teacher_logits: (N, V) dense teacher logits (detached). Exclusive with the top-k.
        topk_ids: (N, K) teacher top-k token ids, distinct within each kept row.
        topk_logp: (N, K) teacher log-probabilities at those ids, computed at `temperature`.
        rest_logp: (N,) log of the teacher's mass outside the top-k; -inf = none; None derives
            it from `topk_logp`.
        bias: (V,) LM-head bias.
        labels: (N,) rows with label == ignore_index are skipped (their top-k is not read).
        ignore_index: the label of skipped rows.
        kind: "forward_kl", "reverse_kl", "jsd" or "tvd".
        temperature: tau > 0; both distributions are softened by tau, the loss is times tau**2.
        beta: JSD mixture weight of the teacher (0 -> forward KL, 1 -> reverse KL).
        reduction: "mean" over kept rows or "sum".
        chunk_size: rows per chunk; default about 256 MiB of float32 logits (at least 1 row).
    Returns:
        Scalar loss (float32, or float64 for float64 inputs); exactly 0, still attached to
        the graph, when no row is kept. Gradients reach hidden, weight and bias.
    Raises:
        ValueError: on a missing or doubled teacher, a shape mismatch or a bad option.
        RuntimeError: WB_KERNELS=triton with CPU tensors and no TRITON_INTERPRET=1.
    """
    kwargs = dict(
        topk_ids=topk_ids, topk_logp=topk_logp, rest_logp=rest_logp, bias=bias, labels=labels,
        ignore_index=ignore_index, kind=kind, temperature=temperature, beta=beta, reduction=reduction,
        chunk_size=chunk_size,
    )
    if kernels.use_triton("fused_linear_kd", hidden):
        from kernels.fused_linear_kd.triton import fused_linear_kd_triton

        return fused_linear_kd_triton(hidden, weight, teacher_logits, **kwargs)
    return fused_linear_kd_ref(hidden, weight, teacher_logits, **kwargs)
