"""Fused LM head + logit distillation with Triton for the O(V) per-row work.

The chunk loop and the matmuls are `ref.chunked_forward` (torch); per chunk, a Triton kernel
walks each row of the (n, V) float32 logits in vocabulary blocks with an online log-sum-exp,
computes the row's divergence and overwrites the logits with d loss / d logits, so the
gradient needs no second (n, V) buffer (the trick of Liger-Kernel's cross-entropy). Backward
scales the gradients stored by the forward with a small Triton kernel. Imported lazily by
`kernels/fused_linear_kd/__init__.py`; runs on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.fused_linear_kd.ref import (
    FusedLinearKDFn,
    KDOptions,
    TeacherRows,
    check_inputs,
    sparse_compact_divergence,
)
from losses.logit import TVD_TIE_RTOL

KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
# Vocabulary block per program step: large blocks mean few interpreter steps on CPU.
MAX_BLOCK_V = 4096
SCALE_BLOCK = 1024


@triton.jit
def _online_lse(row_ptr, V, inv_tau, BLOCK_V: tl.constexpr):
    """log sum_j exp(x_j / tau) over one row of V values, one pass, per-lane running maxima."""
    # Running maxima start at a finite -1e30, not -inf: exp(-inf - max) stays 0 while the max
    # is finite, so lanes that only ever see -inf (past V, excluded top-k ids) never give NaN.
    run_max = tl.full((BLOCK_V,), -1e30, tl.float32)
    run_sum = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_tau
        new_max = tl.maximum(run_max, x)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max)
        run_max = new_max
    row_max = tl.max(run_max, 0)
    return row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), 0))


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))


@triton.jit
def _tvd_sign(ps, pt, tie_rtol):
    """0.5 sign(p_s - p_t), 0 at ties (as losses.logit: rounding-level differences)."""
    tie = tl.abs(ps - pt) <= tie_rtol * tl.maximum(ps, pt)
    return tl.where(tie, 0.0, tl.where(ps > pt, 0.5, -0.5))


@triton.jit
def _fused_linear_kd_fwd_kernel(
    logits_ptr,  # (n, V) float32 student chunk logits z; overwritten with d loss / d z
    logits_stride,
    teacher_ptr,  # (n, V) teacher logits, any float dtype
    teacher_stride,
    loss_ptr,  # (n,) float32: tau**2 * D per row
    V,
    inv_tau,
    loss_scale,  # tau**2
    grad_scale,  # tau * row weight: d(tau**2 D)/dz = tau * dD/ds for s = z / tau
    beta,
    log_beta,
    log_1m_beta,
    tie_rtol,  # TVD: |p_s - p_t| <= tie_rtol * max(p_s, p_t) is a tie (sign 0)
    KIND: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD (0 < beta < 1), 3 TVD
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = logits_ptr + row * logits_stride
    t_row = teacher_ptr + row * teacher_stride
    # Pass 1: both normalisers.
    lse_s = _online_lse(s_row, V, inv_tau, BLOCK_V)
    lse_t = _online_lse(t_row, V, inv_tau, BLOCK_V)
    # Pass 2: the divergence and, for all but the forward KL, the centring sum
    # c = sum_k p_s,k a_k of the softmax chain rule dD/ds_j = p_s,j (a_j - c), a = dD/dp_s.
    acc_loss = tl.zeros((BLOCK_V,), tl.float32)
    acc_c = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        log_ps = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau - lse_s
        log_pt = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau - lse_t
        ps = tl.exp(log_ps)
        pt = tl.exp(log_pt)
        # p * where(p > 0, log-ratio, 0): 0 * log 0 = 0 without a transient NaN, as in
        # losses.logit._kl_rows (a teacher may hold -inf logits).
        if KIND == 0:
            term = pt * tl.where(pt > 0, log_pt - log_ps, 0.0)
            if WRITE_GRAD:
                tl.store(s_row + offs, grad_scale * (ps - pt), mask=mask)
        elif KIND == 1:
            term = ps * tl.where(ps > 0, log_ps - log_pt, 0.0)
            acc_c += tl.where(mask, term, 0.0)
        elif KIND == 2:
            log_m = _logaddexp(log_pt + log_beta, log_ps + log_1m_beta)
            term_s = ps * tl.where(ps > 0, log_ps - log_m, 0.0)
            term = beta * pt * tl.where(pt > 0, log_pt - log_m, 0.0) + (1.0 - beta) * term_s
            acc_c += tl.where(mask, (1.0 - beta) * term_s, 0.0)
        else:
            term = 0.5 * tl.abs(pt - ps)
            acc_c += tl.where(mask, ps * _tvd_sign(ps, pt, tie_rtol), 0.0)
        acc_loss += tl.where(mask, term, 0.0)
    tl.store(loss_ptr + row, loss_scale * tl.sum(acc_loss, 0))
    # Pass 3: gradients that need the whole row's c.
    if WRITE_GRAD and KIND != 0:
        c = tl.sum(acc_c, 0)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            log_ps = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau - lse_s
            log_pt = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau - lse_t
            ps = tl.exp(log_ps)
            if KIND == 1:
                a = log_ps - log_pt
            elif KIND == 2:
                a = (1.0 - beta) * (log_ps - _logaddexp(log_pt + log_beta, log_ps + log_1m_beta))
            else:
                a = _tvd_sign(ps, tl.exp(log_pt), tie_rtol)
            tl.store(s_row + offs, tl.where(ps > 0, grad_scale * ps * (a - c), 0.0), mask=mask)


@triton.jit
def _fused_linear_kd_rest_lse_kernel(
    logits_ptr,  # (n, V) float32 logits with -inf at the row's top-k ids
    logits_stride,
    lse_ptr,  # (n,) float32: log sum over the non-top-k ids of exp(z / tau)
    V,
    inv_tau,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tl.store(lse_ptr + row, _online_lse(logits_ptr + row * logits_stride, V, inv_tau, BLOCK_V))


@triton.jit
def _fused_linear_kd_rest_grad_kernel(
    logits_ptr,  # (n, V) float32 logits with -inf at the top-k ids; overwritten with the gradient
    logits_stride,
    lse_ptr,  # (n,) the rest log-sum-exp from `_fused_linear_kd_rest_lse_kernel`
    grad_rest_ptr,  # (n,) d loss / d lse_rest, in units of z
    V,
    inv_tau,
    BLOCK_V: tl.constexpr,
):
    # lse_rest = log sum_{j not in top-k} exp(z_j / tau): its gradient spreads over those
    # ids as a softmax; the top-k ids hold -inf and so get exactly 0 (scattered later).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    lse = tl.load(lse_ptr + row)
    grad_rest = tl.load(grad_rest_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        s = tl.load(row_ptr + offs, mask=mask, other=float("-inf")) * inv_tau
        tl.store(row_ptr + offs, grad_rest * tl.exp(s - lse), mask=mask)


@triton.jit
def _fused_linear_kd_bwd_kernel(
    grad_ptr,  # (numel,) a gradient stored by the forward for grad_output = 1
    out_ptr,  # (numel,) the same times grad_output
    grad_output_ptr,  # () the upstream gradient, read on device (no host sync)
    numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    go = tl.load(grad_output_ptr).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * go).to(out_ptr.dtype.element_ty), mask=mask)


def _block_v(vocab: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab))


def _num_warps(block_v: int) -> int:
    # more warps for wide blocks keeps the per-thread register count of the row vectors low
    # (an untuned guess: the kernel has only run under the CPU interpreter so far)
    return min(16, max(4, block_v // 256))


def _dense_chunk(
    logits: Tensor, teacher: Tensor, options: KDOptions, row_weight: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Launch the dense kernel on a chunk: (sum of row losses, d(row_weight * sum)/d logits)."""
    logits = logits.float().contiguous()  # (n, V) the kernel overwrites it with the gradient
    teacher = teacher.contiguous()  # (n, V)
    n, vocab = logits.shape
    tau, beta = options.temperature, options.beta
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)  # (n,)
    block_v = _block_v(vocab)
    log_beta = math.log(beta) if 0.0 < beta < 1.0 else 0.0  # only used by the JSD (0 < beta < 1)
    log_1m_beta = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    _fused_linear_kd_fwd_kernel[(n,)](
        logits, logits.stride(0), teacher, teacher.stride(0), losses, vocab,
        1.0 / tau, tau**2, tau * row_weight, beta, log_beta, log_1m_beta, TVD_TIE_RTOL,
        KIND=KIND_IDS[options.kind], WRITE_GRAD=need_grad, BLOCK_V=block_v, num_warps=_num_warps(block_v),
    )
    return losses.sum(), logits if need_grad else None


