"""Torch reference of the HGRN / MLGRU element-wise linear recurrence

    h_t = f_t * h_{t-1} + c_t        (f, c, h: (B, T, D); f in (0, 1))

the token mixer of the MatMul-free LM (`students/mmfree.py`; matmulfreellm's `ops/hgrn`, whose
gate is linear: no exp / log of f). `hgrn_step` is one token (decoding) and `hgrn_naive` loops
it (the oracle); `hgrn_chunked` is the vectorised training path: a Hillis-Steele scan of the
affine maps h -> f h + c inside chunks of `chunk_size` tokens (log2(chunk) multiply-adds on whole
tensors), the same scan over the chunks' totals, then each chunk's entering state carried in.
Only products and sums of gates appear - no division by a cumulative product of gates, no log -
so gates near 0 cannot blow up, forward or backward; autograd runs through it. `recurrence`
picks between them (the torch path of `kernels.hgrn.hgrn_recurrence`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The recurrence's working dtype: float32 for half-precision inputs, float32/float64 kept."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def start_state(f: Tensor, initial_state: Tensor | None) -> Tensor:
    """The (B, D) state before the first token in the working dtype: `initial_state`, or zeros."""
    dtype = compute_dtype(f)
    if initial_state is None:
        return torch.zeros(f.shape[0], f.shape[-1], dtype=dtype, device=f.device)
    return initial_state.to(dtype)


def hgrn_step(state: Tensor, f: Tensor, c: Tensor) -> Tensor:
    """One token: state (B, D), f and c (B, D) -> the new state, in state's dtype."""
    return f.to(state.dtype) * state + c.to(state.dtype)


def hgrn_naive(f: Tensor, c: Tensor, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence token by token (the oracle); arguments and returns as `hgrn_chunked`."""
    state = start_state(f, initial_state)
    out = []
    for t in range(f.shape[1]):
        state = hgrn_step(state, f[:, t], c[:, t])
        out.append(state)
    return torch.stack(out, dim=1).to(f.dtype), state


def _shift(x: Tensor, k: int, dim: int, fill: float) -> Tensor:
    """`x` moved `k` steps later along `dim`; the first `k` entries are `fill`."""
    shape = list(x.shape)
    shape[dim] = k
    return torch.cat([x.new_full(shape, fill), x.narrow(dim, 0, x.shape[dim] - k)], dim=dim)


def _scan(f: Tensor, c: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Inclusive Hillis-Steele scan along `dim`: (prod_{s<=t} f_s, the state after t from zero).

    After the step of offset k, (f_t, c_t) is the composed map of tokens (t - 2k, t]; composing
    with the map k tokens earlier is c <- c + f * c_prev, f <- f * f_prev (identity before the start).
    """
    k, n = 1, f.shape[dim]
    while k < n:
        c = c + f * _shift(c, k, dim, 0.0)
        f = f * _shift(f, k, dim, 1.0)
        k *= 2
    return f, c


def hgrn_chunked(f: Tensor, c: Tensor, initial_state: Tensor | None = None,
                 chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """The recurrence by parallel scans, chunk by chunk.

    Args:
        f: (B, T, D) forget gates in (0, 1).
        c: (B, T, D) inputs.
        initial_state: (B, D) state before the first token, or None (zeros).
        chunk_size: tokens per chunk (the inner scan's width); T need not be a multiple - the
            tail is padded with identity steps (f = 1, c = 0), which change no state.
    Returns:
        h: (B, T, D) every state, in f's dtype; final state (B, D) in float32 (float64 for
        float64 inputs).
    """
    b, length, d = f.shape
    out_dtype, dtype = f.dtype, compute_dtype(f)
    f, c = f.to(dtype), c.to(dtype)
    if initial_state is not None:  # fold h_0 into the first input: h_1 = f_1 h_0 + c_1
        c = torch.cat([c[:, :1] + f[:, :1] * initial_state.to(dtype)[:, None], c[:, 1:]], dim=1)
    size = max(1, min(chunk_size, length))
    pad = (-length) % size
    if pad:
        f = F.pad(f, (0, 0, 0, pad), value=1.0)
        c = F.pad(c, (0, 0, 0, pad))
    n = f.shape[1] // size
    decay, local = _scan(f.reshape(b, n, size, d), c.reshape(b, n, size, d), dim=2)  # (B, n, C, D)
    _, ends = _scan(decay[:, :, -1], local[:, :, -1], dim=1)  # (B, n, D): the state at each chunk's end
    entering = _shift(ends, 1, 1, 0.0)  # (B, n, D): the state before each chunk
    h = (local + decay * entering[:, :, None]).reshape(b, n * size, d)[:, :length]  # (B, T, D)
    return h.to(out_dtype), h[:, -1]


def recurrence(f: Tensor, c: Tensor, initial_state: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """`hgrn_chunked` for T > 1, one `hgrn_step` for T == 1 (decoding); as `hgrn_chunked`."""
    if f.shape[1] == 1:
        state = hgrn_step(start_state(f, initial_state), f[:, 0], c[:, 0])
        return state[:, None].to(f.dtype), state
    return hgrn_chunked(f, c, initial_state, chunk_size)
