"""`ssd_scan`: the SSD (Mamba-2 state-space duality) scan of `students/mamba2.py`.

Dispatch: mamba-ssm's fused `mamba_chunk_scan_combined` for CUDA tensors when the `cuda` extra
imports and `WB_KERNELS` is not "ref"; else the torch reference `ref.ssd_chunked`. The choice is
logged once (`kernels.announce`); `scan_backend()` tells which path CUDA tensors take.
"""

from __future__ import annotations

import torch
from torch import Tensor

import kernels
from kernels.ssd.ref import compute_dtype, ssd_chunked, ssd_recurrent, ssd_step

__all__ = ["compute_dtype", "scan_backend", "ssd_chunked", "ssd_recurrent", "ssd_scan", "ssd_step"]


def scan_backend() -> str:
    """"mamba_ssm" when CUDA and the `cuda` extra are there (and `WB_KERNELS` is not "ref"),
    else "torch".

    Raises:
        ValueError: an unknown `WB_KERNELS` value (as `kernels.backend()`).
    """
    if kernels.requested_backend() == "ref" or not torch.cuda.is_available():
        return "torch"
    try:
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or built against another CUDA/torch
        return "torch"
    return "mamba_ssm"


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The SSD scan by the path `scan_backend()` picks for `x`'s device: mamba-ssm's fused scan
    for CUDA tensors when available, else `ref.ssd_chunked`, whose arguments (x (B, L, H, P),
    dt (B, L, H), A (H,), B/C (B, L, H, N), initial state (B, H, P, N) or None) and returns
    (y (B, L, H, P), final state (B, H, P, N)) it shares.

    Raises:
        ValueError: an unknown `WB_KERNELS` value, whatever the device.
    """
    native = scan_backend() == "mamba_ssm" and x.is_cuda  # checks WB_KERNELS for CPU tensors too
    kernels.announce("ssd_scan", "mamba-ssm fused chunk scan" if native else "torch (ref)")
    if native:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        y, final = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, initial_states=initial_state,
                                             return_final_states=True)
        return y, final
    return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state)
