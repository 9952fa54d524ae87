"""Ternary (BitLinear) layers' integer path: packed 2-bit weights x int8 activations, int32
accumulation per weight group, one rescale.

`ternary_linear` dispatches to the Triton kernel (`triton.py`) on CUDA or when forced with
WB_KERNELS=triton, and to the torch reference (`ref.py`) otherwise; weight-only layers
(`act_bits=None`) and inputs whose width is not a multiple of 4 take the reference. Forward only:
training runs BitLinear's fake-quantized forward, whose backward is the straight-through estimator.
"""

from __future__ import annotations

from torch import Tensor

import kernels
from kernels.ternary.ref import pack, quantize_int8, quantize_per_token, ternary_linear as ternary_linear_ref, unpack

__all__ = ["pack", "quantize_int8", "quantize_per_token", "ternary_linear", "ternary_linear_ref", "unpack"]


def ternary_linear(x: Tensor, packed: Tensor, gamma: Tensor, out_features: int, group: int | None = None,
                   act_bits: int | None = 8) -> Tensor:
    """y = x W^T for a packed ternary weight (see `kernels.ternary.ref.ternary_linear`)."""
    if act_bits == 8 and x.shape[-1] % 4 == 0 and kernels.use_triton("ternary_linear", x):
        from kernels.ternary.triton import ternary_linear_triton

        return ternary_linear_triton(x, packed, gamma, out_features, group)
    return ternary_linear_ref(x, packed, gamma, out_features, group, act_bits)