def _sparse_chunk(
    logits: Tensor, teacher: TeacherRows, options: KDOptions, row_weight: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """The top-k teacher on a chunk: Triton for the O(V) rest bucket, torch for the K + 1 outcomes.

    As `ref.sparse_chunk_divergence`, with the rest log-sum-exp and the spreading of its
    gradient over the non-top-k ids done by the kernels.
    """
    logits = logits.float().contiguous()  # (n, V) becomes the gradient in place
    n, vocab = logits.shape
    tau = options.temperature
    ids = teacher.topk_ids.long()  # (n, K)
    k = ids.shape[1]
    s_k = logits.gather(1, ids) / tau  # (n, K)
    block_v = _block_v(vocab)
    lse_rest = None
    if k < vocab:
        logits.scatter_(1, ids, float("-inf"))  # exclude the top-k from the rest bucket
        lse_rest = torch.empty(n, dtype=torch.float32, device=logits.device)  # (n,)
        _fused_linear_kd_rest_lse_kernel[(n,)](
            logits, logits.stride(0), lse_rest, vocab, 1.0 / tau, BLOCK_V=block_v, num_warps=_num_warps(block_v)
        )
    total, grad_k, grad_rest = sparse_compact_divergence(s_k, lse_rest, teacher, options, row_weight, need_grad)
    if not need_grad:
        return total, None
    if lse_rest is not None:
        grad_rest = (grad_rest / tau).float().contiguous()  # (n,) wrt z, not z / tau
        _fused_linear_kd_rest_grad_kernel[(n,)](
            logits, logits.stride(0), lse_rest, grad_rest, vocab, 1.0 / tau, BLOCK_V=block_v,
            num_warps=_num_warps(block_v),
        )
    return total, logits.scatter_(1, ids, (grad_k / tau).to(logits.dtype))


def triton_chunk_divergence(
    logits: Tensor, teacher: TeacherRows, options: KDOptions, row_weight: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-chunk divergence for `ref.chunked_forward`, with Triton kernels (see `ref.ChunkDivergence`)."""
    if teacher.sparse:
        return _sparse_chunk(logits, teacher, options, row_weight, need_grad)
    return _dense_chunk(logits, teacher.logits, options, row_weight, need_grad)


def fused_linear_kd_bwd(grad_output: Tensor, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """The stored gradients times grad_output, each a new tensor in its own dtype."""
    go = grad_output.detach().reshape(()).contiguous()
    scaled = []
    for grad in grads:
        if grad is None:
            scaled.append(None)
            continue
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        numel = grad.numel()
        if numel:
            _fused_linear_kd_bwd_kernel[(triton.cdiv(numel, SCALE_BLOCK),)](grad, out, go, numel, BLOCK=SCALE_BLOCK)
        scaled.append(out)
    return tuple(scaled)


def fused_linear_kd_triton(
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
    """Triton path of `kernels.fused_linear_kd.fused_linear_kd` (same arguments and result).

    The per-row divergence runs in float32 whatever the input dtype (float64 inputs get
    float32 accuracy here; the torch path keeps float64).

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).
    """
    options = check_inputs(
        hidden, weight, teacher_logits, topk_ids, topk_logp, rest_logp, bias, labels,
        kind, temperature, beta, reduction, chunk_size,
    )
    return FusedLinearKDFn.apply(
        hidden, weight, bias, teacher_logits, topk_ids, topk_logp, rest_logp, labels,
        ignore_index, options, torch.is_grad_enabled(), triton_chunk_divergence, fused_linear_kd_bwd,
    )
