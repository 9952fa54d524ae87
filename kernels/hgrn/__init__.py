"""`hgrn_recurrence`: the element-wise linear recurrence h_t = f_t * h_{t-1} + c_t of the MLGRU
token mixer (`students/mmfree.py`).

Torch only so far: `ref.hgrn_chunked` (parallel scans) for sequences, `ref.hgrn_step` for a single
token (decoding); `ref.hgrn_naive` is the oracle both are tested against. matmulfreellm's fused
Triton recurrence would be the native path, behind the same signature. The choice is logged once
(`kernels.announce`).
"""

from __future__ import annotations

from torch import Tensor

import kernels
from kernels.hgrn.ref import compute_dtype, hgrn_chunked, hgrn_naive, hgrn_step, recurrence, start_state

__all__ = ["compute_dtype", "hgrn_chunked", "hgrn_naive", "hgrn_recurrence", "hgrn_step", "start_state"]


def hgrn_recurrence(f: Tensor, c: Tensor, initial_state: Tensor | None = None,
                    chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """The recurrence over a sequence (`ref.recurrence`: chunked scans, or one step for T == 1).

    Args:
        f: (B, T, D) forget gates in (0, 1); c: (B, T, D) inputs; initial_state: (B, D) or None
        (zeros); chunk_size: tokens per chunk of the scan.
    Returns:
        h: (B, T, D) in f's dtype; final state (B, D) in float32 (float64 for float64 inputs).
    Raises:
        ValueError: an unknown `WB_KERNELS` value.
    """
    kernels.requested_backend()  # validates WB_KERNELS; there is no Triton path to pick yet
    kernels.announce("hgrn_recurrence", "torch (ref)")
    return recurrence(f, c, initial_state, chunk_size)
