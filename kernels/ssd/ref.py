"""Torch reference of the SSD (Mamba-2 state-space duality) scan: the CPU and training path.

`ssd_chunked` is the chunked algorithm of mamba's `ssd_minimal` (quadratic inside a chunk, a
recurrence over chunk states between chunks); `ssd_step` is one token of the recurrence (for
decoding) and `ssd_recurrent` loops it (the oracle `ssd_chunked` is tested against). The
dispatch to mamba-ssm's fused scan is `kernels.ssd.ssd_scan`; the layer is `students/mamba2.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _segsum(x: Tensor) -> Tensor:
    """(..., T) -> (..., T, T): out[i, j] = sum_{k=j+1..i} x_k for j <= i, -inf above the
    diagonal. Built by masked cumsum, so no large values cancel (exp of it is the decay mask)."""
    t = x.shape[-1]
    x = x[..., None].expand(*x.shape, t)  # (..., T, T): column j holds x
    strict = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strict, 0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
    return out.masked_fill(~keep, float("-inf"))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The scan's working dtype: float32 for half-precision inputs, float32/float64 kept."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 256,
                initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The SSD scan, chunk by chunk.

    Args:
        x: (B, L, H, P) inputs.
        dt: (B, L, H) positive step sizes (after softplus).
        A: (H,) negative decay rates.
        B, C: (B, L, H, N) input and output projections of the state, already per head.
        chunk_size: tokens per chunk; L need not be a multiple (the tail is padded with
            dt = 0, which neither decays nor writes the state).
        initial_state: (B, H, P, N) state before the first token, or None (zeros).
    Returns:
        y: (B, L, H, P) in x's dtype; final_state: (B, H, P, N) in float32 (float64 for float64 inputs).
    """
    b, length, h, p = x.shape
    n = B.shape[-1]
    dtype = compute_dtype(x)
    pad = (-length) % chunk_size
    x, dt, B, C = (t.to(dtype) for t in (x, dt, B, C))
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = x.shape[1] // chunk_size
    xdt = (x * dt[..., None]).reshape(b, c, chunk_size, h, p)  # (B, c, l, H, P)
    B = B.reshape(b, c, chunk_size, h, n)
    C = C.reshape(b, c, chunk_size, h, n)
    a = (dt * A.to(dtype)).reshape(b, c, chunk_size, h).permute(0, 3, 1, 2)  # (B, H, c, l)
    a_cum = torch.cumsum(a, dim=-1)  # (B, H, c, l)

    # 1. inside each chunk: y = (L o C B^T) x dt, the attention-like quadratic form
    decay = torch.exp(_segsum(a))  # (B, H, c, l, l)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay  # (B, H, c, l, s)
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)  # (B, c, l, H, P)

    # 2. each chunk's contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (B, H, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, xdt)  # (B, c, H, P, N)

    # 3. states at chunk boundaries: a recurrence over chunks (segsum over chunk totals)
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=dtype, device=x.device)
    states = torch.cat([initial_state.to(dtype)[:, None], states], dim=1)  # (B, c+1, H, P, N)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (B, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # (B, c+1, H, P, N)
    states, final = states[:, :-1], states[:, -1]

    # 4. the state entering each chunk, read out at every position of it
    from_start = torch.exp(a_cum)  # (B, H, c, l)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, from_start)
    y = y.reshape(b, c * chunk_size, h, p)[:, :length]
    return y, final


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the recurrence.

    Args:
        state: (B, H, P, N) state after the previous token.
        x: (B, H, P); dt: (B, H); A: (H,); B, C: (B, H, N).
    Returns:
        y: (B, H, P) in x's dtype, and the new state (state's dtype).
    """
    dtype = state.dtype
    dt = dt.to(dtype)
    decay = torch.exp(dt * A.to(dtype))  # (B, H)
    write = (dt[..., None] * x.to(dtype))[..., None] * B.to(dtype)[:, :, None, :]  # (B, H, P, N)
    state = state * decay[..., None, None] + write
    y = torch.einsum("bhpn,bhn->bhp", state, C.to(dtype))
    return y.to(x.dtype), state


def ssd_recurrent(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence token by token (the oracle `ssd_chunked` is tested against); same
    arguments and returns as `ssd_chunked`."""
    b, length, h, p = x.shape
    dtype = compute_dtype(x)
    state = torch.zeros(b, h, p, B.shape[-1], dtype=dtype, device=x.device) if initial_state is None \
        else initial_state.to(dtype)
    ys = []
    for t in range(length):
        y, state = ssd_step(state, x[:, t].to(dtype), dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1).to(x.dtype), state
