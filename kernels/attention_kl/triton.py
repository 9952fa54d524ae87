"""Triton path of `attention_kl`: flash-style forward and backward that never hold (N, M) tensors.

Forward (`_attention_kl_fwd_kernel`, one program per query block and (b, h)): pass 1 runs an
online max / log-sum-exp over key blocks for student and teacher; pass 2 revisits the key blocks
and sums the per-row KL or CE with the final lse's. Backward recomputes the scores tile by tile
from the saved lse's (flash-attention-2 style): `_attention_kl_bwd_kernel` accumulates dq_s per
query block, `_attention_kl_bwd_dk_kernel` accumulates dk_s per key block (no atomics). Imported
lazily by `kernels.attention_kl` only; the torch oracle and CPU path live in `ref.py`.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ref import AttentionKLFn, _default_scales, attention_kl_ref, check_inputs

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


@triton.jit
def _load_rows(base_ptr, offs_rows, stride_row, n_rows, BLOCK_D: tl.constexpr, D, AS_FP32: tl.constexpr):
    """(len(offs_rows), BLOCK_D) tile of a (rows, D) matrix with unit column stride; 0 outside."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base_ptr + offs_rows[:, None] * stride_row + offs_d[None, :]
    tile = tl.load(ptrs, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    if AS_FP32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _visible_tile(offs_n, offs_m, M, key_mask_row_ptr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """(BLOCK_N, BLOCK_M) bool: key offs_m exists, is not padding and, if causal, is <= the query."""
    visible = (offs_m[None, :] < M) & (offs_n[:, None] >= 0)
    if CAUSAL:
        visible = visible & (offs_m[None, :] <= offs_n[:, None])
    if HAS_KEY_MASK:
        keys = tl.load(key_mask_row_ptr + offs_m, mask=offs_m < M, other=0)
        visible = visible & (keys[None, :] != 0)
    return visible


@triton.jit
def _scores_tile(q, k, scale, visible, PRECISION: tl.constexpr):
    """scale * q k^T in float32, hidden keys at -1e30: (BLOCK_N, D) x (BLOCK_M, D) -> (BLOCK_N, BLOCK_M).

    A finite stand-in for -inf: exp() still gives exactly 0 and differences of two hidden
    log-probabilities stay finite, so no NaN is ever formed, not even in an unselected branch.
    """
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    return tl.where(visible, scores, -1.0e30)


@triton.jit
def _online_lse_step(scores, m, l):
    """Fold one tile into the running row max m and sum l of exp(score - m)."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    l = l * tl.exp(m - m_new) + tl.sum(tl.exp(scores - m_new[:, None]), 1)
    return m_new, l


@triton.jit
def _grad_scores_tile(s_s, s_t, lse_s, lse_t, row_keep):
    """(p_s - p_t) on counted rows, 0 elsewhere: the row value's gradient wrt the student scores.

    The upstream gradient, 1 / n_rows and scale_s are applied once to the accumulated dq/dk:
    folded in here they would push a 16-bit tile into fp16's subnormal range.
    """
    p_s = tl.exp(s_s - lse_s[:, None])
    p_t = tl.exp(s_t - lse_t[:, None])
    return (p_s - p_t) * row_keep[:, None]


@triton.jit
def _attention_kl_fwd_kernel(
    q_s_ptr, k_s_ptr, q_t_ptr, k_t_ptr, key_mask_ptr, row_value_ptr, lse_s_ptr, lse_t_ptr,
    sqs_b, sqs_h, sqs_n, sks_b, sks_h, sks_m, sqt_b, sqt_h, sqt_n, skt_b, skt_h, skt_m, skm_b,
    H, N, M, Ds, Dt, scale_s, scale_t,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, KIND_KL: tl.constexpr,
    PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr, AS_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    q_s = _load_rows(q_s_ptr + b * sqs_b + h * sqs_h, offs_n, sqs_n, N, BLOCK_DS, Ds, AS_FP32)  # (BLOCK_N, BLOCK_DS)
    q_t = _load_rows(q_t_ptr + b * sqt_b + h * sqt_h, offs_n, sqt_n, N, BLOCK_DT, Dt, AS_FP32)  # (BLOCK_N, BLOCK_DT)
    k_s_base = k_s_ptr + b * sks_b + h * sks_h
    k_t_base = k_t_ptr + b * skt_b + h * skt_h
    key_mask_row = key_mask_ptr + b * skm_b
    hi = M
    if CAUSAL:  # rows of this block see no key past its last row
        hi = tl.minimum(M, (pid_n + 1) * BLOCK_N)

    # Pass 1: row log-sum-exps of both score matrices.
    m_s = tl.full([BLOCK_N], -1.0e30, tl.float32)
    m_t = tl.full([BLOCK_N], -1.0e30, tl.float32)
    l_s = tl.zeros([BLOCK_N], tl.float32)
    l_t = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        visible = _visible_tile(offs_n, offs_m, M, key_mask_row, CAUSAL, HAS_KEY_MASK)
        k_s = _load_rows(k_s_base, offs_m, sks_m, M, BLOCK_DS, Ds, AS_FP32)  # (BLOCK_M, BLOCK_DS)
        k_t = _load_rows(k_t_base, offs_m, skt_m, M, BLOCK_DT, Dt, AS_FP32)  # (BLOCK_M, BLOCK_DT)
        m_s, l_s = _online_lse_step(_scores_tile(q_s, k_s, scale_s, visible, PRECISION_S), m_s, l_s)
        m_t, l_t = _online_lse_step(_scores_tile(q_t, k_t, scale_t, visible, PRECISION_T), m_t, l_t)
    # l >= 1 after the first tile. A row with no visible key gets a meaningless but finite lse
    # (near -1e30); it is not counted, and its zero row weight zeroes it in backward.
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)

    # Pass 2: sum p_t * (log p_t - log p_s) (or -p_t * log p_s) with the final lse's, so each
    # term is formed directly and KL near 0 does not come from cancelling large numbers.
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        visible = _visible_tile(offs_n, offs_m, M, key_mask_row, CAUSAL, HAS_KEY_MASK)
        k_s = _load_rows(k_s_base, offs_m, sks_m, M, BLOCK_DS, Ds, AS_FP32)
        k_t = _load_rows(k_t_base, offs_m, skt_m, M, BLOCK_DT, Dt, AS_FP32)
        logp_s = _scores_tile(q_s, k_s, scale_s, visible, PRECISION_S) - lse_s[:, None]  # (BLOCK_N, BLOCK_M)
        logp_t = _scores_tile(q_t, k_t, scale_t, visible, PRECISION_T) - lse_t[:, None]  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp(logp_t)
        if KIND_KL:
            terms = p_t * (logp_t - logp_s)
        else:
            terms = -p_t * logp_s
        acc += tl.sum(tl.where(p_t > 0, terms, 0.0), 1)  # 0 log 0 = 0, hidden keys included

    out = pid_bh * N + offs_n
    tl.store(row_value_ptr + out, acc, mask=offs_n < N)
    tl.store(lse_s_ptr + out, lse_s, mask=offs_n < N)
    tl.store(lse_t_ptr + out, lse_t, mask=offs_n < N)


@triton.jit
def _attention_kl_bwd_kernel(
    q_s_ptr, k_s_ptr, q_t_ptr, k_t_ptr, key_mask_ptr, lse_s_ptr, lse_t_ptr, row_keep_ptr, grad_scale_ptr, dq_s_ptr,
    sqs_b, sqs_h, sqs_n, sks_b, sks_h, sks_m, sqt_b, sqt_h, sqt_n, skt_b, skt_h, skt_m, skm_b,
    H, N, M, Ds, Dt, scale_s, scale_t,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr, AS_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """dq_s for one query block: grad_scale * sum over key blocks of G k_s, G = (p_s - p_t) * row_keep."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    q_s = _load_rows(q_s_ptr + b * sqs_b + h * sqs_h, offs_n, sqs_n, N, BLOCK_DS, Ds, AS_FP32)  # (BLOCK_N, BLOCK_DS)
    q_t = _load_rows(q_t_ptr + b * sqt_b + h * sqt_h, offs_n, sqt_n, N, BLOCK_DT, Dt, AS_FP32)  # (BLOCK_N, BLOCK_DT)
    lse_s = tl.load(lse_s_ptr + pid_bh * N + offs_n, mask=offs_n < N, other=0.0)
    lse_t = tl.load(lse_t_ptr + pid_bh * N + offs_n, mask=offs_n < N, other=0.0)
    row_keep = tl.load(row_keep_ptr + b * N + offs_n, mask=offs_n < N, other=0.0)
    k_s_base = k_s_ptr + b * sks_b + h * sks_h
    k_t_base = k_t_ptr + b * skt_b + h * skt_h
    key_mask_row = key_mask_ptr + b * skm_b
    hi = M
    if CAUSAL:
        hi = tl.minimum(M, (pid_n + 1) * BLOCK_N)

    dq = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    for start_m in range(0, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        visible = _visible_tile(offs_n, offs_m, M, key_mask_row, CAUSAL, HAS_KEY_MASK)
        k_s = _load_rows(k_s_base, offs_m, sks_m, M, BLOCK_DS, Ds, AS_FP32)  # (BLOCK_M, BLOCK_DS)
        k_t = _load_rows(k_t_base, offs_m, skt_m, M, BLOCK_DT, Dt, AS_FP32)  # (BLOCK_M, BLOCK_DT)
        s_s = _scores_tile(q_s, k_s, scale_s, visible, PRECISION_S)
        s_t = _scores_tile(q_t, k_t, scale_t, visible, PRECISION_T)
        grad = _grad_scores_tile(s_s, s_t, lse_s, lse_t, row_keep)  # (BLOCK_N, BLOCK_M)
        dq += tl.dot(grad.to(k_s.dtype), k_s, input_precision=PRECISION_S)

    dq *= tl.load(grad_scale_ptr)
    offs_d = tl.arange(0, BLOCK_DS)
    ptrs = dq_s_ptr + (pid_bh * N + offs_n)[:, None] * Ds + offs_d[None, :]
    tl.store(ptrs, dq, mask=(offs_n[:, None] < N) & (offs_d[None, :] < Ds))


@triton.jit
def _attention_kl_bwd_dk_kernel(
    q_s_ptr, k_s_ptr, q_t_ptr, k_t_ptr, key_mask_ptr, lse_s_ptr, lse_t_ptr, row_keep_ptr, grad_scale_ptr, dk_s_ptr,
    sqs_b, sqs_h, sqs_n, sks_b, sks_h, sks_m, sqt_b, sqt_h, sqt_n, skt_b, skt_h, skt_m, skm_b,
    H, N, M, Ds, Dt, scale_s, scale_t,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr, AS_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """dk_s for one key block: sum over query blocks of G^T q_s (one writer per block, no atomics)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_s = _load_rows(k_s_ptr + b * sks_b + h * sks_h, offs_m, sks_m, M, BLOCK_DS, Ds, AS_FP32)  # (BLOCK_M, BLOCK_DS)
    k_t = _load_rows(k_t_ptr + b * skt_b + h * skt_h, offs_m, skt_m, M, BLOCK_DT, Dt, AS_FP32)  # (BLOCK_M, BLOCK_DT)
    q_s_base = q_s_ptr + b * sqs_b + h * sqs_h
    q_t_base = q_t_ptr + b * sqt_b + h * sqt_h
    key_mask_row = key_mask_ptr + b * skm_b
    lo = 0
    if CAUSAL:  # keys of this block are seen only by queries at or after its first key
        lo = pid_m * BLOCK_M

    dk = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start_n in range(lo, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visible = _visible_tile(offs_n, offs_m, M, key_mask_row, CAUSAL, HAS_KEY_MASK)
        q_s = _load_rows(q_s_base, offs_n, sqs_n, N, BLOCK_DS, Ds, AS_FP32)  # (BLOCK_N, BLOCK_DS)
        q_t = _load_rows(q_t_base, offs_n, sqt_n, N, BLOCK_DT, Dt, AS_FP32)  # (BLOCK_N, BLOCK_DT)
        lse_s = tl.load(lse_s_ptr + pid_bh * N + offs_n, mask=offs_n < N, other=0.0)
        lse_t = tl.load(lse_t_ptr + pid_bh * N + offs_n, mask=offs_n < N, other=0.0)
        row_keep = tl.load(row_keep_ptr + b * N + offs_n, mask=offs_n < N, other=0.0)
        s_s = _scores_tile(q_s, k_s, scale_s, visible, PRECISION_S)
        s_t = _scores_tile(q_t, k_t, scale_t, visible, PRECISION_T)
        grad = _grad_scores_tile(s_s, s_t, lse_s, lse_t, row_keep)  # (BLOCK_N, BLOCK_M)
        dk += tl.dot(tl.trans(grad).to(q_s.dtype), q_s, input_precision=PRECISION_S)

    dk *= tl.load(grad_scale_ptr)
    offs_d = tl.arange(0, BLOCK_DS)
    ptrs = dk_s_ptr + (pid_bh * M + offs_m)[:, None] * Ds + offs_d[None, :]
    tl.store(ptrs, dk, mask=(offs_m[:, None] < M) & (offs_d[None, :] < Ds))


def _unit_last_stride(x: Tensor) -> Tensor:
    # The kernels index the head dim with stride 1; other strides are passed through as they are.
    return x if x.stride(-1) == 1 else x.contiguous()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype: torch.dtype) -> str:
    # float32 dots default to TF32 on tensor cores, which blurs scores enough to show in a KL near 0.
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_args(q_s, k_s, q_t, k_t, key_mask, scale_s, scale_t, causal, block_n, block_m) -> tuple[list, dict]:
    """Pointer/stride/size arguments and constexprs shared by the three kernels."""
    B, H, N, Ds = q_s.shape
    M, Dt = k_s.shape[2], q_t.shape[3]
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else q_s.new_empty(1, dtype=torch.int8)
    tensors = [q_s, k_s, q_t, k_t, mask]
    strides = [*q_s.stride()[:3], *k_s.stride()[:3], *q_t.stride()[:3], *k_t.stride()[:3], mask.stride(0)]
    constexprs = dict(
        CAUSAL=causal, HAS_KEY_MASK=key_mask is not None,
        PRECISION_S=_precision(q_s.dtype), PRECISION_T=_precision(q_t.dtype),
        # The interpreter's dot multiplies bf16 bit patterns as integers; it gets float32 tiles.
        AS_FP32=_interpreting(),
        BLOCK_N=block_n, BLOCK_M=block_m,
        BLOCK_DS=max(16, triton.next_power_of_2(Ds)), BLOCK_DT=max(16, triton.next_power_of_2(Dt)),
    )
    return tensors, strides + [H, N, M, Ds, Dt, scale_s, scale_t], constexprs


def attention_kl_fwd(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, scale_s: float, scale_t: float,
    causal: bool, key_mask: Tensor | None, kind: str, block_n: int = 64, block_m: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel.

    Returns:
        Per-row value (B, H, N), student lse (B, H, N) and teacher lse (B, H, N), all float32;
        rows with no visible key hold junk (finite) values and must be left out by the caller.
    """
    B, H, N, _ = q_s.shape
    tensors, args, constexprs = _launch_args(q_s, k_s, q_t, k_t, key_mask, scale_s, scale_t, causal, block_n, block_m)
    row_value, lse_s, lse_t = (q_s.new_empty(B, H, N, dtype=torch.float32) for _ in range(3))
    grid = (triton.cdiv(N, block_n), B * H)
    _attention_kl_fwd_kernel[grid](*tensors, row_value, lse_s, lse_t, *args, KIND_KL=kind == "kl", **constexprs)
    return row_value, lse_s, lse_t


def attention_kl_bwd(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, lse_s: Tensor, lse_t: Tensor,
    row_keep: Tensor, grad_scale: Tensor, scale_s: float, scale_t: float, causal: bool,
    key_mask: Tensor | None, block_n: int = 64, block_m: int = 64,
) -> tuple[Tensor, Tensor]:
    """Launch the dq and dk kernels.

    Args:
        lse_s, lse_t: (B, H, N) float32 from `attention_kl_fwd`.
        row_keep: (B, N), 1 on rows counted in the mean and 0 elsewhere.
        grad_scale: one-element tensor, upstream gradient * scale_s / n_rows (read on device,
            so backward never synchronises).

    Returns:
        dq_s (B, H, N, Ds) and dk_s (B, H, M, Ds), contiguous, in the student's dtype.
    """
    B, H, N, Ds = q_s.shape
    M = k_s.shape[2]
    tensors, args, constexprs = _launch_args(q_s, k_s, q_t, k_t, key_mask, scale_s, scale_t, causal, block_n, block_m)
    row_keep = row_keep.to(torch.float32).contiguous()
    grad_scale = grad_scale.to(torch.float32).reshape(1)
    dq_s = torch.empty(B, H, N, Ds, dtype=q_s.dtype, device=q_s.device)
    dk_s = torch.empty(B, H, M, Ds, dtype=k_s.dtype, device=k_s.device)
    _attention_kl_bwd_kernel[(triton.cdiv(N, block_n), B * H)](
        *tensors, lse_s, lse_t, row_keep, grad_scale, dq_s, *args, **constexprs
    )
    _attention_kl_bwd_dk_kernel[(triton.cdiv(M, block_m), B * H)](
        *tensors, lse_s, lse_t, row_keep, grad_scale, dk_s, *args, **constexprs
    )
    return dq_s, dk_s


def _counted_sum_fwd(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, scale_s: float, scale_t: float, causal: bool,
    key_mask: Tensor | None, counted: Tensor, kind: str, block_n: int, block_m: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """`attention_kl_fwd` in the shape `ref.AttentionKLFn` takes: the counted rows' sum and the lse's."""
    row_value, lse_s, lse_t = attention_kl_fwd(
        q_s, k_s, q_t, k_t, scale_s, scale_t, causal, key_mask, kind, block_n, block_m
    )  # (B, H, N) x3
    return torch.where(counted[:, None, :], row_value, 0.0).sum(), lse_s, lse_t


def attention_kl_triton(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, *,
    scale_s: float | None = None, scale_t: float | None = None, causal: bool = False,
    key_mask: Tensor | None = None, query_mask: Tensor | None = None, kind: str = "kl",
    block_n: int = 64, block_m: int = 64,
) -> Tensor:
    """Triton path of `attention_kl` (same arguments); `block_n` x `block_m` score tiles.

    Inputs may be float32, bfloat16 or float16 (student and teacher dtypes may differ); scores,
    softmax and the loss are float32, gradients come back in the student's dtype.
    """
    check_inputs(q_s, k_s, q_t, k_t, causal, key_mask, query_mask, kind)
    for name, x in (("q_s", q_s), ("q_t", q_t)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name} has dtype {x.dtype}; the triton path takes float32/bfloat16/float16 (use WB_KERNELS=ref)"
            )
    for name, block in (("block_n", block_n), ("block_m", block_m)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name}={block}; tl.dot needs a power of two >= 16")
    Ds, Dt = q_s.shape[3], q_t.shape[3]
    if max(Ds, Dt) > MAX_HEAD_DIM:
        raise ValueError(f"head dims Ds={Ds}, Dt={Dt}; the triton path supports up to {MAX_HEAD_DIM}")
    scale_s, scale_t = _default_scales(Ds, Dt, scale_s, scale_t)
    if q_s.numel() == 0 or k_s.numel() == 0:
        # Nothing to launch (a zero-size grid); the torch path returns the attached exact 0.
        return attention_kl_ref(q_s, k_s, q_t, k_t, scale_s=scale_s, scale_t=scale_t, causal=causal,
                                key_mask=key_mask, query_mask=query_mask, kind=kind)
    q_s, k_s, q_t, k_t = (_unit_last_stride(x) for x in (q_s, k_s, q_t.detach(), k_t.detach()))
    blocks = dict(block_n=block_n, block_m=block_m)
    return AttentionKLFn.apply(
        q_s, k_s, q_t, k_t, scale_s, scale_t, causal, key_mask, query_mask, kind,
        partial(_counted_sum_fwd, **blocks), partial(attention_kl_bwd, **blocks),
    )
