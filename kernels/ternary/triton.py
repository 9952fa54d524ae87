"""Packed-ternary x int8 GEMM as a Triton program: one program per (row tile, output tile).

Each program walks the inputs one weight group at a time: it loads int8 activations and
unpacks the 2-bit weight codes of the group straight from the packed bytes (byte k // 4, bits
2 (k % 4)), accumulates their product in int32, and adds it to a float32 sum scaled by the
group's gamma; the per-token activation scale divides the result once at the end. Imported
lazily by `kernels.ternary` (dispatch), never at package import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.ternary.ref import quantize_int8

BLOCK_M, BLOCK_O = 16, 32


@triton.jit
def _ternary_gemm_kernel(xq, scale, packed, gamma, out, m, n_out, k, group, n_groups,
                         BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_o = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    in_rows, in_outs = rows < m, outs < n_out
    total = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    bytes_per_row = k // 4
    for grp in range(0, n_groups):
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.int32)
        for k0 in range(0, group, BLOCK_K):
            cols = grp * group + k0 + tl.arange(0, BLOCK_K)
            in_cols = (k0 + tl.arange(0, BLOCK_K)) < group
            a = tl.load(xq + rows[:, None] * k + cols[None, :], mask=in_rows[:, None] & in_cols[None, :], other=0)
            byte = tl.load(packed + outs[:, None] * bytes_per_row + cols[None, :] // 4,
                           mask=in_outs[:, None] & in_cols[None, :], other=1 + 4 + 16 + 64)  # codes of 0
            codes = ((byte.to(tl.int32) >> ((cols[None, :] % 4) * 2)) & 3) - 1  # (BLOCK_O, BLOCK_K)
            acc += tl.dot(a.to(tl.int8), tl.trans(codes.to(tl.int8)), out_dtype=tl.int32)
        g = tl.load(gamma + outs * n_groups + grp, mask=in_outs, other=0.0)
        total += acc.to(tl.float32) * g[None, :]
    s = tl.load(scale + rows, mask=in_rows, other=1.0)
    tl.store(out + rows[:, None] * n_out + outs[None, :], total / s[:, None],
             mask=in_rows[:, None] & in_outs[None, :])


def ternary_linear_triton(x: Tensor, packed: Tensor, gamma: Tensor, out_features: int,
                          group: int | None = None) -> Tensor:
    """`kernels.ternary.ref.ternary_linear` with 8-bit activations, as one Triton launch."""
    in_features = x.shape[-1]
    g = in_features if group is None else group
    n_groups = in_features // g
    x2 = x.reshape(-1, in_features)
    xq, scale = quantize_int8(x2.float())
    gam = gamma.to(torch.float32).reshape(-1, n_groups).expand(out_features, n_groups).contiguous()
    out = torch.empty(x2.shape[0], out_features, dtype=torch.float32, device=x.device)
    block_k = max(16, min(64, triton.next_power_of_2(g)))
    grid = (triton.cdiv(x2.shape[0], BLOCK_M), triton.cdiv(out_features, BLOCK_O))
    _ternary_gemm_kernel[grid](xq.contiguous(), scale.reshape(-1).contiguous(), packed.contiguous(), gam, out,
                               x2.shape[0], out_features, in_features, g, n_groups,
                               BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_O, BLOCK_K=block_k)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
