"""Gram-relation loss as Triton programs: one program per (item, row tile of G).

Forward programs walk the column tiles j >= i of their row tile (G is symmetric) and write
per-tile Frobenius sums; torch adds them up and applies `ref.reduce_items`. Backward programs
recompute every G tile of their rows and accumulate dX_s = 2 (alpha G_s + beta G_t) X_s.
Imported lazily by `kernels.relation_loss` (dispatch), never at package import.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.relation_loss.ref import RelationLossFn, accumulate_dtype, check_inputs

BLOCK_N = 64  # rows (and columns) of a G tile
MAX_BLOCK_D = 64  # feature columns per step of the Gram product
MAX_BLOCK_OUT = 128  # dX_s columns per backward program (wider features add programs)

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _gram_tile(x, stride_n, stride_d, rows_i, keep_i, rows_j, keep_j, width,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """(BLOCK_N, BLOCK_N) tile X[rows_i] X[rows_j]^T; excluded rows load as zeros."""
    g = tl.zeros((BLOCK_N, BLOCK_N), dtype=ACC)
    for d0 in range(0, width, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_width = cols < width
        x_i = tl.load(x + rows_i[:, None] * stride_n + cols[None, :] * stride_d,
                      mask=keep_i[:, None] & in_width[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        x_j = tl.load(x + rows_j[:, None] * stride_n + cols[None, :] * stride_d,
                      mask=keep_j[:, None] & in_width[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            x_i = x_i.to(ACC)
            x_j = x_j.to(ACC)
        # fp32 products in IEEE precision (not TF32) so the kernel matches the torch path
        g += tl.dot(x_i, tl.trans(x_j), input_precision="ieee", out_dtype=ACC)
    return g


@triton.jit
def _kept_rows(keep, stride_keep, b, tile, n, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Row indices of a tile and whether each is a valid token of item b."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    kept = rows < n
    if HAS_MASK:
        kept = kept & (tl.load(keep + b * stride_keep + rows, mask=rows < n, other=0) != 0)
    return rows, kept


@triton.jit
def _relation_loss_fwd_kernel(
    xs, xt, keep, partial, n, width_s, width_t, n_tiles,
    stride_sb, stride_sn, stride_sd, stride_tb, stride_tn, stride_td, stride_keep,
    COSINE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ti = tl.program_id(1)
    xs += b * stride_sb
    xt += b * stride_tb
    rows_i, keep_i = _kept_rows(keep, stride_keep, b, ti, n, BLOCK_N, HAS_MASK)
    acc0 = tl.zeros((BLOCK_N,), dtype=ACC)
    acc1 = tl.zeros((BLOCK_N,), dtype=ACC)
    acc2 = tl.zeros((BLOCK_N,), dtype=ACC)
    for tj in range(ti, n_tiles):
        rows_j, keep_j = _kept_rows(keep, stride_keep, b, tj, n, BLOCK_N, HAS_MASK)
        g_s = _gram_tile(xs, stride_sn, stride_sd, rows_i, keep_i, rows_j, keep_j, width_s,
                         BLOCK_N, BLOCK_D, ACC, UPCAST)  # (BLOCK_N, BLOCK_N)
        g_t = _gram_tile(xt, stride_tn, stride_td, rows_i, keep_i, rows_j, keep_j, width_t,
                         BLOCK_N, BLOCK_D, ACC, UPCAST)  # (BLOCK_N, BLOCK_N)
        weight = tl.where(tj == ti, 1.0, 2.0)  # an off-diagonal tile stands for its transpose too
        if COSINE:
            acc0 += weight * tl.sum(g_s * g_t, axis=1)
            acc1 += weight * tl.sum(g_s * g_s, axis=1)
            acc2 += weight * tl.sum(g_t * g_t, axis=1)
        else:
            diff = g_s - g_t
            acc0 += weight * tl.sum(diff * diff, axis=1)
    out = partial + (b * n_tiles + ti) * 3
    tl.store(out, tl.sum(acc0, axis=0))
    tl.store(out + 1, tl.sum(acc1, axis=0))
    tl.store(out + 2, tl.sum(acc2, axis=0))


@triton.jit
def _relation_loss_bwd_kernel(
    xs, xt, keep, coef, dxs, n, width_s, width_t, n_tiles,
    stride_sb, stride_sn, stride_sd, stride_tb, stride_tn, stride_td, stride_keep,
    stride_gb, stride_gn, stride_gd,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_OUT: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ti = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    in_width = cols < width_s
    xs += b * stride_sb
    xt += b * stride_tb
    alpha = tl.load(coef + b * 2)
    beta = tl.load(coef + b * 2 + 1)
    rows_i, keep_i = _kept_rows(keep, stride_keep, b, ti, n, BLOCK_N, HAS_MASK)
    acc = tl.zeros((BLOCK_N, BLOCK_OUT), dtype=ACC)
    for tj in range(0, n_tiles):
        rows_j, keep_j = _kept_rows(keep, stride_keep, b, tj, n, BLOCK_N, HAS_MASK)
        g_s = _gram_tile(xs, stride_sn, stride_sd, rows_i, keep_i, rows_j, keep_j, width_s,
                         BLOCK_N, BLOCK_D, ACC, UPCAST)  # (BLOCK_N, BLOCK_N)
        g_t = _gram_tile(xt, stride_tn, stride_td, rows_i, keep_i, rows_j, keep_j, width_t,
                         BLOCK_N, BLOCK_D, ACC, UPCAST)  # (BLOCK_N, BLOCK_N)
        d = alpha * g_s + beta * g_t  # (BLOCK_N, BLOCK_N) tile of dL/dG_s
        x_j = tl.load(xs + rows_j[:, None] * stride_sn + cols[None, :] * stride_sd,
                      mask=keep_j[:, None] & in_width[None, :], other=0.0).to(ACC)  # (BLOCK_N, BLOCK_OUT)
        acc += tl.dot(d, x_j, input_precision="ieee", out_dtype=ACC)
    # excluded rows of G are zero, so their dX rows come out zero and are stored as such
    out = dxs + b * stride_gb + rows_i[:, None] * stride_gn + cols[None, :] * stride_gd
    tl.store(out, (2 * acc).to(dxs.dtype.element_ty), mask=(rows_i < n)[:, None] & in_width[None, :])


def _blocks(width: int, cap: int) -> int:
    """A power-of-two block for `width` columns, at least 16 (tl.dot's minimum) and at most cap."""
    return max(16, min(cap, triton.next_power_of_2(width)))


def _upcast(x_s: Tensor, x_t: Tensor) -> bool:
    """Whether the Gram products take inputs narrower than the accumulator in its dtype.

    fp32 inputs next to fp64 ones: yes, so their products are not rounded to fp32 first. 16-bit
    inputs: only in Triton's interpreter, whose tl.dot multiplies the raw uint16 bits of bf16
    (Triton 3.9); on a GPU bf16 x bf16 products are exact in the fp32 accumulator anyway.
    """
    acc = accumulate_dtype(x_s, x_t)
    narrower = {x_s.dtype, x_t.dtype} - {acc}
    if not narrower:
        return False
    return acc == torch.float64 or os.environ.get("TRITON_INTERPRET") == "1"


def _keep(x_s: Tensor, mask: Tensor | None) -> Tensor:
    """The mask as int8 for the kernels (a 1-element dummy when there is none)."""
    return mask.to(torch.int8) if mask is not None else x_s.new_zeros(1, dtype=torch.int8)


def relation_loss_fwd(x_s: Tensor, x_t: Tensor, mask: Tensor | None, kind: str,
                      block_n: int = BLOCK_N) -> Tensor:
    """Per-item Frobenius sums (B, 3) ((B, 1) for "mse") in the accumulation dtype."""
    batch, n, width_s = x_s.shape
    acc = accumulate_dtype(x_s, x_t)
    n_tiles = triton.cdiv(n, block_n)
    partial = torch.zeros(batch, n_tiles, 3, device=x_s.device, dtype=acc)  # (B, tiles, 3)
    keep = _keep(x_s, mask)
    _relation_loss_fwd_kernel[(batch, n_tiles)](
        x_s, x_t, keep, partial, n, width_s, x_t.shape[2], n_tiles,
        *x_s.stride(), *x_t.stride(), keep.stride(0) if mask is not None else 0,
        COSINE=kind == "cosine", HAS_MASK=mask is not None, BLOCK_N=block_n,
        BLOCK_D=_blocks(max(width_s, x_t.shape[2]), MAX_BLOCK_D), ACC=_TL_DTYPES[acc], UPCAST=_upcast(x_s, x_t),
    )
    sums = partial.sum(1)  # (B, 3)
    return sums if kind == "cosine" else sums[:, :1]


def relation_loss_bwd(x_s: Tensor, x_t: Tensor, mask: Tensor | None, coef: Tensor,
                      block_n: int = BLOCK_N) -> Tensor:
    """dX_s (B, N, Ds) for per-item coefficients coef (B, 2) = [alpha, beta] (upstream grad included)."""
    batch, n, width_s = x_s.shape
    dx = torch.empty_like(x_s)  # (B, N, Ds)
    n_tiles = triton.cdiv(n, block_n)
    block_out = _blocks(width_s, MAX_BLOCK_OUT)
    keep = _keep(x_s, mask)
    _relation_loss_bwd_kernel[(batch, n_tiles, triton.cdiv(width_s, block_out))](
        x_s, x_t, keep, coef.contiguous(), dx, n, width_s, x_t.shape[2], n_tiles,
        *x_s.stride(), *x_t.stride(), keep.stride(0) if mask is not None else 0, *dx.stride(),
        HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_D=_blocks(max(width_s, x_t.shape[2]), MAX_BLOCK_D),
        BLOCK_OUT=block_out, ACC=_TL_DTYPES[coef.dtype], UPCAST=_upcast(x_s, x_t),
    )
    return dx


def relation_loss_triton(
    x_s: Tensor, x_t: Tensor, *, kind: str = "cosine", mask: Tensor | None = None, block_n: int = BLOCK_N
) -> Tensor:
    """Gram-relation loss with Triton kernels; same contract as `relation_loss_ref`.

    Args:
        x_s: (B, N, Ds) student features; gradients flow here.
        x_t: (B, N, Dt) teacher features; detached.
        kind: "cosine" or "mse".
        mask: (B, N) bool, False drops the token's row and column of G; None keeps all.
        block_n: rows and columns of a G tile (a power of two, >= 16).

    Returns:
        () the loss, in float32 (float64 if an input is float64).
    """
    check_inputs(x_s, x_t, kind, mask)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"relation_loss_triton: block_n={block_n}; must be a power of two >= 16")
    return RelationLossFn.apply(x_s, x_t.detach(), mask, kind, partial(relation_loss_fwd, block_n=block_n),
                                partial(relation_loss_bwd, block_n=block_n))
