"""The integer path of a ternary (BitLinear) layer, in torch: the reference and CPU path.

Weights arrive packed four to a byte (2-bit codes {-1, 0, 1} + 1, `students.bitlinear.pack_ternary`
layout) with one absmean scale per tensor or per group of inputs; activations are quantized per
token to int8 (scale s = 127 / absmax). The product accumulates in int32 per weight group and is
rescaled once: y = sum_g (x_q[:, g] @ codes[:, g]^T) * gamma_g / s. This is what a deployment
kernel computes; it equals the training forward (fake quantization in fp32) up to float rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pack(codes: Tensor) -> Tensor:
    """Codes in {-1, 0, 1} -> uint8, four per byte (2 bits each, value + 1), ceil(n / 4) bytes."""
    flat = (codes.reshape(-1).to(torch.int16) + 1).to(torch.uint8)
    pad = (-flat.numel()) % 4
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 4)
    return flat[:, 0] | flat[:, 1] << 2 | flat[:, 2] << 4 | flat[:, 3] << 6


def unpack(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The inverse of `pack`: int8 codes of `shape`."""
    parts = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).reshape(-1)
    return (parts[: math.prod(shape)].to(torch.int8) - 1).reshape(shape)


def quantize_per_token(x: Tensor, bits: int = 8, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-token (last-dim row) absmax integers in [-2^(bits-1), 2^(bits-1) - 1] (as x's dtype)
    and their scales s: x ≈ q / s, with s = (2^(bits-1) - 1) / max |x|."""
    top = 2 ** (bits - 1) - 1
    scale = top / x.abs().amax(-1, keepdim=True).clamp(min=eps)
    return (x * scale).round().clamp(-top - 1, top), scale


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token int8 activations and their scales s (x ≈ x_q / s)."""
    q, scale = quantize_per_token(x, 8)
    return q.to(torch.int8), scale


def grouped_product(xq: Tensor, codes: Tensor, gamma: Tensor, group: int | None) -> Tensor:
    """sum_g (xq[:, g] @ codes[:, g]^T) * gamma_g for integer-valued xq (N, in) and codes
    (out, in), in xq's dtype. In fp32 the integer sums are exact (|sum| <= 127 * in < 2^24), so
    this equals int32 accumulation, and the training forward computing it (differentiably)
    matches the integer path bit for bit."""
    out_features, in_features = codes.shape
    if group is None:
        return (xq @ codes.T) * gamma.reshape(())
    n_groups = in_features // group
    acc = torch.einsum("ngk,ogk->nog", xq.reshape(-1, n_groups, group), codes.reshape(out_features, n_groups, group))
    return (acc * gamma.reshape(out_features, n_groups)).sum(-1)


def ternary_linear(x: Tensor, packed: Tensor, gamma: Tensor, out_features: int, group: int | None = None,
                   act_bits: int | None = 8) -> Tensor:
    """y = x W^T for a packed ternary W with scales `gamma` ((1,) per tensor or (out, in // group)).

    With `act_bits=None` (weight-only) the activations stay in floating point and only the
    weight is integer."""
    in_features = x.shape[-1]
    codes = unpack(packed, (out_features, in_features))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    g = in_features if group is None else group
    n_groups = in_features // g
    if act_bits is None:
        w = (codes.to(x.dtype).reshape(out_features, n_groups, g) * gamma.reshape(-1, n_groups, 1).to(x.dtype))
        return (x2 @ w.reshape(out_features, in_features).T).reshape(*lead, out_features)
    if act_bits != 8:
        raise ValueError(f"the integer path takes 8-bit activations (act_bits=8) or none, not {act_bits}")
    xq, scale = quantize_int8(x2)
    # int32 accumulation per weight group: (N, G, g) x (O, G, g) -> (N, O, G), then one rescale
    acc = torch.einsum("ngk,ogk->nog", xq.to(torch.int32).reshape(-1, n_groups, g),
                       codes.to(torch.int32).reshape(out_features, n_groups, g)).to(torch.float32)
    gamma = gamma.to(torch.float32)
    y = acc.squeeze(-1) * gamma.reshape(()) if group is None else (acc * gamma.reshape(-1, n_groups)).sum(-1)
    return (y / scale.to(torch.float32)).to(x.dtype).reshape(*lead, out_features)
